//! tar populate body: the input is a tar stream (plain or gzip) poured into
//! a fresh ext4 filesystem on an in-memory device, with tight limits.

use vmvol_format::Control;
use vmvol_fs::{Journal, MkfsOptions, PopulateLimits, PopulateOptions};

use crate::memdev::MemDev;

/// Device size: big enough for the seeds' content plus metadata.
pub const DEVICE_BYTES: u64 = 8 << 20;

/// Populates a device from `data`; refusals and errors are fine.
pub fn populate(data: &[u8]) {
    let dev = MemDev::new(DEVICE_BYTES, &[], false);
    let opts = PopulateOptions {
        mkfs: MkfsOptions {
            block_size: 1024,
            journal: Journal::None,
            timestamp: Some(0),
            // Inode tables are zeroed by the device already: skip the writes.
            lazy_itable_init: true,
            ..MkfsOptions::default()
        },
        limits: PopulateLimits {
            max_total_bytes: 4 << 20,
            max_entries: 2000,
        },
    };
    let r = vmvol_fs::populate_tar(&dev, data, &opts, &Control::new());
    if std::env::var_os("VMVOL_FUZZ_DEBUG").is_some() {
        eprintln!("populate: {r:?}");
    }
    if r.is_ok() {
        // What we wrote must read back as a filesystem.
        let _ = vmvol_fs::free_map(&dev);
    }
}
