//! Helpers shared by the format integration tests: running qemu-img, checking
//! its verdicts, and making test data.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Whether the external `tool` (an oracle such as `qemu-img`) is on `PATH`.
/// Missing, a test skips (returns early, saying why) unless
/// `VMVOL_REQUIRE_TOOLS=1` is set, in which case it fails naming the tool.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("VMVOL_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{tool} is required (VMVOL_REQUIRE_TOOLS=1) but not found on PATH"
        );
        eprintln!("SKIP: {tool} not found on PATH");
    }
    found
}

/// Run qemu-img with `args`; panics with its stderr if it fails.
pub fn qemu_img(args: &[&str]) -> Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run qemu-io commands on an image (used to build interop fixtures).
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path);
    let out = c.output().unwrap();
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io {cmds:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` says the qcow2 image is clean (no errors, no leaks).
pub fn assert_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {} not clean: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` says the image and the raw file hold the same bytes.
pub fn assert_compare(img: &Path, fmt: &str, raw: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fmt, "-F", "raw"])
        .arg(img)
        .arg(raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} vs {}: {}{}",
        img.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Parse `qemu-img <args> --output=json`.
pub fn qemu_json(args: &[&str]) -> serde_json::Value {
    let mut a: Vec<&str> = args.to_vec();
    a.push("--output=json");
    let out = qemu_img(&a);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Assert our map (serialized [`vmvol_format::MapExtent`]s) equals
/// `qemu-img map --output=json`'s on the fields the installed qemu-img prints.
/// Versions differ in one field: qemu-img 10.x prints `"compressed"` for
/// every extent, 7.2 does not print it at all (start, length, depth,
/// present, zero, data and offset are printed by both). Where qemu-img does
/// not print it, ours is left out of the comparison.
pub fn assert_map_eq(ours: &serde_json::Value, theirs: &serde_json::Value, what: &str) {
    let qemu_has_compressed = theirs
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e.get("compressed").is_some()));
    let mut ours = ours.clone();
    if !qemu_has_compressed {
        for e in ours.as_array_mut().into_iter().flatten() {
            if let Some(o) = e.as_object_mut() {
                o.remove("compressed");
            }
        }
    }
    assert_eq!(
        &ours, theirs,
        "map of {what} differs\nours:   {ours}\nqemu's: {theirs}"
    );
}

/// Number of compressed clusters `qemu-img check` counts (every version
/// prints this; only 10.x marks compressed extents in `map`).
pub fn qemu_compressed_clusters(path: &Path) -> u64 {
    qemu_check(path)["compressed-clusters"]
        .as_u64()
        .unwrap_or(0)
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Run qemu-img with `args`, returning (exit code, stdout, stderr).
pub fn qemu_img_status(args: &[&str]) -> (i32, String, String) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// qemu-img must succeed.
pub fn qemu_ok(args: &[&str]) -> String {
    let (rc, out, err) = qemu_img_status(args);
    assert_eq!(rc, 0, "qemu-img {args:?} failed: {out}{err}");
    out
}

/// `qemu-img check --output=json` as JSON (any exit code).
pub fn qemu_check(path: &Path) -> serde_json::Value {
    let (_, out, err) = qemu_img_status(&["check", "--output=json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad check json {e}: {out}{err}"))
}

/// Assert `qemu-img check` finds nothing wrong.
pub fn assert_qemu_clean(path: &Path) {
    let (rc, out, err) = qemu_img_status(&["check", path.to_str().unwrap()]);
    assert_eq!(rc, 0, "qemu-img check {}: {out}{err}", path.display());
}

/// Assert `qemu-img compare` finds identical content (formats detected).
pub fn assert_same(a: &Path, b: &Path) {
    let (rc, out, err) = qemu_img_status(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
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
