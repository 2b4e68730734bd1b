//! `populate`: make an ext4 filesystem holding a directory tree or a tar archive.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmvol_format::{host, BlockIo, Control};

use crate::build::{Builder, DirBuild};
use crate::ext4::field::{put32, put_bytes};
use crate::ext4::records::{self as disk, Inode, Times};
use crate::layout::{default_journal_blocks, Geometry};
use crate::mkfs::{Journal, MkfsOptions, MkfsReport};
use crate::{Error, Result};

const ROOT_INO: u32 = 2;
/// Read size for file data.
const CHUNK: usize = 1 << 20;

/// Limits applied to a populate source (tar archives are untrusted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PopulateLimits {
    /// Largest total of file data, in bytes (declared sizes, holes included).
    pub max_total_bytes: u64,
    /// Largest number of entries (files, directories, links, ...).
    pub max_entries: u64,
}

impl Default for PopulateLimits {
    fn default() -> Self {
        PopulateLimits {
            max_total_bytes: 1 << 40,
            max_entries: 1_000_000,
        }
    }
}

/// Options of [`populate`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PopulateOptions {
    /// How the filesystem is made.
    pub mkfs: MkfsOptions,
    /// Limits on the source.
    pub limits: PopulateLimits,
}

/// Where the content comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A directory tree on the host; its root's mode, owner and times become
    /// the filesystem root's.
    Dir(PathBuf),
    /// A tar archive file, plain or gzip-compressed (detected by magic).
    Tar(PathBuf),
}

/// What [`populate`] made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PopulateReport {
    /// The filesystem.
    pub mkfs: MkfsReport,
    /// Regular files (each inode once).
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Extra names of hard-linked files.
    pub hard_links: u64,
    /// Device nodes, fifos and sockets.
    pub specials: u64,
    /// Bytes of file content (holes excluded).
    pub data_bytes: u64,
}

/// Metadata of one entry to create.
struct Meta {
    mode: u16,
    uid: u32,
    gid: u32,
    times: Times,
}

struct Populator<'a> {
    b: Builder<'a>,
    /// Path (normalised, no leading slash; "" is the root) -> inode.
    paths: HashMap<Vec<u8>, u32>,
    limits: PopulateLimits,
    entries: u64,
    total_bytes: u64,
    report: Counts,
    control: &'a Control,
}

#[derive(Default)]
struct Counts {
    files: u64,
    dirs: u64,
    symlinks: u64,
    hard_links: u64,
    specials: u64,
    data: u64,
}

fn refused(entry: &[u8], reason: impl Into<String>) -> Error {
    Error::EntryRefused {
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason: reason.into(),
    }
}

