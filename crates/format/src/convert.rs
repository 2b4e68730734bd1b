//! `convert`: copy an image to a new raw or qcow2 file, flattening its
//! backing chain or keeping it, sparse, with progress and cancellation.
//!
//! The output is built in a temporary file next to the destination and
//! renamed into place only when complete, so a cancelled or failed copy
//! leaves nothing behind. Memory stays bounded (a few MiB of buffers plus one
//! allocation map window) whatever the image size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::{self, AtomicFile, Commit, Falloc};
use crate::qcow2::{
    is_zero, thread_count, write_items, ClusterCompressor, Item, Qcow2Meta, Qcow2Writer,
    Qcow2WriterOptions,
};
use crate::{
    BackingRef, BlockIo, ByteRange, Compression, Control, Error, Format, Image, OpenOptions, Result,
};

/// What to do with the source's backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingMode {
    /// Copy what the whole chain shows; the output has no backing file.
    #[default]
    Flatten,
    /// Copy only the clusters the top image allocates; the output names the
    /// same backing file (qcow2 output only).
    Keep,
}

/// Options of [`convert`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertOptions {
    /// Output format.
    pub format: Format,
    /// Cluster size of qcow2 output (default 64 KiB).
    pub cluster_size: u64,
    /// Compress qcow2 output clusters.
    pub compress: Option<Compression>,
    /// Flatten the chain or keep the backing file.
    pub backing: BackingMode,
    /// Do not write unallocated and all-zero clusters (default `true`).
    pub sparse: bool,
    /// Compression threads; 0 = all cores.
    pub threads: usize,
    /// fsync the output before renaming it into place (default `true`).
    /// Without it a copy costs what `qemu-img convert` costs (it does not
    /// flush by default), but a crash soon after may leave an incomplete file
    /// under the final name.
    pub durable: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Qcow2,
            cluster_size: 64 << 10,
            compress: None,
            backing: BackingMode::Flatten,
            sparse: true,
            threads: 0,
            durable: true,
        }
    }
}

/// How the bytes were copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// A reflink (FICLONE): the file system shares the blocks.
    Reflink,
    /// `copy_file_range` over the source's data extents.
    CopyFileRange,
    /// Read through the source image and write the output format.
    Stream,
}

/// What [`convert`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvertReport {
    /// The output file.
    pub output: PathBuf,
    /// Output format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Guest bytes read from the source (data only).
    pub bytes_read: u64,
    /// Host bytes the output occupies.
    pub bytes_allocated: u64,
    /// How the data was copied.
    pub method: CopyMethod,
    /// Backing file recorded in the output (with [`BackingMode::Keep`]).
    pub backing_file: Option<String>,
}

/// Size of one read from the source.
const CHUNK: u64 = 4 << 20;
/// Bytes of clusters collected before a parallel compression round.
const BATCH: u64 = 16 << 20;
/// Guest bytes mapped at a time.
const MAP_WINDOW: u64 = 1 << 30;

