//! Crash safety of qcow2 images written through [`super::Qcow2Image`]: the
//! dirty bit, and what an open does about it.
//!
//! The guarantee (docs/architecture.md): after a crash at any point — a killed
//! process, or a power loss that drops any unflushed write in any order — the
//! next read-write open yields an image `qemu-img check` finds free of errors
//! and leaks, and every write completed before the last completed flush
//! reads back.
//!
//! The mechanism is QEMU's lazy-refcounts semantics plus a few flushes:
//! [`super::ordering`] sets the dirty bit before a session's first write and
//! orders table writes before the pointers to them (the storage adaptor calls
//! it); [`super::rebuild`] recounts refcounts on the next read-write open of
//! a dirty image. A clean image with refcounts that are too low was damaged
//! elsewhere, not by a crash: it is refused here until repaired.

use std::path::Path;

use crate::{check, Error, RepairMode, Result};

/// Before a read-write open of the qcow2 file at `path` without the dirty
/// bit: refuse it if its refcounts are too low (damage from elsewhere:
/// allocating on it would hand out clusters in use). Leaks are accepted.
pub(crate) fn refuse_inconsistent(path: &Path) -> Result<()> {
    let report = match check(path, RepairMode::None) {
        Ok(r) => r,
        // Images check cannot judge (persistent bitmaps) open as before.
        Err(Error::Unsupported { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    if report.corruptions > 0 || report.check_errors > 0 {
        let first = report
            .messages
            .iter()
            .find(|m| m.starts_with("ERROR"))
            .cloned()
            .unwrap_or_default();
        return Err(Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "refusing to open read-write: refcounts are inconsistent ({} corruptions, {} check errors; first: {first}) and the dirty bit is not set, so this is damage from an older version or another tool, not a crash; repair it with `vmvol image check -r all` (or `qemu-img check -r all`)",
                report.corruptions, report.check_errors
            ),
        });
    }
    Ok(())
}