/// Normalise an archive path: strip `./` and trailing slashes; refuse absolute
/// paths, `..`, names over 255 bytes and paths over 4096 bytes.
fn normalise(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.len() > 4096 {
        return Err(refused(
            raw.get(..64).unwrap_or_default(),
            format!("path of {} bytes is longer than 4096 bytes", raw.len()),
        ));
    }
    if raw.first() == Some(&b'/') {
        return Err(refused(raw, "absolute path"));
    }
    if raw.contains(&0) {
        return Err(refused(raw, "NUL byte in path"));
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(refused(raw, "path contains `..`")),
            c if c.len() > 255 => return Err(refused(raw, "name longer than 255 bytes")),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (
            path.get(..i).unwrap_or_default(),
            path.get(i + 1..).unwrap_or_default(),
        ),
        None => (&[], path),
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl<'a> Populator<'a> {
    /// Report progress (file data bytes copied so far; the total is not
    /// known in advance, so it is reported as 0), then stop if cancelled.
    fn check_cancel(&self) -> Result<()> {
        self.control.report(self.report.data, 0);
        self.b.check_cancel()
    }

    fn count_entry(&mut self, entry: &[u8]) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(Error::LimitExceeded {
                what: "entry count",
                reason: format!(
                    "entry {:?} is beyond the limit of {} entries",
                    String::from_utf8_lossy(entry),
                    self.limits.max_entries
                ),
            });
        }
        Ok(())
    }

    fn count_bytes(&mut self, entry: &[u8], n: u64) -> Result<()> {
        self.total_bytes = self.total_bytes.saturating_add(n);
        if self.total_bytes > self.limits.max_total_bytes {
            return Err(Error::LimitExceeded {
                what: "total bytes",
                reason: format!(
                    "entry {:?} brings the content past the limit of {} bytes",
                    String::from_utf8_lossy(entry),
                    self.limits.max_total_bytes
                ),
            });
        }
        Ok(())
    }

    /// The directory inode for `path`, creating missing directories (mode 0755).
    fn dir_for(&mut self, path: &[u8]) -> Result<u32> {
        // Find the deepest existing ancestor, then create downwards
        // (iterative: hostile paths may be very deep).
        let mut missing: Vec<usize> = Vec::new();
        let mut cur = path.len();
        let mut ino = loop {
            let prefix = path.get(..cur).unwrap_or_default();
            if let Some(&ino) = self.paths.get(prefix) {
                if !self.b.dirs.contains_key(&ino) {
                    return Err(refused(prefix, "is used as a directory but is not one"));
                }
                break ino;
            }
            missing.push(cur);
            cur = prefix.iter().rposition(|&c| c == b'/').unwrap_or(0);
        };
        while let Some(end) = missing.pop() {
            let prefix = path.get(..end).unwrap_or_default();
            self.count_entry(prefix)?;
            let meta = Meta {
                mode: disk::S_IFDIR | 0o755,
                uid: 0,
                gid: 0,
                times: Times::all(self.b.now),
            };
            ino = self.new_dir(ino, prefix, meta)?;
        }
        Ok(ino)
    }

    fn new_dir(&mut self, parent: u32, path: &[u8], meta: Meta) -> Result<u32> {
        let ino = self.b.alloc_ino()?;
        let (_, name) = split_parent(path);
        self.b
            .inodes
            .insert(ino, Inode::new(meta.mode, meta.uid, meta.gid, meta.times));
        self.b.dirs.insert(
            ino,
            DirBuild {
                parent,
                entries: Vec::new(),
                min_blocks: 1,
            },
        );
        self.b.add_entry(parent, name.to_vec(), ino, 2)?;
        self.paths.insert(path.to_vec(), ino);
        self.report.dirs += 1;
        Ok(ino)
    }

    /// Create a non-directory inode at `path`; refuses an existing name.
    fn new_node(&mut self, path: &[u8], meta: &Meta) -> Result<(u32, Inode)> {
        if path.is_empty() {
            return Err(refused(path, "the root can only be a directory"));
        }
        if self.paths.contains_key(path) {
            return Err(refused(path, "duplicate entry"));
        }
        let (parent, name) = split_parent(path);
        let pino = self.dir_for(parent)?;
        let ino = self.b.alloc_ino()?;
        self.b
            .add_entry(pino, name.to_vec(), ino, disk::ftype(meta.mode))?;
        self.paths.insert(path.to_vec(), ino);
        let mut inode = Inode::new(meta.mode, meta.uid, meta.gid, meta.times);
        inode.set_links(1);
        Ok((ino, inode))
    }

    /// A directory entry: create, or update the metadata of an existing one.
    fn add_dir(&mut self, path: &[u8], meta: Meta) -> Result<()> {
        if let Some(&ino) = self.paths.get(path) {
            if !self.b.dirs.contains_key(&ino) {
                return Err(refused(path, "duplicate entry (not a directory)"));
            }
            let links = self.b.inodes.get(&ino).map(|i| i.links()).unwrap_or(0);
            let mut inode = Inode::new(meta.mode, meta.uid, meta.gid, meta.times);
            inode.set_links(links);
            self.b.inodes.insert(ino, inode);
            return Ok(());
        }
        let (parent, _) = split_parent(path);
        let pino = self.dir_for(parent)?;
        self.new_dir(pino, path, meta)?;
        Ok(())
    }

    /// Feed file content: `buf` holds the bytes at `logical_block` (block aligned).
    /// All-zero blocks stay holes.
    fn push_data(
        &mut self,
        runs: &mut Vec<(u64, u64, u64)>,
        logical_block: u64,
        buf: &[u8],
    ) -> Result<()> {
        let bs = self.b.g.bs() as usize;
        let mut i = 0usize;
        let nblocks = buf.len().div_ceil(bs);
        while i < nblocks {
            let blk = |k: usize| {
                buf.get(k * bs..((k + 1) * bs).min(buf.len()))
                    .unwrap_or_default()
            };
            if is_zero(blk(i)) {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < nblocks && !is_zero(blk(j)) {
                j += 1;
            }
            let n = (j - i) as u64;
            let phys = self.b.alloc_data(n)?;
            let mut l = logical_block + i as u64;
            let mut k = i;
            for (s, len) in phys {
                let from = k * bs;
                let to = ((k + len as usize) * bs).min(buf.len());
                let data = buf.get(from..to).unwrap_or_default();
                if data.len() % bs == 0 {
                    self.b.write_data(s, data)?;
                } else {
                    let mut padded = data.to_vec();
                    padded.resize(data.len().div_ceil(bs) * bs, 0);
                    self.b.write_data(s, &padded)?;
                }
                match runs.last_mut() {
                    Some(last) if last.0 + last.2 == l && last.1 + last.2 == s => last.2 += len,
                    _ => runs.push((l, s, len)),
                }
                l += len;
                k += len as usize;
            }
            self.report.data += (j * bs).min(buf.len()).saturating_sub(i * bs) as u64;
            i = j;
        }
        Ok(())
    }

    fn finish_file(
        &mut self,
        ino: u32,
        mut inode: Inode,
        size: u64,
        runs: &[(u64, u64, u64)],
    ) -> Result<()> {
        let tree = self.b.map_extents(ino, &mut inode, runs)?;
        let data: u64 = runs.iter().map(|r| r.2).sum();
        inode.set_size(size);
        inode.set_blocks(data + tree, self.b.g.block_size);
        self.b.inodes.insert(ino, inode);
        self.report.files += 1;
        Ok(())
    }

    fn add_symlink(&mut self, path: &[u8], meta: Meta, target: &[u8]) -> Result<()> {
        if target.is_empty() {
            return Err(refused(path, "empty symlink target"));
        }
        let bs = self.b.g.bs() as usize;
        if target.len() >= bs {
            return Err(refused(
                path,
                format!(
                    "symlink target of {} bytes does not fit in a block",
                    target.len()
                ),
            ));
        }
        let (ino, mut inode) = self.new_node(path, &meta)?;
        inode.set_size(target.len() as u64);
        if target.len() < 60 {
            put_bytes(inode.i_block(), 0, target);
            inode.set_blocks(0, self.b.g.block_size);
            self.b.inodes.insert(ino, inode);
        } else {
            let runs = self.b.alloc_data(1)?;
            let (s, _) = runs
                .first()
                .copied()
                .ok_or_else(|| Error::corrupt("internal: no block"))?;
            let mut blk = vec![0u8; bs];
            put_bytes(&mut blk, 0, target);
            self.b.write_data(s, &blk)?;
            let tree = self.b.map_extents(ino, &mut inode, &[(0, s, 1)])?;
            inode.set_blocks(1 + tree, self.b.g.block_size);
            self.b.inodes.insert(ino, inode);
        }
        self.report.symlinks += 1;
        Ok(())
    }

    fn add_special(&mut self, path: &[u8], meta: Meta, major: u32, minor: u32) -> Result<()> {
        let (ino, mut inode) = self.new_node(path, &meta)?;
        let t = meta.mode & 0o170000;
        if t == disk::S_IFCHR || t == disk::S_IFBLK {
            if major < 256 && minor < 256 {
                put32(inode.i_block(), 0, (major << 8) | minor);
            } else {
                put32(
                    inode.i_block(),
                    4,
                    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
                );
            }
        }
        self.b.inodes.insert(ino, inode);
        self.report.specials += 1;
        Ok(())
    }

    fn add_hardlink(&mut self, path: &[u8], target: &[u8]) -> Result<()> {
        if self.paths.contains_key(path) {
            return Err(refused(path, "duplicate entry"));
        }
        let tino = *self.paths.get(target).ok_or_else(|| {
            refused(
                path,
                format!(
                    "hard link target {:?} is not an earlier entry",
                    String::from_utf8_lossy(target)
                ),
            )
        })?;
        if self.b.dirs.contains_key(&tino) {
            return Err(refused(path, "hard link to a directory"));
        }
        let (parent, name) = split_parent(path);
        let pino = self.dir_for(parent)?;
        let inode = self
            .b
            .inodes
            .get_mut(&tino)
            .ok_or_else(|| Error::corrupt("internal: hard link target inode missing"))?;
        let links = inode.links();
        if links >= 65000 {
            return Err(refused(path, "too many hard links"));
        }
        inode.set_links(links + 1);
        let ft = disk::ftype(inode.mode());
        self.b.add_entry(pino, name.to_vec(), tino, ft)?;
        self.paths.insert(path.to_vec(), tino);
        self.report.hard_links += 1;
        Ok(())
    }
}

fn mode16(entry: &[u8], kind: u16, mode: u32) -> Result<u16> {
    if mode & !0o7777 & !0o170000 != 0 {
        return Err(refused(entry, format!("invalid mode {mode:o}")));
    }
    Ok(kind | (mode & 0o7777) as u16)
}

fn id32(entry: &[u8], what: &str, v: u64) -> Result<u32> {
    u32::try_from(v).map_err(|_| refused(entry, format!("{what} {v} does not fit in 32 bits")))
}

/// Make an ext4 filesystem over the whole of `dev` holding the content of
/// `source`.
///
/// The device is formatted: anything on it is lost. Invalid options and a
/// missing source are refused before anything is written. Any later error
/// (refused entry, limit, full filesystem, I/O) or a cancel discards the whole
/// device (it reads as zeros afterwards), so no half-written filesystem is
/// left; the caller typically deletes the image.
pub fn populate(
    dev: &dyn BlockIo,
    source: &Source,
    opts: &PopulateOptions,
    control: &Control,
) -> Result<PopulateReport> {
    match source {
        Source::Dir(dir) => {
            let md = std::fs::symlink_metadata(dir).map_err(io_err(dir, "stat"))?;
            if !md.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            crate::build::discard_on_error(dev, &opts.mkfs, || {
                populate_dir_inner(dev, dir, opts, control)
            })
        }
        Source::Tar(path) => {
            let f = File::open(path).map_err(|e| Error::Io {
                path: path.clone(),
                op: "open tar archive",
                source: e,
            })?;
            crate::build::discard_on_error(dev, &opts.mkfs, || {
                populate_tar_inner(dev, f, opts, control)
            })
        }
    }
}

/// Like [`populate`] from a tar stream (plain or gzip, detected by magic).
pub fn populate_tar(
    dev: &dyn BlockIo,
    reader: impl Read,
    opts: &PopulateOptions,
    control: &Control,
) -> Result<PopulateReport> {
    crate::build::discard_on_error(dev, &opts.mkfs, || {
        populate_tar_inner(dev, reader, opts, control)
    })
}

fn start<'a>(
    dev: &'a dyn BlockIo,
    opts: &PopulateOptions,
    control: &'a Control,
) -> Result<Populator<'a>> {
    let b = Builder::new(dev, &opts.mkfs, control, "populate")?;
    let mut paths = HashMap::new();
    paths.insert(Vec::new(), ROOT_INO);
    Ok(Populator {
        b,
        paths,
        limits: opts.limits.clone(),
        entries: 0,
        total_bytes: 0,
        report: Counts {
            dirs: 1,
            ..Counts::default()
        },
        control,
    })
}

