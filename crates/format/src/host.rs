//! Host file system calls, in one place for every vmvol crate: positional
//! reads, `SEEK_DATA`/`SEEK_HOLE` iteration, `fallocate`, `copy_file_range`,
//! reflinks (`FICLONE`), allocated bytes, `statvfs`, device numbers,
//! directory fsync and atomic output files.
//!
//! Everything returns [`std::io::Result`], so each crate wraps errors in its
//! own type with the object and operation it was working on. This is the
//! only module of the crate with `unsafe` code (each block is a syscall).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Error as IoError, ErrorKind, Result as IoResult};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ByteRange;

/// Read as much of `buf` as the file holds at `offset`; returns the byte
/// count (short only at the end of the file). `EINTR` is retried.
pub fn read_upto(file: &File, buf: &mut [u8], offset: u64) -> IoResult<usize> {
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or_default();
        match file.read_at(rest, offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A new open file description of the file `file` is open on (read-only),
/// or `None` if it cannot be made (no `/proc`) or is not the same file.
///
/// `dup` shares one description, whose reference count every `pread` from a
/// multi-threaded process increments and decrements: threads reading
/// through one description bounce that cache line between CPUs. Readers on
/// separate descriptions do not (docs/performance.md, issue 8).
pub fn reopen_read_only(file: &File) -> Option<File> {
    let again = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let (a, b) = (file.metadata().ok()?, again.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(again)
}

/// Fill `buf` from the file at `offset`; bytes past the end of the file read
/// as zeros (as a disk image's unwritten tail does).
pub fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> IoResult<()> {
    let got = read_upto(file, buf, offset)?;
    buf.get_mut(got..).unwrap_or_default().fill(0);
    Ok(())
}

fn to_off(v: u64) -> IoResult<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| IoError::from(ErrorKind::InvalidInput))
}

/// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `Ok(None)` for `ENXIO` (no
/// such region before the end of the file).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> IoResult<Option<u64>> {
    let off = to_off(offset)?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is owned by
    // `file`. Callers use the returned offset, never the file position (all
    // I/O here is positional), so moving the position is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = IoError::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Whether the file holds data at `pos`, and for how long that stays true
/// (capped at `end`, which must be greater than `pos`). Positions past the
/// end of the file are holes; a file system without `SEEK_DATA` reports
/// everything as data.
pub fn extent_at(file: &File, pos: u64, end: u64) -> IoResult<(bool, u64)> {
    let next_data = match seek(file, pos, libc::SEEK_DATA) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((true, end - pos)),
        Err(e) => return Err(e),
    };
    match next_data {
        Some(d) if d <= pos => {
            let hole = seek(file, pos, libc::SEEK_HOLE)?.unwrap_or(end);
            Ok((true, hole.clamp(pos + 1, end) - pos))
        }
        Some(d) => Ok((false, d.min(end) - pos)),
        None => Ok((false, end - pos)),
    }
}

/// The data extents of `file` in `[start, end)`, in order (holes skipped).
pub fn data_extents(file: &File, start: u64, end: u64) -> DataExtents<'_> {
    DataExtents {
        file,
        pos: start,
        end,
    }
}

/// Iterator returned by [`data_extents`].
#[derive(Debug)]
pub struct DataExtents<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Iterator for DataExtents<'_> {
    type Item = IoResult<ByteRange>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos < self.end {
            let (data, run) = match extent_at(self.file, self.pos, self.end) {
                Ok(x) => x,
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            };
            let at = self.pos;
            self.pos += run;
            if data {
                return Some(Ok(ByteRange::new(at, run)));
            }
        }
        None
    }
}

/// What [`fallocate`] does to a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Falloc {
    /// Reserve blocks (reading as zeros); may extend the file.
    Allocate,
    /// Free the blocks; the range reads as zeros; the length stays.
    PunchHole,
    /// Make the range read as zeros, keeping it allocated.
    ZeroRange,
}