/// Copy the image at `src` (opened per `src_opts`, read-only) to a new file
/// `dst`, which must not exist.
///
/// Raw to raw copies try a reflink first, then `copy_file_range` over the
/// data extents (holes stay holes). Everything else streams through the
/// source image; qcow2 output is laid out fresh by [`Qcow2Writer`]. With
/// [`BackingMode::Keep`] the output records the source's backing file: by
/// the same name when `dst` is in the source's directory, else by its
/// absolute path. Cancellation through `control` returns
/// [`Error::Cancelled`] and leaves no output.
///
/// ```
/// use vmvol_format::{check, compact, convert, CompactOptions, Compression, ConvertOptions};
/// use vmvol_format::{Control, OpenOptions, RepairMode};
///
/// let dir = tempfile::tempdir()?;
/// let raw = dir.path().join("disk.raw");
/// let mut bytes = vec![0u8; 4 << 20];
/// bytes[..1 << 20].fill(7);
/// std::fs::write(&raw, &bytes)?;
///
/// // raw -> qcow2 (sparse: the 3 MiB of zeros take no space).
/// let q = dir.path().join("disk.qcow2");
/// let report = convert(&raw, &OpenOptions::new(), &q, &ConvertOptions::default(), &Control::new())?;
/// assert_eq!(report.virtual_size, 4 << 20);
/// assert!(check(&q, RepairMode::None)?.is_clean());
///
/// // Compress it in place.
/// let opts = CompactOptions { compression: Some(Compression::Zstd), ..Default::default() };
/// let c = compact(&q, &opts, &Control::new())?;
/// assert!(c.bytes_after < c.bytes_before);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn convert(
    src: &Path,
    src_opts: &OpenOptions,
    dst: &Path,
    opts: &ConvertOptions,
    control: &Control,
) -> Result<ConvertReport> {
    if dst.symlink_metadata().is_ok() {
        return Err(Error::Exists {
            path: dst.to_path_buf(),
        });
    }
    if opts.compress.is_some() && opts.format != Format::Qcow2 {
        return Err(Error::InvalidArgument {
            path: dst.to_path_buf(),
            reason: "compression needs qcow2 output".into(),
        });
    }
    let mut o = src_opts.clone();
    o.read_only = true;
    let img = Image::open(src, &o)?;
    let backing = match opts.backing {
        BackingMode::Flatten => None,
        BackingMode::Keep => kept_backing(&img, src, dst)?,
    };
    if backing.is_some() && opts.format == Format::Raw {
        return Err(Error::InvalidArgument {
            path: dst.to_path_buf(),
            reason: "a raw image cannot record a backing file (use flatten)".into(),
        });
    }
    let temp = new_output(dst)?;
    let size = img.size();
    let (method, bytes_read) = match (img.format(), opts.format) {
        (Format::Raw, Format::Raw) => raw_to_raw(src, &temp, size, opts.sparse, control)?,
        (_, Format::Raw) => (
            CopyMethod::Stream,
            stream_to_raw(&img, &temp, opts.sparse, control)?,
        ),
        (_, Format::Qcow2) => (
            CopyMethod::Stream,
            stream_to_qcow2(&img, &temp, opts, backing.clone(), control)?,
        ),
    };
    control.check(dst, "convert")?;
    let bytes_allocated = commit_output(temp, dst, 0o644, false, opts.durable)?;
    control.report(size, size);
    Ok(ConvertReport {
        output: dst.to_path_buf(),
        format: opts.format,
        virtual_size: size,
        bytes_read,
        bytes_allocated,
        method,
        backing_file: backing.map(|b| b.path.display().to_string()),
    })
}

/// The backing file the output should record for [`BackingMode::Keep`].
fn kept_backing(img: &Image, src: &Path, dst: &Path) -> Result<Option<BackingRef>> {
    if img.format() != Format::Qcow2 {
        return Ok(None);
    }
    let Some(b) = Qcow2Meta::open(src, false)?.header().backing(src)? else {
        return Ok(None);
    };
    if b.path.is_absolute() {
        return Ok(Some(b));
    }
    let src_dir = host::parent_dir(src)
        .canonicalize()
        .map_err(|e| Error::io(src, "resolve directory", e))?;
    let dst_dir = host::parent_dir(dst)
        .canonicalize()
        .map_err(|e| Error::io(dst, "resolve directory", e))?;
    if src_dir == dst_dir {
        Ok(Some(b))
    } else {
        Ok(Some(BackingRef {
            path: src_dir.join(&b.path),
            format: b.format,
        }))
    }
}

/// Create the temporary output for `dst` beside it, after removing the
/// leftovers of killed earlier runs (see [`host::AtomicFile`]).
pub(crate) fn new_output(dst: &Path) -> Result<AtomicFile> {
    host::remove_dead_temps(dst).map_err(|e| Error::io(dst, "remove dead temporary files", e))?;
    AtomicFile::new(dst).map_err(|e| Error::io(dst, "create temporary file", e))
}

/// A [`Qcow2Writer`] writing into the temporary output `temp`.
pub(crate) fn qcow2_output(temp: &AtomicFile, opts: &Qcow2WriterOptions) -> Result<Qcow2Writer> {
    let tp = temp.path();
    let file = temp
        .file()
        .try_clone()
        .map_err(|e| Error::io(tp, "duplicate descriptor", e))?;
    Qcow2Writer::new(file, tp, opts)
}

/// Put the finished output at `dst` (replacing what is there only with
/// `replace`); returns the host bytes it occupies.
pub(crate) fn commit_output(
    temp: AtomicFile,
    dst: &Path,
    mode: u32,
    replace: bool,
    durable: bool,
) -> Result<u64> {
    let file = temp
        .commit(
            dst,
            Commit {
                replace,
                mode,
                durable,
            },
        )
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists {
                    path: dst.to_path_buf(),
                }
            } else {
                Error::io(dst, "rename into place", e)
            }
        })?;
    host::allocated_bytes(&file).map_err(|e| Error::io(dst, "stat", e))
}