fn end(p: Populator<'_>) -> Result<PopulateReport> {
    let c = p.report;
    let f = p.b.finish()?;
    Ok(PopulateReport {
        mkfs: MkfsReport::from_finished(&f),
        files: c.files,
        directories: c.dirs,
        symlinks: c.symlinks,
        hard_links: c.hard_links,
        specials: c.specials,
        data_bytes: c.data,
    })
}

fn times_of(md: &std::fs::Metadata, now: i64) -> Times {
    Times {
        atime: (md.atime(), md.atime_nsec() as u32),
        ctime: (md.ctime(), md.ctime_nsec() as u32),
        mtime: (md.mtime(), md.mtime_nsec() as u32),
        crtime: (now, 0),
    }
}

fn io_err<'p>(path: &'p Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn populate_dir_inner(
    dev: &dyn BlockIo,
    root: &Path,
    opts: &PopulateOptions,
    control: &Control,
) -> Result<PopulateReport> {
    let md = std::fs::symlink_metadata(root).map_err(io_err(root, "stat"))?;
    if !md.is_dir() {
        return Err(Error::invalid(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut p = start(dev, opts, control)?;
    let now = p.b.now;
    let root_inode = Inode::new(
        mode16(b"", disk::S_IFDIR, md.mode())?,
        md.uid(),
        md.gid(),
        times_of(&md, now),
    );
    p.b.inodes.insert(ROOT_INO, root_inode);
    let mut hard: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    let mut done = 0u64;
    while let Some((host, rel)) = stack.pop() {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&host)
            .map_err(io_err(&host, "read directory"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err(&host, "read directory"))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            p.check_cancel()?;
            let hp = host.join(&name);
            let nb = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
            let mut path = rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(nb);
            if nb.len() > 255 {
                return Err(refused(&path, "name longer than 255 bytes"));
            }
            p.count_entry(&path)?;
            let md = std::fs::symlink_metadata(&hp).map_err(io_err(&hp, "stat"))?;
            let ft = md.file_type();
            let times = times_of(&md, now);
            let (uid, gid) = (md.uid(), md.gid());
            if ft.is_dir() {
                let meta = Meta {
                    mode: mode16(&path, disk::S_IFDIR, md.mode())?,
                    uid,
                    gid,
                    times,
                };
                p.add_dir(&path, meta)?;
                subdirs.push((hp, path));
                continue;
            }
            if !ft.is_dir() && md.nlink() > 1 {
                if let Some(first) = hard.get(&(md.dev(), md.ino())) {
                    let first = first.clone();
                    p.add_hardlink(&path, &first)?;
                    continue;
                }
                hard.insert((md.dev(), md.ino()), path.clone());
            }
            if ft.is_file() {
                let meta = Meta {
                    mode: mode16(&path, disk::S_IFREG, md.mode())?,
                    uid,
                    gid,
                    times,
                };
                p.count_bytes(&path, md.len())?;
                let (ino, inode) = p.new_node(&path, &meta)?;
                let runs = copy_host_file(&mut p, &hp, &path, md.len())?;
                p.finish_file(ino, inode, md.len(), &runs)?;
                done += md.len();
                control.report(done, 0);
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&hp).map_err(io_err(&hp, "read symlink"))?;
                let meta = Meta {
                    mode: disk::S_IFLNK | 0o777,
                    uid,
                    gid,
                    times,
                };
                p.add_symlink(
                    &path,
                    meta,
                    std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()),
                )?;
            } else {
                let kind = if ft.is_char_device() {
                    disk::S_IFCHR
                } else if ft.is_block_device() {
                    disk::S_IFBLK
                } else if ft.is_fifo() {
                    disk::S_IFIFO
                } else {
                    disk::S_IFSOCK
                };
                let rdev = md.rdev();
                let meta = Meta {
                    mode: mode16(&path, kind, md.mode())?,
                    uid,
                    gid,
                    times,
                };
                let (major, minor) = host::device_numbers(rdev);
                p.add_special(&path, meta, major, minor)?;
            }
        }
        // Depth-first, in name order.
        for d in subdirs.into_iter().rev() {
            stack.push(d);
        }
    }
    end(p)
}

