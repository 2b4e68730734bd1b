//! Helpers shared by format-b's integration tests (qemu-img driving, data).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Whether qemu-img is installed; tests skip (with a message) without it.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("qemu-img not installed: skipping");
    }
    ok
}

/// Run qemu-img with `args`, returning (exit code, stdout, stderr).
pub fn qemu_img(args: &[&str]) -> (i32, String, String) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// qemu-img must succeed.
pub fn qemu_ok(args: &[&str]) -> String {
    let (rc, out, err) = qemu_img(args);
    assert_eq!(rc, 0, "qemu-img {args:?} failed: {out}{err}");
    out
}

/// `qemu-img check --output=json` as JSON (any exit code).
pub fn qemu_check(path: &Path) -> serde_json::Value {
    let (_, out, err) = qemu_img(&["check", "--output=json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad check json {e}: {out}{err}"))
}

/// Assert `qemu-img check` finds nothing wrong.
pub fn assert_qemu_clean(path: &Path) {
    let (rc, out, err) = qemu_img(&["check", path.to_str().unwrap()]);
    assert_eq!(rc, 0, "qemu-img check {}: {out}{err}", path.display());
}

/// Assert `qemu-img compare` finds identical content (formats detected).
pub fn assert_same(a: &Path, b: &Path) {
    let (rc, out, err) = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(rc, 0, "compare {} {}: {out}{err}", a.display(), b.display());
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compressible but non-trivial bytes.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"volume ",
        b"cluster ",
        b"qcow2 ",
        b"ext4 ",
        b"block\n",
        b"vmvol ",
    ];
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(words[(x % 6) as usize]);
    }
    v.truncate(len);
    v
}

/// A sparse raw file of `size` with `(offset, bytes)` written into it.
pub fn raw_with(path: &Path, size: u64, writes: &[(u64, Vec<u8>)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, data) in writes {
        f.write_all_at(data, *off).unwrap();
    }
}

/// Host bytes allocated by a file.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A typical mixed content: random, text, zero-filled written clusters.
pub fn mixed_writes(size: u64) -> Vec<(u64, Vec<u8>)> {
    let mut w = Vec::new();
    let mut off = 0u64;
    let mut i = 0u64;
    while off + (256 << 10) < size {
        match i % 5 {
            0 => w.push((off + 4096, noise(i, 100_000))),
            1 => w.push((off, text(i, 200_000))),
            2 => w.push((off + 512, vec![0u8; 65536])), // written zeros
            3 => {}
            _ => w.push((off + 7, text(i, 3000))),
        }
        off += 1 << 20;
        i += 1;
    }
    w
}