fn raw_to_raw(
    src: &Path,
    temp: &AtomicFile,
    size: u64,
    sparse: bool,
    control: &Control,
) -> Result<(CopyMethod, u64)> {
    let s = File::open(src).map_err(|e| Error::io(src, "open", e))?;
    let tp = temp.path().to_path_buf();
    if host::reflink(&s, temp.file()).is_ok() {
        return Ok((CopyMethod::Reflink, size));
    }
    temp.file()
        .set_len(size)
        .map_err(|e| Error::io(&tp, "set length", e))?;
    if !sparse && size > 0 {
        host::fallocate(temp.file(), Falloc::Allocate, 0, size)
            .map_err(|e| Error::io(&tp, "fallocate", e))?;
    }
    // One thread walks the data extents in pieces: the in-kernel copy is
    // bound by the page cache, and two workers measured slower (they contend
    // on the same inodes).
    let mut use_cfr = true;
    let mut copied = 0u64;
    // Data extents, cut into pieces so progress and cancellation are checked often.
    let mut extents = host::data_extents(&s, 0, size);
    let mut current: Option<ByteRange> = None;
    let mut next_piece = || -> Result<Option<(u64, u64)>> {
        loop {
            if let Some(r) = current.as_mut().filter(|r| r.len > 0) {
                let n = r.len.min(PIECE);
                let at = r.offset;
                *r = ByteRange::new(at + n, r.len - n);
                return Ok(Some((at, n)));
            }
            match extents.next() {
                Some(r) => current = Some(r.map_err(|e| Error::io(src, "seek data", e))?),
                None => return Ok(None),
            }
        }
    };
    let mut buf = Vec::new();
    loop {
        control.check(&tp, "convert")?;
        let Some((off, n)) = next_piece()? else {
            break;
        };
        if use_cfr {
            match host::copy_file_range(&s, temp.file(), off, n) {
                // A source shorter than expected: the rest reads as a hole.
                Ok(_) => {}
                Err(e) if host::is_unsupported(&e) => use_cfr = false,
                Err(e) => return Err(Error::io(&tp, "copy_file_range", e)),
            }
        }
        if !use_cfr {
            buf.resize(CHUNK as usize, 0);
            let mut o = off;
            while o < off + n {
                let k = (off + n - o).min(CHUNK) as usize;
                let b = buf.get_mut(..k).unwrap_or_default();
                s.read_exact_at(b, o)
                    .map_err(|e| Error::io(src, "read", e))?;
                if !(sparse && is_zero(b)) {
                    temp.file()
                        .write_all_at(b, o)
                        .map_err(|e| Error::io(&tp, "write", e))?;
                }
                o += k as u64;
            }
        }
        copied += n;
        control.report(copied, size);
    }
    let method = if use_cfr {
        CopyMethod::CopyFileRange
    } else {
        CopyMethod::Stream
    };
    Ok((method, copied))
}

/// Largest piece copied per call, so progress and cancellation are checked often.
const PIECE: u64 = 16 << 20;

/// How one range of the source is to be copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Nothing to write (unallocated, or zeros with nothing below).
    Nothing,
    /// Zeros that must hide a backing file.
    Zero,
    /// Data to read and write.
    Data,
}

fn classify(e: &crate::MapExtent, keep: bool) -> Class {
    if keep {
        if e.depth != 0 || !e.present {
            Class::Nothing
        } else if e.zero {
            Class::Zero
        } else {
            Class::Data
        }
    } else if e.present && !e.zero {
        Class::Data
    } else {
        Class::Nothing
    }
}

/// A piece of work the reading thread hands to the writing thread.
enum Work {
    /// `count` guest units from `first` need nothing written (sparse).
    Nothing { first: u64, count: u64 },
    /// `count` guest units from `first` read as zeros that must hide a
    /// backing file.
    Zero { first: u64, count: u64 },
    /// Consecutive units from `first`, as read from the source.
    Data { first: u64, buf: Vec<u8> },
}

