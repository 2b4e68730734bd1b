//! The block-I/O trait every layer above the format layer uses.

use std::sync::Arc;

use crate::Result;

/// Random-access block I/O on a disk image.
///
/// Implemented by [`crate::RawImage`], [`crate::Qcow2Image`] and [`crate::Image`].
/// Implementations are `Send + Sync` and take `&self`, so one handle may be
/// shared by several I/O threads issuing requests at once (as a VMM's queues do).
///
/// Offsets and lengths are in bytes and need no alignment. A request that reaches
/// past [`BlockIo::size`] fails with [`crate::Error::OutOfRange`]; it never
/// grows the image.
pub trait BlockIo: Send + Sync {
    /// Virtual size of the image in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Make `len` bytes at `offset` read as zeros, deallocating where the format
    /// can do so without exposing older data (e.g. from a backing file).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Tell the image the range is no longer used. Afterwards the range reads as
    /// zeros; the space is returned to the host where possible.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Make everything written so far durable.
    fn flush(&self) -> Result<()>;

    /// Whether the whole range is known to read as zeros without reading it
    /// (nothing was ever written there: a hole in a sparse raw file, an
    /// unallocated qcow2 cluster with no backing data). `false` means "unknown",
    /// never "non-zero". Writers of fresh metadata (mkfs) use it to skip writing
    /// zeros that are already there.
    fn known_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }

    /// Whether the handle refuses writes.
    fn is_read_only(&self) -> bool {
        false
    }
}

macro_rules! forward_block_io {
    ($($ty:ty),*) => {$(
        impl<T: BlockIo + ?Sized> BlockIo for $ty {
            fn size(&self) -> u64 { (**self).size() }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> { (**self).read_at(buf, offset) }
            fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> { (**self).write_at(buf, offset) }
            fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> { (**self).write_zeroes(offset, len) }
            fn discard(&self, offset: u64, len: u64) -> Result<()> { (**self).discard(offset, len) }
            fn flush(&self) -> Result<()> { (**self).flush() }
            fn known_zero(&self, offset: u64, len: u64) -> Result<bool> { (**self).known_zero(offset, len) }
            fn is_read_only(&self) -> bool { (**self).is_read_only() }
        }
    )*};
}

forward_block_io!(&T, Box<T>, Arc<T>);