/// `fallocate(2)` on `[offset, offset + len)`; `EINTR` is retried.
pub fn fallocate(file: &File, what: Falloc, offset: u64, len: u64) -> IoResult<()> {
    let mode = match what {
        Falloc::Allocate => 0,
        Falloc::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        Falloc::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
    };
    let (off, l) = (to_off(offset)?, to_off(len)?);
    loop {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is
        // owned by `file`, which outlives the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(());
        }
        let e = IoError::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Copy `len` bytes at `offset` of `src` to the same offset of `dst` in the
/// kernel (`copy_file_range(2)`). Returns the bytes copied: fewer than `len`
/// only if `src` ends first. Errors such as `EXDEV`, `ENOSYS`, `EOPNOTSUPP`
/// and `EINVAL` mean "not possible here" (see [`is_unsupported`]).
pub fn copy_file_range(src: &File, dst: &File, offset: u64, len: u64) -> IoResult<u64> {
    let mut in_off = to_off(offset)?;
    let mut out_off = in_off;
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 30)).unwrap_or(1 << 30);
        // SAFETY: the offsets point to live locals; both descriptors are open
        // for the duration of the call.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut in_off,
                dst.as_raw_fd(),
                &mut out_off,
                n,
                0,
            )
        };
        if r < 0 {
            let e = IoError::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        left = left.saturating_sub(r as u64);
    }
    Ok(len - left)
}

/// Whether an error of [`copy_file_range`], [`reflink`] or [`fallocate`]
/// means the file system cannot do it (rather than that it failed).
pub fn is_unsupported(e: &IoError) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
    )
}

/// Make `dst` share all of `src`'s blocks (`FICLONE`, a reflink).
pub fn reflink(src: &File, dst: &File) -> IoResult<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and
    // touches no memory; both descriptors are open for the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(IoError::last_os_error())
    }
}

/// Bytes the file occupies on the host (`st_blocks * 512`).
pub fn allocated_bytes(file: &File) -> IoResult<u64> {
    Ok(allocated_bytes_of(&file.metadata()?))
}

/// Bytes occupied on the host by what `meta` describes (`st_blocks * 512`;
/// `st_blocks` counts 512-byte units whatever the file system's block size).
pub fn allocated_bytes_of(meta: &std::fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
}

/// Size figures of the host file system holding a path ([`statvfs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsSpace {
    /// Size of the file system in bytes (`f_blocks * f_frsize`).
    pub total: u64,
    /// Bytes an unprivileged user may still allocate (`f_bavail * f_frsize`).
    pub available: u64,
    /// The fundamental block size (`f_frsize`).
    pub block_size: u64,
}