/// Walk the source's allocation map in units of `unit` bytes and read the
/// data runs (at most [`CHUNK`] bytes each), sending them in order. Runs in
/// its own thread so reading overlaps writing; stops when the receiver is
/// gone (cancellation or a write error).
fn produce(
    img: &Image,
    unit: u64,
    keep: bool,
    tx: &std::sync::mpsc::SyncSender<Result<Work>>,
    spare: &std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let size = img.size();
    let send = |w: Result<Work>| tx.send(w).is_ok();
    let mut win = 0u64;
    while win < size {
        let wlen = (size - win).min(MAP_WINDOW);
        let extents = match img.map(win, wlen) {
            Ok(e) => e,
            Err(e) => {
                send(Err(e));
                return;
            }
        };
        let first = win / unit;
        let n = wlen.div_ceil(unit) as usize;
        // Per unit: bit0 nothing, bit1 zero, bit2 data.
        let mut flags = vec![0u8; n];
        for e in &extents {
            let bit = match classify(e, keep) {
                Class::Nothing => 1u8,
                Class::Zero => 2,
                Class::Data => 4,
            };
            let s = e.start.max(win);
            let end = e.start.saturating_add(e.length).min(win + wlen);
            if end <= s {
                continue;
            }
            for c in (s / unit)..=((end - 1) / unit) {
                if let Some(f) = flags.get_mut((c - first) as usize) {
                    *f |= bit;
                }
            }
        }
        let class_of = |f: u8| -> Class {
            // Mixed zero-and-unallocated units must be read (the backing
            // shows through part of them).
            if f & 4 != 0 || (f & 2 != 0 && f & 1 != 0) {
                Class::Data
            } else if f & 2 != 0 {
                Class::Zero
            } else {
                Class::Nothing
            }
        };
        let mut i = 0usize;
        while i < n {
            let class = flags.get(i).copied().map_or(Class::Nothing, class_of);
            let mut j = i + 1;
            while j < n
                && flags.get(j).copied().map(class_of) == Some(class)
                && (class != Class::Data || (j - i) as u64 * unit < CHUNK)
            {
                j += 1;
            }
            let g = first + i as u64;
            let count = (j - i) as u64;
            let ok = match class {
                Class::Nothing => send(Ok(Work::Nothing { first: g, count })),
                Class::Zero => send(Ok(Work::Zero { first: g, count })),
                Class::Data => {
                    let off = g * unit;
                    let end = ((first + j as u64) * unit).min(size);
                    let mut buf = spare.try_recv().unwrap_or_default();
                    buf.resize((end - off) as usize, 0);
                    match img.read_at(&mut buf, off) {
                        Ok(()) => send(Ok(Work::Data { first: g, buf })),
                        Err(e) => {
                            send(Err(e));
                            false
                        }
                    }
                }
            };
            if !ok {
                return;
            }
            i = j;
        }
        win += wlen;
    }
}

/// Run `produce` in a thread and hand each piece of work to `consume`, in
/// order. Returns the data bytes read.
fn pipeline(
    img: &Image,
    unit: u64,
    keep: bool,
    mut consume: impl FnMut(Work, &std::sync::mpsc::SyncSender<Vec<u8>>) -> Result<()>,
) -> Result<u64> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Work>>(3);
    let (spare_tx, spare_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    std::thread::scope(|s| {
        s.spawn(move || produce(img, unit, keep, &tx, &spare_rx));
        let rx = rx;
        let mut read = 0u64;
        let mut run = || -> Result<u64> {
            for w in rx.iter() {
                let w = w?;
                if let Work::Data { buf, .. } = &w {
                    read += buf.len() as u64;
                }
                consume(w, &spare_tx)?;
            }
            Ok(read)
        };
        let result = run();
        // Dropping the receiver stops a producer blocked on a full channel,
        // so the scope can join it.
        drop(rx);
        result
    })
}

fn stream_to_raw(img: &Image, temp: &AtomicFile, sparse: bool, control: &Control) -> Result<u64> {
    let size = img.size();
    let tp = temp.path().to_path_buf();
    temp.file()
        .set_len(size)
        .map_err(|e| Error::io(&tp, "set length", e))?;
    const UNIT: u64 = 64 << 10;
    let read = pipeline(img, UNIT, false, |w, spare| {
        let Work::Data { first, buf } = w else {
            return Ok(());
        };
        control.check(&tp, "convert")?;
        let off = first * UNIT;
        let n = buf.len();
        // Skip all-zero units so the output stays sparse; write the
        // non-zero runs with one call each.
        let mut k = 0usize;
        let mut run: Option<usize> = None;
        loop {
            let m = (n - k).min(UNIT as usize);
            let zero = k == n || (sparse && is_zero(buf.get(k..k + m).unwrap_or_default()));
            if zero {
                if let Some(a) = run.take() {
                    temp.file()
                        .write_all_at(buf.get(a..k).unwrap_or_default(), off + a as u64)
                        .map_err(|e| Error::io(&tp, "write", e))?;
                }
            } else if run.is_none() {
                run = Some(k);
            }
            if k == n {
                break;
            }
            k += m;
        }
        control.report(off + n as u64, size);
        let _ = spare.try_send(buf);
        Ok(())
    })?;
    if !sparse && size > 0 {
        // Mode 0 only allocates and keeps existing data.
        host::fallocate(temp.file(), Falloc::Allocate, 0, size)
            .map_err(|e| Error::io(&tp, "fallocate", e))?;
    }
    Ok(read)
}

