//! Allocation maps, in the shape of `qemu-img map --output=json`.

use serde::{Deserialize, Serialize};

/// One extent of an image's allocation map.
///
/// Field names and meanings are those of `qemu-img map --output=json`, so the
/// two can be compared directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MapExtent {
    /// Guest offset of the extent, in bytes.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chain depth that decides these bytes: 0 is the image itself, 1 its
    /// backing file, and so on.
    pub depth: u32,
    /// Whether some layer of the chain allocates the range (false: nothing
    /// does, it reads as zeros).
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range holds data in the layer at `depth`.
    pub data: bool,
    /// Whether the data is stored compressed.
    pub compressed: bool,
    /// Where the bytes are in the file of the layer at `depth`, when they are
    /// stored there uncompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapExtent {
    /// Whether `next` continues `self` exactly as `qemu-img map` would merge it.
    fn merges_with(&self, next: &MapExtent) -> bool {
        self.start.checked_add(self.length) == Some(next.start)
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// Merge consecutive extents the way `qemu-img map` does (same flags, same
/// depth, contiguous host offsets or none on both).
pub(crate) fn merge_extents(extents: Vec<MapExtent>) -> Vec<MapExtent> {
    let mut out: Vec<MapExtent> = Vec::with_capacity(extents.len());
    for e in extents {
        if e.length == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            if last.merges_with(&e) {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    out
}
