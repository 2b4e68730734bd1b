//! Cheap format and size probing from the first bytes of a file.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::qcow2::{Qcow2Header, QCOW2_MAGIC};
use crate::{Error, Result};

/// An image format vmvol reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain file whose bytes are the disk's bytes.
    Raw,
    /// QEMU's copy-on-write format, version 3.
    Qcow2,
}

impl Format {
    /// The name `qemu-img` uses for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one parser of format names: the names `qemu-img` uses, as given on a
/// command line or recorded as a backing format. `"file"` (QEMU's protocol
/// driver, which reads a file as it is) is raw.
impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "raw" | "file" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!(
                "unknown image format {other:?} (expected raw or qcow2)"
            )),
        }
    }
}

/// Guess an image's format from its magic: `qcow2` if it starts with
/// [`QCOW2_MAGIC`], otherwise `raw`.
///
/// Only for the top image a caller names explicitly; backing files are never
/// probed (a guest could write a qcow2 header into a raw disk).
pub fn detect_format(path: &Path) -> Result<Format> {
    let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, "read magic", e)),
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Virtual size of an image of a known format, from its header alone (no
/// backing chain is opened). Used for accounting, where opening every chain
/// would be slow and needless.
pub fn virtual_size(path: &Path, format: Format) -> Result<u64> {
    match format {
        Format::Raw => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| Error::io(path, "stat", e)),
        Format::Qcow2 => {
            let f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
            Ok(Qcow2Header::read(path, &f)?.size)
        }
    }
}