/// Copy a host file's data extents (SEEK_DATA/SEEK_HOLE), leaving holes unmapped.
fn copy_host_file(
    p: &mut Populator<'_>,
    hp: &Path,
    entry: &[u8],
    len: u64,
) -> Result<Vec<(u64, u64, u64)>> {
    use std::os::unix::fs::FileExt;
    let f = File::open(hp).map_err(io_err(hp, "open"))?;
    let bs = p.b.g.bs();
    let mut runs = Vec::new();
    // End of what is copied so far: extents that share a block with the
    // previous one start after it.
    let mut copied = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for ext in host::data_extents(&f, 0, len) {
        p.check_cancel()?;
        let ext =
            ext.map_err(|e| refused(entry, format!("finding data in {}: {e}", hp.display())))?;
        // Whole blocks from the one holding the extent's start to the one
        // holding its end (or the end of the file).
        let seg_end = (ext.end().div_ceil(bs) * bs).min(len);
        let mut off = (ext.offset / bs * bs).max(copied);
        while off < seg_end {
            let want = ((seg_end - off).min(CHUNK as u64)) as usize;
            let chunk = buf.get_mut(..want).unwrap_or_default();
            f.read_exact_at(chunk, off).map_err(|e| {
                refused(
                    entry,
                    format!(
                        "reading {}: {e} (file changed while copying?)",
                        hp.display()
                    ),
                )
            })?;
            let chunk = buf.get(..want).unwrap_or_default().to_vec();
            p.push_data(&mut runs, off / bs, &chunk)?;
            off += want as u64;
        }
        copied = copied.max(off);
    }
    Ok(runs)
}

