//! A byte range of a device or image, shared by every layer that talks about
//! extents (compaction's unused ranges, the ext4 free map).

use serde::{Deserialize, Serialize};

/// A range of bytes: `offset .. offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// Start of the range in bytes.
    pub offset: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

impl ByteRange {
    /// A range starting at `offset`, `len` bytes long.
    pub fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// First byte past the range (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}