fn stream_to_qcow2(
    img: &Image,
    temp: &AtomicFile,
    opts: &ConvertOptions,
    backing: Option<BackingRef>,
    control: &Control,
) -> Result<u64> {
    let size = img.size();
    let tp = temp.path().to_path_buf();
    let keep = backing.is_some();
    let mut w = qcow2_output(
        temp,
        &Qcow2WriterOptions {
            size,
            cluster_size: opts.cluster_size,
            compression: opts.compress.unwrap_or(Compression::Zlib),
            backing,
        },
    )?;
    let cs = w.cluster_size();
    let mut compressors: Vec<ClusterCompressor> = match opts.compress {
        Some(k) => (0..thread_count(opts.threads))
            .map(|_| ClusterCompressor::new(k, cs as usize))
            .collect(),
        None => Vec::new(),
    };
    let mut items: Vec<Item> = Vec::new();
    let mut pending = 0u64;
    let read = pipeline(img, cs, keep, |work, spare| {
        let zeros = |first: u64, count: u64, items: &mut Vec<Item>, pending: &mut u64| {
            for g in first..first + count {
                if opts.sparse {
                    items.push(Item::Zero(g));
                } else {
                    items.push(Item::Data(g, vec![0u8; cluster_len(g, cs, size)]));
                    *pending += cs;
                }
            }
        };
        let done = match work {
            Work::Nothing { first, count } => {
                if !opts.sparse && !keep {
                    zeros(first, count, &mut items, &mut pending);
                }
                (first + count) * cs
            }
            Work::Zero { first, count } => {
                zeros(first, count, &mut items, &mut pending);
                (first + count) * cs
            }
            Work::Data { first, buf } => {
                let n = buf.len();
                pending += n as u64;
                if compressors.is_empty() {
                    // Uncompressed: write maximal runs of non-zero clusters
                    // straight from the read buffer.
                    write_items(&mut w, &mut items, &mut compressors)?;
                    let pieces = n.div_ceil(cs as usize);
                    let mut run_start: Option<usize> = None;
                    for (k, piece) in buf.chunks(cs as usize).enumerate() {
                        let zero = opts.sparse && is_zero(piece);
                        if !zero && run_start.is_none() {
                            run_start = Some(k);
                        }
                        if zero || k + 1 == pieces {
                            if let Some(a) = run_start.take() {
                                let b = if zero { k } else { k + 1 };
                                let from = a * cs as usize;
                                let to = (b * cs as usize).min(n);
                                w.write_run(
                                    first + a as u64,
                                    buf.get(from..to).unwrap_or_default(),
                                )?;
                            }
                        }
                        if zero && keep {
                            w.write_zero(first + k as u64)?;
                        }
                    }
                } else {
                    for (k, piece) in buf.chunks(cs as usize).enumerate() {
                        let g = first + k as u64;
                        if opts.sparse && is_zero(piece) {
                            if keep {
                                items.push(Item::Zero(g));
                            }
                        } else {
                            items.push(Item::Data(g, piece.to_vec()));
                        }
                    }
                }
                let done = first * cs + n as u64;
                let _ = spare.try_send(buf);
                done
            }
        };
        if pending >= BATCH || items.len() >= 65536 {
            control.check(&tp, "convert")?;
            write_items(&mut w, &mut items, &mut compressors)?;
            pending = 0;
            control.report(done.min(size), size);
        }
        Ok(())
    })?;
    control.check(&tp, "convert")?;
    write_items(&mut w, &mut items, &mut compressors)?;
    w.finish_with(opts.durable)?;
    Ok(read)
}

fn cluster_len(g: u64, cs: u64, size: u64) -> usize {
    (size.saturating_sub(g * cs)).min(cs) as usize
}