fn tar_err(entry: &[u8], e: std::io::Error) -> Error {
    let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated archive"
    } else {
        "unreadable archive"
    };
    refused(entry, format!("{what}: {e}"))
}

fn populate_tar_inner(
    dev: &dyn BlockIo,
    reader: impl Read,
    opts: &PopulateOptions,
    control: &Control,
) -> Result<PopulateReport> {
    let mut br = BufReader::with_capacity(CHUNK, reader);
    let head = br.fill_buf().map_err(|e| tar_err(b"<archive>", e))?;
    let gz = head.len() >= 2 && head.first() == Some(&0x1f) && head.get(1) == Some(&0x8b);
    if gz {
        populate_tar_stream(dev, flate2::bufread::MultiGzDecoder::new(br), opts, control)
    } else {
        populate_tar_stream(dev, br, opts, control)
    }
}

fn populate_tar_stream(
    dev: &dyn BlockIo,
    reader: impl Read,
    opts: &PopulateOptions,
    control: &Control,
) -> Result<PopulateReport> {
    let mut p = start(dev, opts, control)?;
    let mut ar = tar::Archive::new(reader);
    let entries = ar.entries().map_err(|e| tar_err(b"<archive>", e))?;
    let mut last: Vec<u8> = b"<start of archive>".to_vec();
    let mut done = 0u64;
    let bs = p.b.g.bs() as usize;
    let mut buf = vec![0u8; CHUNK];
    for entry in entries {
        p.check_cancel()?;
        let mut entry = entry.map_err(|e| {
            tar_err(
                format!("after {}", String::from_utf8_lossy(&last)).as_bytes(),
                e,
            )
        })?;
        let raw_path = entry.path_bytes().into_owned();
        last.clone_from(&raw_path);
        let path = normalise(&raw_path)?;
        let h = entry.header();
        let et = h.entry_type();
        if et.is_pax_global_extensions()
            || et.is_pax_local_extensions()
            || et.is_gnu_longname()
            || et.is_gnu_longlink()
        {
            continue;
        }
        p.count_entry(&raw_path)?;
        let mode = h.mode().map_err(|e| tar_err(&raw_path, e))?;
        let uid = id32(
            &raw_path,
            "uid",
            h.uid().map_err(|e| tar_err(&raw_path, e))?,
        )?;
        let gid = id32(
            &raw_path,
            "gid",
            h.gid().map_err(|e| tar_err(&raw_path, e))?,
        )?;
        let mtime = h.mtime().map_err(|e| tar_err(&raw_path, e))?;
        let mtime = i64::try_from(mtime).map_err(|_| refused(&raw_path, "mtime out of range"))?;
        let times = Times {
            atime: (mtime, 0),
            ctime: (mtime, 0),
            mtime: (mtime, 0),
            crtime: (p.b.now, 0),
        };
        if et.is_dir() {
            let meta = Meta {
                mode: mode16(&raw_path, disk::S_IFDIR, mode)?,
                uid,
                gid,
                times,
            };
            if path.is_empty() {
                let links = p.b.inodes.get(&ROOT_INO).map(|i| i.links()).unwrap_or(0);
                let mut inode = Inode::new(meta.mode, uid, gid, times);
                inode.set_links(links);
                p.b.inodes.insert(ROOT_INO, inode);
            } else {
                p.add_dir(&path, meta)?;
            }
        } else if et.is_file() || et == tar::EntryType::Continuous || et.is_gnu_sparse() {
            let size = entry.size();
            p.count_bytes(&raw_path, size)?;
            let meta = Meta {
                mode: mode16(&raw_path, disk::S_IFREG, mode)?,
                uid,
                gid,
                times,
            };
            let (ino, inode) = p.new_node(&path, &meta)?;
            let mut runs = Vec::new();
            let mut off = 0u64;
            let mut fill = 0usize;
            loop {
                p.check_cancel()?;
                let n = entry
                    .read(buf.get_mut(fill..).unwrap_or_default())
                    .map_err(|e| tar_err(&raw_path, e))?;
                fill += n;
                if n == 0 || fill == buf.len() {
                    let whole = if n == 0 { fill } else { fill / bs * bs };
                    let chunk = buf.get(..whole).unwrap_or_default().to_vec();
                    p.push_data(&mut runs, off / bs as u64, &chunk)?;
                    off += whole as u64;
                    buf.copy_within(whole..fill, 0);
                    fill -= whole;
                    if n == 0 {
                        break;
                    }
                }
            }
            if off != size {
                return Err(refused(
                    &raw_path,
                    format!("truncated archive: {off} of {size} bytes of content"),
                ));
            }
            p.finish_file(ino, inode, size, &runs)?;
            done += size;
            control.report(done, 0);
        } else if et.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refused(&raw_path, "symlink without a target"))?
                .into_owned();
            let meta = Meta {
                mode: disk::S_IFLNK | 0o777,
                uid,
                gid,
                times,
            };
            p.add_symlink(&path, meta, &target)?;
        } else if et.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refused(&raw_path, "hard link without a target"))?
                .into_owned();
            let target = normalise(&target).map_err(|e| match e {
                Error::EntryRefused { reason, .. } => {
                    refused(&raw_path, format!("hard link target: {reason}"))
                }
                other => other,
            })?;
            p.add_hardlink(&path, &target)?;
        } else if et.is_character_special() || et.is_block_special() || et.is_fifo() {
            let kind = if et.is_character_special() {
                disk::S_IFCHR
            } else if et.is_block_special() {
                disk::S_IFBLK
            } else {
                disk::S_IFIFO
            };
            // Fifos carry no device number (GNU tar leaves the fields empty).
            let (major, minor) = if et.is_fifo() {
                (0, 0)
            } else {
                (
                    h.device_major()
                        .map_err(|e| tar_err(&raw_path, e))?
                        .unwrap_or(0),
                    h.device_minor()
                        .map_err(|e| tar_err(&raw_path, e))?
                        .unwrap_or(0),
                )
            };
            let meta = Meta {
                mode: mode16(&raw_path, kind, mode)?,
                uid,
                gid,
                times,
            };
            p.add_special(&path, meta, major, minor)?;
        } else {
            return Err(refused(&raw_path, format!("unsupported entry type {et:?}")));
        }
    }
    end(p)
}

