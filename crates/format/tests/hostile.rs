//! A corpus of hostile images: each is refused with its specific error, with
//! no panic and no large allocation (a counting allocator watches).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "format/support.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::*;
use vmvol_format::{
    info, BackingPolicy, Error, Format, Image, OpenOptions, Qcow2CreateOptions, Qcow2Image,
};

/// Largest single allocation seen since the last reset.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p was allocated by System with l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: u64 = 1 << 20;

fn policy(root: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([root]))
}

/// Open `p` as qcow2 under `opts`; the error, with the allocation watch.
fn open_err(p: &Path, opts: &OpenOptions) -> Error {
    LARGEST.store(0, Ordering::Relaxed);
    let e = Image::open(p, &opts.clone().format(Format::Qcow2)).unwrap_err();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 16 << 20,
        "opening {} allocated {largest} bytes at once",
        p.display()
    );
    // info walks the same chain and must refuse the same way (no panic).
    let _ = info(p, &opts.clone().format(Format::Qcow2));
    e
}

fn refused_because(e: &Error, needle: &str) {
    match e {
        Error::BackingRefused { reason, .. } => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected BackingRefused ({needle}), got {other:?}"),
    }
}

fn invalid_because(e: &Error, needle: &str) {
    match e {
        Error::InvalidImage { reason, .. } => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected InvalidImage ({needle}), got {other:?}"),
    }
}

fn unsupported_because(e: &Error, needle: &str) {
    match e {
        Error::Unsupported { feature, .. } => {
            assert!(
                feature.contains(needle),
                "feature {feature:?} lacks {needle:?}"
            )
        }
        other => panic!("expected Unsupported ({needle}), got {other:?}"),
    }
}

/// qemu-img create with an unchecked backing file (-u).
fn overlay(p: &Path, backing: &str, fmt: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        fmt,
        p.to_str().unwrap(),
        "1M",
    ]);
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn plain(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(MIB)).unwrap();
    p
}

#[test]
fn backing_outside_roots() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("outside.raw"), vec![7u8; MIB as usize]).unwrap();

    // Absolute path to a system file.
    let p = root.join("passwd.qcow2");
    overlay(&p, "/etc/passwd", "raw");
    refused_because(&open_err(&p, &policy(&root)), "outside the allowed roots");

    // ../ escape.
    let p = root.join("escape.qcow2");
    overlay(&p, "../../../../../../etc/passwd", "raw");
    refused_because(&open_err(&p, &policy(&root)), "outside the allowed roots");
    let p = root.join("escape2.qcow2");
    overlay(&p, "../outside.raw", "raw");
    refused_because(&open_err(&p, &policy(&root)), "outside the allowed roots");

    // A symlink inside the root pointing out of it.
    std::os::unix::fs::symlink("../outside.raw", root.join("link.raw")).unwrap();
    let p = root.join("symlink.qcow2");
    overlay(&p, "link.raw", "raw");
    refused_because(&open_err(&p, &policy(&root)), "outside the allowed roots");

    // The default policy refuses every backing file, even next door.
    std::fs::write(root.join("ok.raw"), vec![0u8; MIB as usize]).unwrap();
    let p = root.join("nextdoor.qcow2");
    overlay(&p, "ok.raw", "raw");
    refused_because(
        &open_err(&p, &OpenOptions::new()),
        "outside the allowed roots",
    );
    // ...and the right policy allows it.
    Image::open(&p, &policy(&root)).unwrap();

    // A protocol name is not a file.
    let p = root.join("nbd.qcow2");
    overlay(&p, "nbd:localhost:10809", "raw");
    refused_because(&open_err(&p, &policy(&root)), "protocol");
}