/// `statvfs(2)` of the file system holding `path`.
// The casts are no-ops on 64-bit Linux but not where fsblkcnt_t is 32 bits.
#[allow(clippy::unnecessary_cast)]
pub fn statvfs(path: &Path) -> IoResult<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| IoError::from(ErrorKind::InvalidInput))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st`
    // points to writable memory of the right type, which statvfs fills on
    // success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(IoError::last_os_error());
    }
    // SAFETY: rc == 0, so statvfs initialised `st`.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize as u64;
    Ok(FsSpace {
        total: (st.f_blocks as u64).saturating_mul(frsize),
        available: (st.f_bavail as u64).saturating_mul(frsize),
        block_size: frsize,
    })
}

/// The major and minor numbers of a device number (`st_rdev`), in the
/// host C library's encoding.
pub fn device_numbers(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// Size of a block device (`BLKGETSIZE64`).
pub fn block_device_size(file: &File) -> IoResult<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live local of that type.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x8008_1272, &mut size as *mut u64) };
    if r < 0 {
        return Err(IoError::last_os_error());
    }
    Ok(size)
}

/// Create `path` for reading and writing (mode 0644); fails with
/// [`ErrorKind::AlreadyExists`] if anything is there.
pub fn create_new(path: &Path) -> IoResult<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
}

/// fsync the directory holding `path`, so a rename or create in it is durable.
pub fn fsync_parent(path: &Path) -> IoResult<()> {
    fsync_dir(&parent_dir(path))
}

/// fsync the directory `dir`, so a rename, create or removal in it is durable.
pub fn fsync_dir(dir: &Path) -> IoResult<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `path` (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `flock(2)`: an exclusive lock, waiting for it or not. `Ok(false)` when
/// `wait` is false and another open file holds it.
fn flock_exclusive(file: &File, wait: bool) -> IoResult<bool> {
    let op = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock only reads its integer arguments; the descriptor is
        // owned by `file`.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = IoError::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Suffix of every atomic output's temporary file.
const TEMP_SUFFIX: &str = ".vmvol-tmp";

/// The name prefix of `target`'s temporary files: `.NAME.`.
fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.")
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// How [`AtomicFile::commit`] puts the file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Replace an existing target (else fail with `AlreadyExists`).
    pub replace: bool,
    /// Permission bits to give the file.
    pub mode: u32,
    /// fsync the file before the rename and the directory after it. Without
    /// it a crash soon after may leave an incomplete file under the name.
    pub durable: bool,
}

/// A file being built beside its final name, `.NAME.XXXXXX.vmvol-tmp`,
/// renamed into place by [`AtomicFile::commit`] and removed if dropped
/// before that (error or cancellation).
///
/// While its writer lives the file is held by an exclusive `flock`, so
/// [`remove_dead_temps`] can tell the leftovers of a killed process (no
/// lock) from outputs in progress (locked), and removes only the former.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    path: tempfile::TempPath,
}

impl AtomicFile {
    /// Create the temporary file for `target` in `target`'s directory.
    pub fn new(target: &Path) -> IoResult<AtomicFile> {
        loop {
            let t = tempfile::Builder::new()
                .prefix(&temp_prefix(target))
                .suffix(TEMP_SUFFIX)
                .tempfile_in(parent_dir(target))?;
            let (file, path) = t.into_parts();
            flock_exclusive(&file, true)?;
            // A cleaner may have taken the lock between create and flock and
            // removed the name: then start again with a fresh name.
            match std::fs::symlink_metadata(&path) {
                Ok(m) if same_file(&m, &file.metadata()?) => {
                    return Ok(AtomicFile { file, path });
                }
                _ => {
                    // Not ours any more: forget the name without removing it.
                    let _ = path.keep();
                }
            }
        }
    }

    /// The open temporary file (read-write).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its current path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Put the file at `target`: set its mode, (fsync), rename, (fsync the
    /// directory). Returns the file, still open.
    pub fn commit(self, target: &Path, how: Commit) -> IoResult<File> {
        if how.durable {
            self.file.sync_all()?;
        }
        self.file
            .set_permissions(std::fs::Permissions::from_mode(how.mode))?;
        if how.replace {
            self.path.persist(target).map_err(|e| e.error)?;
        } else {
            self.path.persist_noclobber(target).map_err(|e| e.error)?;
        }
        if how.durable {
            fsync_parent(target)?;
        }
        Ok(self.file)
    }
}

/// Write `bytes` to `path` atomically: a reader sees the old content or the
/// new, never a mix, and after a crash the file holds one of them.
/// Replaces an existing file; new files get mode 0644.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> IoResult<()> {
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => 0o644,
    };
    let t = AtomicFile::new(path)?;
    t.file().write_all_at(bytes, 0)?;
    t.commit(
        path,
        Commit {
            replace: true,
            mode,
            durable: true,
        },
    )?;
    Ok(())
}

/// Whether `name` has the form of an [`AtomicFile`]'s temporary file,
/// `.NAME.XXXXXX.vmvol-tmp`, for any target name. Listings use it to leave
/// such files out; whether one is dead is for [`remove_if_dead`] to say.
pub fn is_temp_name(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.strip_prefix('.')
        .and_then(|r| r.strip_suffix(TEMP_SUFFIX))
        .and_then(|r| r.rsplit_once('.'))
        .is_some_and(|(target, random)| !target.is_empty() && !random.is_empty())
}

/// Remove `path`, an [`AtomicFile`]'s temporary file, if its writer is gone
/// (no process holds its lock). Returns whether it was removed; a file that
/// is gone already, is not a regular file, or is held by a live writer is
/// left alone (`Ok(false)`).
pub fn remove_if_dead(path: &Path) -> IoResult<bool> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() || !flock_exclusive(&file, false)? {
        return Ok(false);
    }
    // Holding the lock: the name still being this file means nobody owns it.
    match std::fs::symlink_metadata(path) {
        Ok(m) if same_file(&m, &file.metadata()?) => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        },
        _ => Ok(false),
    }
}

/// Remove the temporary files of `target` (see [`AtomicFile`]) whose writer
/// is gone: killed processes leave them behind. Files still held by a live
/// writer are left alone. Returns the paths removed.
pub fn remove_dead_temps(target: &Path) -> IoResult<Vec<PathBuf>> {
    let prefix = temp_prefix(target);
    let dir = parent_dir(target);
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(middle) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(TEMP_SUFFIX))
        else {
            continue;
        };
        // Only our own pattern: a random part without dots.
        if middle.is_empty() || middle.contains('.') {
            continue;
        }
        let path = entry.path();
        if remove_if_dead(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}