/// Statistics of a source, for sizing.
#[derive(Default)]
struct Usage {
    entries: u64,
    data_blocks: u64,
    dir_bytes: u64,
}

fn usage_add_file(u: &mut Usage, bs: u64, bytes: u64) {
    u.data_blocks += bytes.div_ceil(bs);
    // Extent tree blocks for fragmented files: generous.
    u.data_blocks += bytes.div_ceil(bs * 4096);
}

fn usage_of(source: &Source, bs: u64) -> Result<Usage> {
    let mut u = Usage::default();
    match source {
        Source::Dir(root) => {
            let mut stack = vec![root.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).map_err(io_err(&d, "read directory"))? {
                    let e = e.map_err(io_err(&d, "read directory"))?;
                    let md = e.metadata().map_err(io_err(&e.path(), "stat"))?;
                    u.entries += 1;
                    u.dir_bytes += disk::dirent_len(e.file_name().len()) as u64;
                    if md.is_dir() {
                        stack.push(e.path());
                    } else if md.is_file() {
                        usage_add_file(
                            &mut u,
                            bs,
                            host::allocated_bytes_of(&md).min(md.len().div_ceil(bs) * bs),
                        );
                    } else if md.file_type().is_symlink() {
                        u.data_blocks += 1;
                    }
                }
            }
        }
        Source::Tar(path) => {
            let f = File::open(path).map_err(io_err(path, "open tar archive"))?;
            let mut br = BufReader::new(f);
            let head = br.fill_buf().map_err(io_err(path, "read tar archive"))?;
            let gz = head.first() == Some(&0x1f) && head.get(1) == Some(&0x8b);
            let r: Box<dyn Read> = if gz {
                Box::new(flate2::bufread::MultiGzDecoder::new(br))
            } else {
                Box::new(br)
            };
            let mut ar = tar::Archive::new(r);
            for e in ar.entries().map_err(|e| tar_err(b"<archive>", e))? {
                let e = e.map_err(|e| tar_err(b"<archive>", e))?;
                u.entries += 1;
                u.dir_bytes += disk::dirent_len(e.path_bytes().len().min(255)) as u64;
                if e.header().entry_type().is_file() {
                    usage_add_file(&mut u, bs, e.size());
                } else {
                    u.data_blocks += 1;
                }
            }
        }
    }
    Ok(u)
}