#[test]
fn chain_loop_and_depth() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    overlay(&d.join("a.qcow2"), "b.qcow2", "qcow2");
    overlay(&d.join("b.qcow2"), "a.qcow2", "qcow2");
    refused_because(&open_err(&d.join("a.qcow2"), &policy(d)), "loop");
    // Self-reference.
    overlay(&d.join("self.qcow2"), "self.qcow2", "qcow2");
    refused_because(&open_err(&d.join("self.qcow2"), &policy(d)), "loop");

    // 16 backing files are allowed, 17 are not.
    std::fs::write(d.join("c0.raw"), vec![1u8; MIB as usize]).unwrap();
    overlay(&d.join("c1.qcow2"), "c0.raw", "raw");
    for i in 2..=17 {
        overlay(
            &d.join(format!("c{i}.qcow2")),
            &format!("c{}.qcow2", i - 1),
            "qcow2",
        );
    }
    let img = Image::open(&d.join("c16.qcow2"), &policy(d)).unwrap();
    let mut b = [0u8; 4];
    vmvol_format::BlockIo::read_at(&img, &mut b, 0).unwrap();
    assert_eq!(b, [1u8; 4]);
    drop(img);
    refused_because(&open_err(&d.join("c17.qcow2"), &policy(d)), "depth");
}

#[test]
fn missing_backing_format() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![3u8; MIB as usize]).unwrap();
    let p = d.join("nofmt.qcow2");
    overlay(&p, "base.raw", "raw");
    // Rename the backing-format header extension to an unknown (ignorable) one.
    let mut head = vec![0u8; 4096];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    let pos = head
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    patch(&p, pos as u64, &[0x12, 0x34, 0x56, 0x78]);
    refused_because(&open_err(&p, &policy(d)), "no backing format");
    // Opting in to probing opens it.
    let mut o = policy(d);
    o.policy.allow_probe = true;
    let img = Image::open(&p, &o).unwrap();
    let mut b = [0u8; 2];
    vmvol_format::BlockIo::read_at(&img, &mut b, 10).unwrap();
    assert_eq!(b, [3, 3]);
}

