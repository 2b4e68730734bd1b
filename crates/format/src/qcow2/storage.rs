//! The storage adaptor we hand imago (see [`HStore`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File as ImFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::StorageOpenOptions;

use super::header::Qcow2Header;
use super::ordering::Ordered;
use super::spec::{INCOMPAT_COMPRESSION, INCOMPAT_DIRTY, INCOMPAT_LOW_BYTE};
use crate::host::read_upto;

/// The storage object we hand imago: an imago file plus two fix-ups. QEMU
/// marks zstd images with incompatible feature bit 3, which imago refuses;
/// for such images the bit is hidden from imago's header reads and restored
/// on its header writes, and we read the zstd clusters ourselves. The dirty
/// bit (bit 0, same byte) is ours to manage (see [`Ordered`]): it is hidden
/// the same way in every qcow2 file, so imago never sees nor clears it.
///
/// For a writable top image every write, write-zeroes, discard and sync
/// passes through the ordering layer, which adds the flushes that make a
/// crash safe.
///
/// It also keeps a descriptor of its own for data reads: guest reads take the
/// mapping from imago and read the data with a plain `pread` (see
/// [`Qcow2Image::read_plain`]).
#[derive(Debug)]
pub(crate) struct HStore {
    inner: ImFile,
    hide_zstd: bool,
    /// Our own descriptor of the file, for data reads.
    pub(super) data: File,
    /// Whether this is the top image's file (whose mappings we cache).
    pub(super) top: bool,
    /// Write ordering of a writable top image.
    pub(super) order: Option<Arc<Ordered>>,
    /// A qcow2 file (whose dirty bit is hidden), not a raw one.
    qcow2: bool,
}

impl HStore {
    pub(super) fn new(
        file: File,
        opts: StorageOpenOptions,
        h: &Qcow2Header,
        top: bool,
    ) -> std::io::Result<Self> {
        Ok(HStore {
            data: file.try_clone()?,
            inner: ImFile::from_open_file(file, opts)?,
            hide_zstd: h.incompatible_features & INCOMPAT_COMPRESSION != 0,
            top,
            order: None,
            qcow2: true,
        })
    }

    pub(super) fn plain(file: File, opts: StorageOpenOptions) -> std::io::Result<Self> {
        Ok(HStore {
            data: file.try_clone()?,
            inner: ImFile::from_open_file(file, opts)?,
            hide_zstd: false,
            top: false,
            order: None,
            qcow2: false,
        })
    }

    fn touches_bit(&self, offset: u64, len: u64) -> bool {
        self.hidden_bits() != 0
            && offset <= INCOMPAT_LOW_BYTE
            && offset.saturating_add(len) > INCOMPAT_LOW_BYTE
    }

    /// The bits of byte 79 imago must not see.
    fn hidden_bits(&self) -> u8 {
        let zstd = if self.hide_zstd {
            INCOMPAT_COMPRESSION as u8
        } else {
            0
        };
        let dirty = if self.qcow2 { INCOMPAT_DIRTY as u8 } else { 0 };
        zstd | dirty
    }

    /// Write through to the file, keeping the bits of byte 79 hidden from
    /// imago as they are on disk.
    ///
    /// # Safety
    /// The contract of [`imago::Storage::pure_writev`].
    unsafe fn write_fixed(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        if !self.touches_bit(offset, bufv.len()) {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { imago::Storage::pure_writev(&self.inner, bufv, offset) };
        }
        let mut tmp = vec![0u8; bufv.len() as usize];
        bufv.copy_into_slice(&mut tmp);
        let mut cur = [0u8; 1];
        read_upto(&self.data, &mut cur, INCOMPAT_LOW_BYTE)?;
        if let Some(b) = tmp.get_mut((INCOMPAT_LOW_BYTE - offset) as usize) {
            *b = (*b & !self.hidden_bits()) | (cur[0] & self.hidden_bits());
        }
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe { imago::Storage::pure_writev(&self.inner, IoVector::from(&tmp[..]), offset) }
    }

    /// Run `op` (a write of `len` bytes at `offset` whose bytes the ordering
    /// layer does not need) between the ordering hooks.
    fn ordered(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let Some(order) = &self.order else {
            return op();
        };
        order.before_write(offset, len)?;
        op()?;
        order.after_write(offset, None, len)
    }
}

impl std::fmt::Display for HStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl imago::Storage for HStore {
    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }
    fn req_align(&self) -> usize {
        self.inner.req_align()
    }
    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }
    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> std::io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }
    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }
    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> std::io::Result<()> {
        if !self.touches_bit(offset, bufv.len()) {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        let mut tmp = vec![0u8; bufv.len() as usize];
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe {
            self.inner
                .pure_readv(IoVectorMut::from(&mut tmp[..]), offset)?
        };
        if let Some(b) = tmp.get_mut((INCOMPAT_LOW_BYTE - offset) as usize) {
            *b &= !self.hidden_bits();
        }
        bufv.copy_from_slice(&tmp);
        Ok(())
    }
    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        let len = bufv.len();
        let Some(order) = &self.order else {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { self.write_fixed(bufv, offset) };
        };
        order.before_write(offset, len)?;
        // The ordering layer needs the bytes of header and L1 writes only.
        if !order.wants_bytes(offset, len) {
            // SAFETY: same contract as ours, passed through unchanged.
            unsafe { self.write_fixed(bufv, offset)? };
            return order.after_write(offset, None, len);
        }
        let mut tmp = vec![0u8; len as usize];
        bufv.copy_into_slice(&mut tmp);
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe { self.write_fixed(IoVector::from(&tmp[..]), offset)? };
        order.after_write(offset, Some(&tmp), len)
    }
    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        self.ordered(offset, length, || unsafe {
            self.inner.pure_write_zeroes(offset, length)
        })
    }
    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        self.ordered(offset, length, || unsafe {
            self.inner.pure_write_allocated_zeroes(offset, length)
        })
    }
    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        self.ordered(offset, length, || unsafe {
            self.inner.pure_discard(offset, length)
        })
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn sync(&self) -> std::io::Result<()> {
        // The ordering layer remembers which writes a sync covered.
        match &self.order {
            Some(o) => o.sync(),
            None => self.inner.sync(),
        }
    }
    fn settle_writes(&self) -> std::io::Result<()> {
        self.inner.settle_writes()
    }
    unsafe fn invalidate_cache(&self) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.invalidate_cache() }
    }
    fn get_storage_helper(&self) -> &imago::storage::drivers::CommonStorageHelper {
        self.inner.get_storage_helper()
    }
    fn resize(
        &self,
        new_size: u64,
        prealloc_mode: imago::storage::PreallocateMode,
    ) -> std::io::Result<()> {
        self.inner.resize(new_size, prealloc_mode)
    }
}
