//! End-to-end tests of `examples/vmvol.rs`: the binary `cargo test` builds,
//! driven like an operator would, checked with `qemu-img` and e2fsprogs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>/examples/vmvol`, built by `cargo test` before tests run.
fn vmvol_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let p = dir.join("examples").join("vmvol");
    p.exists().then_some(p)
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
        || Command::new(tool).arg("-V").output().is_ok()
}

/// The built example, or `None` (with the reason printed) when it or a tool is missing.
fn require(tools: &[&str]) -> Option<PathBuf> {
    let Some(bin) = vmvol_bin() else {
        eprintln!("skipped: examples/vmvol not built (run via `cargo test --workspace`)");
        return None;
    };
    for t in tools {
        if !have(t) {
            eprintln!("skipped: {t} not installed");
            return None;
        }
    }
    Some(bin)
}

fn run(bin: &Path, args: &[&str], env_root: Option<&Path>) -> Output {
    let mut c = Command::new(bin);
    c.args(args);
    if let Some(r) = env_root {
        c.env("VMVOL_ROOT", r);
    }
    c.output().expect("run vmvol")
}

fn ok(bin: &Path, args: &[&str]) -> String {
    let o = run(bin, args, None);
    assert!(
        o.status.success(),
        "vmvol {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn qemu_json(args: &[&str]) -> serde_json::Value {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn qemu_ok(args: &[&str]) {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn qemu_io(args: &[&str]) {
    let o = Command::new("qemu-io").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-io {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn image_commands_agree_with_qemu_img() {
    let Some(bin) = require(&["qemu-img", "qemu-io"]) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();

    // A raw base with data, a qcow2 overlay on it.
    ok(
        &bin,
        &["image", "create", "-f", "raw", &p("base.raw"), "64M"],
    );
    qemu_io(&["-f", "raw", "-c", "write -P 0x5a 1M 3M", &p("base.raw")]);
    ok(
        &bin,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &p("top.qcow2"),
        ],
    );
    qemu_io(&["-f", "qcow2", "-c", "write -P 0x33 2M 64k", &p("top.qcow2")]);

    // info --output json matches qemu-img's view.
    let ours: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &["image", "info", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    let theirs = qemu_json(&["info", "--output=json", &p("top.qcow2")]);
    for k in ["virtual-size", "cluster-size", "backing-filename", "format"] {
        assert_eq!(ours[k], theirs[k], "field {k}");
    }

    // map --output json: same extents as qemu-img map.
    let ours: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &["image", "map", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    let theirs = qemu_json(&["map", "--output=json", &p("top.qcow2")]);
    let strip = |v: &serde_json::Value| -> Vec<(u64, u64, u64, bool, bool)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["depth"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&ours), strip(&theirs));

    // check: clean, JSON.
    let c: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &["image", "check", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    assert_eq!(c["corruptions"], 0);

    // resize: +SIZE grows; shrinking fails with a message naming both sizes.
    ok(&bin, &["image", "resize", &p("top.qcow2"), "+64M"]);
    let i = qemu_json(&["info", "--output=json", &p("top.qcow2")]);
    assert_eq!(i["virtual-size"], 128u64 << 20);
    let o = run(&bin, &["image", "resize", &p("top.qcow2"), "32M"], None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("134217728") && err.contains("33554432"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // convert flattens; compact -c shrinks; both compare equal.
    ok(
        &bin,
        &[
            "image",
            "convert",
            "-O",
            "qcow2",
            &p("top.qcow2"),
            &p("flat.qcow2"),
        ],
    );
    qemu_ok(&["compare", &p("top.qcow2"), &p("flat.qcow2")]);
    qemu_ok(&["check", &p("flat.qcow2")]);
    let r: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &[
            "image",
            "compact",
            "-c",
            &p("flat.qcow2"),
            "--output",
            "json",
        ],
    ))
    .unwrap();
    assert!(r["bytes_after"].as_u64().unwrap() < r["bytes_before"].as_u64().unwrap());
    qemu_ok(&["compare", &p("top.qcow2"), &p("flat.qcow2")]);
    qemu_ok(&["check", &p("flat.qcow2")]);

    // Errors: a missing file is one line and a non-zero exit.
    let o = run(&bin, &["image", "info", &p("missing.qcow2")], None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.qcow2"));
}

#[test]
fn backing_outside_the_image_directory_is_refused_unless_allowed() {
    let Some(bin) = require(&["qemu-img"]) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let base = other.path().join("base.raw");
    let top = d.path().join("top.qcow2");
    qemu_ok(&["create", "-f", "raw", base.to_str().unwrap(), "16M"]);
    qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    let o = run(&bin, &["image", "info", top.to_str().unwrap()], None);
    assert!(
        !o.status.success(),
        "a backing file outside the image's directory must be refused"
    );
    let out = ok(
        &bin,
        &[
            "image",
            "info",
            top.to_str().unwrap(),
            "--allow-root",
            other.path().to_str().unwrap(),
        ],
    );
    assert!(out.contains("base.raw"));
}

#[test]
fn pool_commands() {
    let Some(bin) = require(&[]) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let r = Some(root.path());
    let o = run(
        &bin,
        &["pool", "define", "p1", "--quota", "10G", "--activate"],
        r,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&bin, &["pool", "info", "p1", "--output", "json"], r);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["capacity"], 10u64 << 30);
    let o = run(&bin, &["pool", "list", "--output", "json"], r);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    // Defining twice fails with a one-line error naming the pool.
    let o = run(&bin, &["pool", "define", "p1"], r);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("p1"));
    // A bad name says which rule it broke.
    let o = run(&bin, &["pool", "define", "a/b"], r);
    assert!(!o.status.success());
    for cmd in [
        ["pool", "deactivate", "p1"],
        ["pool", "refresh", "p1"],
        ["pool", "undefine", "p1"],
    ] {
        let o = run(&bin, &cmd, r);
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = run(&bin, &["pool", "list", "--output", "json"], r);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.as_array().unwrap().is_empty());
}

#[test]
fn ext4_create_free_and_compact() {
    let Some(bin) = require(&["qemu-img", "e2fsck"]) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("vol.qcow2");
    let img_s = img.to_str().unwrap();
    ok(
        &bin,
        &[
            "image", "create", "-f", "qcow2", "--ext4", "--label", "data", img_s, "256M",
        ],
    );
    // e2fsck through a raw conversion by qemu-img.
    let raw = d.path().join("vol.raw");
    qemu_ok(&["convert", "-O", "raw", img_s, raw.to_str().unwrap()]);
    let o = Command::new("e2fsck")
        .args(["-fn", raw.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&bin, &["fs", "free", img_s, "--output", "json"])).unwrap();
    assert!(v["free_bytes"].as_u64().unwrap() > 200 << 20);
    ok(&bin, &["image", "compact", img_s]);
    qemu_ok(&["check", img_s]);
}

#[test]
fn compact_drops_deleted_files_using_the_ext4_free_map() {
    let Some(bin) = require(&["qemu-img", "e2fsck", "debugfs"]) else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    // A tree with one file to keep and one big file to delete.
    let tree = d.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let keep: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(tree.join("keep.bin"), &keep).unwrap();
    let mut x = 7u64;
    let big: Vec<u8> = (0..24 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(tree.join("big.bin"), &big).unwrap();

    ok(
        &bin,
        &[
            "fs",
            "populate",
            &p("vol.raw"),
            "--from",
            tree.to_str().unwrap(),
            "--size",
            "64M",
        ],
    );
    // Delete the big file behind the library's back, as a guest would.
    let o = Command::new("debugfs")
        .args(["-w", "-R", "rm /big.bin", &p("vol.raw")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Its blocks still hold data: qemu-img convert keeps them, and so does a
    // compaction told not to read the filesystem.
    ok(
        &bin,
        &[
            "image",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("vol.raw"),
            &p("a.qcow2"),
        ],
    );
    std::fs::copy(p("a.qcow2"), p("b.qcow2")).unwrap();
    let plain: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &[
            "image",
            "compact",
            "--no-fs-free",
            &p("a.qcow2"),
            "--output",
            "json",
        ],
    ))
    .unwrap();
    let aware: serde_json::Value = serde_json::from_str(&ok(
        &bin,
        &["image", "compact", &p("b.qcow2"), "--output", "json"],
    ))
    .unwrap();
    let (plain_after, aware_after) = (
        plain["bytes_after"].as_u64().unwrap(),
        aware["bytes_after"].as_u64().unwrap(),
    );
    assert!(
        plain_after > 24 << 20,
        "without the map the deleted data stays: {plain_after}"
    );
    assert!(
        aware_after < 8 << 20,
        "with the map it is dropped: {aware_after}"
    );

    // The compacted filesystem is intact and the kept file reads back.
    qemu_ok(&["check", &p("b.qcow2")]);
    qemu_ok(&["convert", "-O", "raw", &p("b.qcow2"), &p("b.raw")]);
    let o = Command::new("e2fsck")
        .args(["-fn", &p("b.raw")])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = Command::new("debugfs")
        .args(["-R", "cat /keep.bin", &p("b.raw")])
        .output()
        .unwrap();
    assert_eq!(o.stdout, keep);
}