#[test]
fn hostile_headers() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = OpenOptions::new();

    // Giant L1 size (2^31 - 1 entries = 16 GiB).
    let p = plain(d, "l1.qcow2");
    patch(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    invalid_because(&open_err(&p, &o), "L1 table");
    // L1 size that fits QEMU's limit but not the file.
    let p = plain(d, "l1b.qcow2");
    patch(&p, 36, &0x0010_0000u32.to_be_bytes());
    invalid_because(&open_err(&p, &o), "past the end of the file");
    // Giant refcount table.
    let p = plain(d, "rt.qcow2");
    patch(&p, 56, &0x0100_0000u32.to_be_bytes());
    invalid_because(&open_err(&p, &o), "refcount table");
    // Absurd virtual size.
    let p = plain(d, "vs.qcow2");
    patch(&p, 24, &u64::MAX.to_be_bytes());
    invalid_because(&open_err(&p, &o), "virtual size");

    // Truncated header.
    let p = plain(d, "trunc.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    invalid_because(&open_err(&p, &o), "truncated");

    // Bad magic.
    let p = plain(d, "magic.qcow2");
    patch(&p, 0, b"QFI\xfa");
    invalid_because(&open_err(&p, &o), "bad magic");
    // Version 4.
    let p = plain(d, "v4.qcow2");
    patch(&p, 4, &4u32.to_be_bytes());
    unsupported_because(&open_err(&p, &o), "version 4");

    // Unknown incompatible feature bit 20.
    let p = plain(d, "incompat.qcow2");
    patch(&p, 72, &(1u64 << 20).to_be_bytes());
    unsupported_because(&open_err(&p, &o), "unknown incompatible");

    // Encryption: legacy AES flag, and LUKS made by qemu-img.
    let p = plain(d, "aes.qcow2");
    patch(&p, 32, &1u32.to_be_bytes());
    unsupported_because(&open_err(&p, &o), "encryption");
    let p = d.join("luks.qcow2");
    let args = [
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=hunter2",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        p.to_str().unwrap(),
        "1M",
    ];
    // qemu-img times its PBKDF2 iterations by the thread's CPU time and
    // gives up ("Unable to get accurate CPU usage") when a round measured
    // zero, which a tick-granular clock on a VM sometimes does: again.
    let mut tries = 0;
    loop {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        tries += 1;
        if out.status.success() {
            break;
        }
        assert!(
            err.contains("accurate CPU usage") && tries < 5,
            "qemu-img {args:?} failed ({tries} tries): {err}"
        );
    }
    unsupported_because(&open_err(&p, &o), "encryption");

    // External data file and extended L2, made by qemu-img.
    let p = d.join("ext.qcow2");
    let data = d.join("ext.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.display()),
        p.to_str().unwrap(),
        "1M",
    ]);
    unsupported_because(&open_err(&p, &o), "external data file");
    let p = d.join("xl2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        p.to_str().unwrap(),
        "1M",
    ]);
    unsupported_because(&open_err(&p, &o), "extended L2");

    // Dirty (lazy refcounts not written back): info tells; a read-only open
    // reads it as is and says so; a read-write open rebuilds the refcounts
    // and clears the bit (issue 9). Corrupt: info tells, open refuses.
    let p = plain(d, "dirty.qcow2");
    patch(&p, 72, &1u64.to_be_bytes());
    assert!(info(&p, &o).unwrap().dirty);
    let ro = Image::open(&p, &o.clone().read_only(true).format(Format::Qcow2)).unwrap();
    assert!(ro.as_qcow2().unwrap().was_dirty());
    drop(ro);
    assert!(
        info(&p, &o).unwrap().dirty,
        "a read-only open changes nothing"
    );
    drop(Image::open(&p, &o.clone().format(Format::Qcow2)).unwrap());
    assert!(!info(&p, &o).unwrap().dirty);
    assert_qemu_clean(&p);
    let p = plain(d, "corrupt.qcow2");
    patch(&p, 72, &2u64.to_be_bytes());
    assert!(matches!(open_err(&p, &o), Error::Corrupt { .. }));
    assert!(info(&p, &o).unwrap().corrupt);

    // Found by fuzzing (each crashed the engine before our checks):
    // no refcount table at all,
    let p = plain(d, "nort.qcow2");
    patch(&p, 56, &0u32.to_be_bytes());
    invalid_because(&open_err(&p, &o), "no refcount table");
    // a refcount table whose first block is missing (unbounded recursion in
    // imago's allocator on the first write) — refused for writing only,
    let p = plain(d, "norb.qcow2");
    let rt = {
        let mut b = [0u8; 8];
        std::fs::File::open(&p)
            .unwrap()
            .read_exact_at(&mut b, 48)
            .unwrap();
        u64::from_be_bytes(b)
    };
    patch(&p, rt, &0u64.to_be_bytes());
    invalid_because(&open_err(&p, &o), "refcount block");
    Image::open(&p, &o.clone().read_only(true)).unwrap();
    // a feature name table with a torn last entry.
    // (our header ends at 112 with the end-of-extensions marker: put a
    // feature name table of one byte there instead).
    let p = plain(d, "feat.qcow2");
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x6803_f857u32.to_be_bytes());
    ext.extend_from_slice(&1u32.to_be_bytes());
    ext.extend_from_slice(&[b'x', 0, 0, 0, 0, 0, 0, 0]);
    ext.extend_from_slice(&[0u8; 8]);
    patch(&p, 112, &ext);
    invalid_because(&open_err(&p, &o), "feature name table");

    // Backing name running past the first cluster.
    let p = plain(d, "bname.qcow2");
    patch(&p, 8, &65000u64.to_be_bytes());
    patch(&p, 16, &1000u32.to_be_bytes());
    invalid_because(&open_err(&p, &o), "backing file name");
}

/// Hostile headers never make `Image::open` panic: random single-byte and
/// field corruptions of a valid header.
#[test]
fn header_bit_flips_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = plain(dir.path(), "base.qcow2");
    let img = Qcow2Image::open(&base, &OpenOptions::new()).unwrap();
    vmvol_format::BlockIo::write_at(&img, &pattern(1, 100_000), 5000).unwrap();
    drop(img);
    let good = std::fs::read(&base).unwrap();
    let p = dir.path().join("flip.qcow2");
    for i in 0..400u64 {
        let mut bytes = good.clone();
        let r = pattern(i, 16);
        let at = (u64::from_le_bytes(r[..8].try_into().unwrap()) % 512) as usize;
        bytes[at] ^= r[8] | 1;
        std::fs::write(&p, &bytes).unwrap();
        LARGEST.store(0, Ordering::Relaxed);
        if let Ok(img) = Image::open(&p, &OpenOptions::new()) {
            let mut buf = vec![0u8; 200_000];
            let _ = vmvol_format::BlockIo::read_at(&img, &mut buf, 0);
            let _ = img.map(0, vmvol_format::BlockIo::size(&img).min(1 << 30));
        }
        assert!(
            LARGEST.load(Ordering::Relaxed) < 64 << 20,
            "flip {i} at {at}"
        );
    }
}