/// A device size (bytes, a multiple of 1 MiB) that holds `source` with
/// headroom: 20% more data blocks than the content needs, at least 16 MiB
/// free, and enough inodes for the entries plus 20%.
pub fn required_size(source: &Source, opts: &PopulateOptions) -> Result<u64> {
    let bs = u64::from(opts.mkfs.block_size);
    let u = usage_of(source, bs)?;
    let data = u.data_blocks + u.dir_bytes.div_ceil(bs) * 2 + u.entries / 8;
    let want_free = (data + data / 5).max((16 << 20) / bs);
    let want_inodes = u.entries + u.entries / 5 + 64;
    let mut size =
        ((want_free * bs) + (32 << 20)).max(want_inodes * u64::from(opts.mkfs.inode_ratio));
    for _ in 0..64 {
        size = size.div_ceil(1 << 20) << 20;
        let g = Geometry::compute(size, opts.mkfs.block_size, opts.mkfs.inode_ratio)?;
        let journal = match opts.mkfs.journal {
            Journal::None => 0,
            Journal::Default => default_journal_blocks(g.blocks_count).unwrap_or(0),
            Journal::Blocks(n) => u64::from(n),
        };
        let mut meta = journal + 64;
        for grp in 0..g.groups {
            meta += g.base_meta(grp) + 2 + u64::from(g.inode_blocks_per_group);
        }
        let free = g.blocks_count.saturating_sub(meta);
        if free >= want_free && g.inodes_count() >= want_inodes {
            return Ok(size);
        }
        size += size / 8;
    }
    Err(Error::invalid("cannot size a filesystem for this content"))
}
