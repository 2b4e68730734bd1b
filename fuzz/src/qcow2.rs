//! qcow2 fuzz bodies: turn the input into an image file in a per-thread
//! scratch directory, open it and exercise reads (`open_and_read`) or writes
//! followed by `check` (`write_check`). Must never panic whatever the bytes
//! are; errors are fine.
//!
//! Self-contained (std + `vmvol_format` only) because the stable proptest
//! `crates/format/tests/format.rs` includes this file with `#[path]`.
//!
//! Input: either the image file itself, or — when it starts with
//! [`SPARSE_MAGIC`] — a sparse encoding (`offset: u64 LE, len: u32 LE,
//! bytes` records) so that images whose metadata lies megabytes apart
//! (2 MiB clusters, snapshots) make small seeds. `fuzz/make-corpus.sh`
//! writes the seeds in that encoding when it is shorter.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmvol_format::{check, info, BackingPolicy, BlockIo, Format, Image, OpenOptions, RepairMode};

/// First bytes of a sparse-encoded input.
pub const SPARSE_MAGIC: &[u8; 8] = b"VMVSPRS1";

/// Largest file a sparse input may describe: bounds the harness's own
/// disk use, not the library's (the library must cope with any size).
const MAX_SPARSE_END: u64 = 64 << 20;

/// Name of the input image inside the scratch directory.
const TOP: &str = "top.img";
/// Backing files a fuzzed image may name (`base.qcow2`, `base.raw`),
/// recreated by [`scratch_dir`] when missing. Seeds with chains use them.
const BASE_QCOW2: &str = "base.qcow2";
const BASE_RAW: &str = "base.raw";

/// Writes `data` as the image file at `path` (decoding the sparse form).
pub fn materialise(data: &[u8], path: &Path) -> std::io::Result<()> {
    let f = File::create(path)?;
    let Some(mut rest) = data.strip_prefix(SPARSE_MAGIC.as_slice()) else {
        return f.write_all_at(data, 0);
    };
    let mut end = 0u64;
    while rest.len() >= 12 {
        let off = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(rest[8..12].try_into().unwrap_or_default()) as usize;
        rest = &rest[12..];
        let chunk = &rest[..len.min(rest.len())];
        rest = &rest[chunk.len()..];
        let off = off % MAX_SPARSE_END;
        let chunk = &chunk[..chunk.len().min((MAX_SPARSE_END - off) as usize)];
        f.write_all_at(chunk, off)?;
        end = end.max(off + chunk.len() as u64);
    }
    // A trailing partial record sets the file length (images end in holes).
    if rest.len() >= 8 {
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default()) % MAX_SPARSE_END;
        end = end.max(len);
    }
    f.set_len(end)
}

/// Open `data` as an image file and exercise the read paths.
pub fn open_and_read(data: &[u8]) {
    let Some(path) = prepare(data) else {
        return;
    };
    for (format, read_only) in [
        (Format::Qcow2, true),
        (Format::Qcow2, false),
        (Format::Raw, true),
    ] {
        let opts = options(&path, format, read_only);
        let _ = info(&path, &opts);
        let Ok(img) = Image::open(&path, &opts) else {
            continue;
        };
        let size = img.size();
        // Read the start, a middle window and the end; map the first GiB.
        let mut buf = vec![0u8; 128 << 10];
        for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
        }
        let _ = img.map(0, size.min(1 << 30));
        let _ = img.known_zero(0, size.min(1 << 20));
        if !read_only {
            // Writes on a hostile image must fail cleanly or succeed, never panic.
            let _ = img.write_at(&[0x5a; 4096], size / 3);
            let _ = img.write_zeroes(0, size.min(8192));
            let _ = img.discard(0, size.min(65536));
            let _ = img.flush();
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Open `data` read-write as qcow2, write, zero, discard and flush at
/// places derived from the input's last bytes, close, then `check` (report
/// only, then leak repair, then report again).
pub fn write_check(data: &[u8]) {
    let Some(path) = prepare(data) else {
        return;
    };
    // Operation parameters come from the tail so the head stays a header.
    let tail: [u8; 8] = match data.len().checked_sub(8) {
        Some(at) => data[at..].try_into().unwrap_or_default(),
        None => [0; 8],
    };
    let opts = options(&path, Format::Qcow2, false);
    if let Ok(img) = Image::open(&path, &opts) {
        let size = img.size();
        if size > 0 {
            let at = |b: u8| size / 256 * u64::from(b);
            let len = 512u64 << (tail[0] % 8);
            let buf = vec![tail[1]; len as usize];
            for i in 0..3 {
                let off = at(tail[2 + i]);
                let n = len.min(size - off) as usize;
                let _ = img.write_at(&buf[..n], off);
            }
            let off = at(tail[5]);
            let _ = img.write_zeroes(off, (len * 3).min(size - off));
            let off = at(tail[6]);
            let _ = img.discard(off, (65536).min(size - off));
            let off = at(tail[7]);
            let _ = img.write_at(&buf[..len.min(size - off) as usize], off);
            let mut back = vec![0u8; len.min(size - off) as usize];
            let _ = img.read_at(&mut back, off);
        }
        let _ = img.flush();
    }
    let _ = check(&path, RepairMode::None);
    if check(&path, RepairMode::Leaks).is_ok() {
        let _ = check(&path, RepairMode::None);
    }
    let _ = std::fs::remove_file(&path);
}

/// Backing files may only come from the scratch directory.
fn options(path: &Path, format: Format, read_only: bool) -> OpenOptions {
    OpenOptions::new()
        .format(format)
        .read_only(read_only)
        .policy(BackingPolicy::image_dir(path))
}

/// Materialises `data` as the top image; `None` if the harness cannot.
fn prepare(data: &[u8]) -> Option<PathBuf> {
    let path = scratch_dir()?.join(TOP);
    materialise(data, &path).ok()?;
    Some(path)
}

/// A per-process, per-thread scratch directory holding the backing files.
fn scratch_dir() -> Option<PathBuf> {
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "vmvol-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    if !dir.join(BASE_RAW).exists() {
        std::fs::create_dir_all(&dir).ok()?;
        // 4 MiB backing files with a pattern in the first MiB.
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let raw = File::create(dir.join(BASE_RAW)).ok()?;
        raw.write_all_at(&pattern, 0).ok()?;
        raw.set_len(4 << 20).ok()?;
        let q = dir.join(BASE_QCOW2);
        let created =
            vmvol_format::Qcow2Image::create(&q, &vmvol_format::Qcow2CreateOptions::new(4 << 20));
        if created.is_ok() {
            if let Ok(img) = Image::open(&q, &OpenOptions::new().format(Format::Qcow2)) {
                let _ = img.write_at(&pattern, 0);
                let _ = img.flush();
            }
        }
    }
    Some(dir)
}
