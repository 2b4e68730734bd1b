//! The storage adaptor we hand imago (see [`HStore`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use imago::file::File as ImFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::StorageOpenOptions;

use super::header::Qcow2Header;
use super::spec::INCOMPAT_COMPRESSION;

/// The storage object we hand imago: an imago file plus one fix-up. QEMU
/// marks zstd images with incompatible feature bit 3, which imago refuses;
/// for such images the bit is hidden from imago's header reads and restored
/// on its header writes, and we read the zstd clusters ourselves.
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
}

/// Byte 79 holds bit 3 of the big-endian incompatible-features field at 72.
const ZSTD_BIT_BYTE: u64 = 79;

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
        })
    }

    pub(super) fn plain(file: File, opts: StorageOpenOptions) -> std::io::Result<Self> {
        Ok(HStore {
            data: file.try_clone()?,
            inner: ImFile::from_open_file(file, opts)?,
            hide_zstd: false,
            top: false,
        })
    }

    fn touches_bit(&self, offset: u64, len: u64) -> bool {
        self.hide_zstd && offset <= ZSTD_BIT_BYTE && offset.saturating_add(len) > ZSTD_BIT_BYTE
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
        if let Some(b) = tmp.get_mut((ZSTD_BIT_BYTE - offset) as usize) {
            *b &= !(INCOMPAT_COMPRESSION as u8);
        }
        bufv.copy_from_slice(&tmp);
        Ok(())
    }
    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> std::io::Result<()> {
        if !self.touches_bit(offset, bufv.len()) {
            // SAFETY: same contract as ours, passed through unchanged.
            return unsafe { self.inner.pure_writev(bufv, offset) };
        }
        let mut tmp = vec![0u8; bufv.len() as usize];
        bufv.copy_into_slice(&mut tmp);
        if let Some(b) = tmp.get_mut((ZSTD_BIT_BYTE - offset) as usize) {
            *b |= INCOMPAT_COMPRESSION as u8;
        }
        // SAFETY: same contract as ours; `tmp` is a private buffer.
        unsafe { self.inner.pure_writev(IoVector::from(&tmp[..]), offset) }
    }
    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }
    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }
    unsafe fn pure_discard(&self, offset: u64, length: u64) -> std::io::Result<()> {
        // SAFETY: same contract as ours, passed through unchanged.
        unsafe { self.inner.pure_discard(offset, length) }
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
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
