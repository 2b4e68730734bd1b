//! End-to-end tests of the `vmvol` CLI (`examples/vmvol/`): the real binary,
//! driven like an operator would, checked with `qemu-img` and e2fsprogs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The CLI binary of this build: `cargo build --example vmvol` with the
/// profile and target directory this test was built with (a no-op when
/// `cargo test` already built it, a rebuild when the sources changed since).
/// Panics when the build fails, or when cargo cannot run and no binary is
/// there: a CLI test must never pass without the CLI, nor test a stale one.
fn vmvol() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // <target>/<profile dir>/deps/cli-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in <target>/<profile>/deps");
        let bin = profile_dir.join("examples").join("vmvol");
        let dir_name = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        // `cargo test` builds examples with the test profile ("bench" with
        // --release); both write to the dev/release profile's directory.
        let profile = match dir_name {
            "debug" => "test",
            "release" => "bench",
            other => other,
        };
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "vmvol", "--example", "vmvol"])
            .args(["--profile", profile])
            // The features this test was built with (RBD pools with `rbd`).
            .args(if cfg!(feature = "rbd") {
                &["--features", "rbd"][..]
            } else {
                &[][..]
            })
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if let Some(target) = profile_dir.parent() {
            if target.join("CACHEDIR.TAG").exists() {
                build.arg("--target-dir").arg(target);
            }
        }
        match build.output() {
            Ok(o) if o.status.success() => assert!(
                bin.exists(),
                "`cargo build --example vmvol --profile {profile}` succeeded but {} is missing",
                bin.display()
            ),
            // The sources do not build: an older binary must not be tested.
            Ok(o) => panic!(
                "`cargo build --example vmvol --profile {profile}` failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            // No cargo here (a copied test binary): use the one built beside it.
            Err(e) if bin.exists() => eprintln!(
                "warning: cannot run cargo ({e}); testing the existing {}",
                bin.display()
            ),
            Err(e) => panic!(
                "the vmvol CLI is neither built ({} missing) nor buildable (cannot run cargo: {e})",
                bin.display()
            ),
        }
        bin
    })
}

/// Whether the external `tool` can be run. When it cannot: with
/// `VMVOL_REQUIRE_TOOLS=1` (CI) the test fails naming the tool, otherwise it
/// prints why it skips and the caller returns.
fn require_tool(tool: &str) -> bool {
    let found = match Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    };
    if found {
        return true;
    }
    if std::env::var("VMVOL_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("{tool} is not installed (or not on PATH), and VMVOL_REQUIRE_TOOLS=1 requires it");
    }
    eprintln!("skipped: {tool} is not installed (set VMVOL_REQUIRE_TOOLS=1 to fail instead)");
    false
}

/// SIGKILLed `fs populate` and `image resize` (issue 9).
#[path = "cli/crash.rs"]
mod crash;

/// The throwaway Ceph cluster of vmvol-rbd's tests (one per test binary),
/// shared by path rather than copied.
#[cfg(feature = "rbd")]
#[allow(dead_code)]
#[path = "../../rbd/tests/rbd/cluster.rs"]
mod cluster;
/// Real Linux guests under QEMU mount what `vmvol instance attach` gave them.
#[path = "cli/guest.rs"]
mod guest;
/// Guests reach RBD volumes over vhost-user-blk (issue 13).
#[cfg(feature = "rbd")]
#[path = "cli/rbd_guest.rs"]
mod rbd_guest;
/// `vmvol serve` (issue 12).
#[path = "cli/serve.rs"]
mod serve;

/// Return from the test (skipping) unless every tool is present.
macro_rules! require_tools {
    ($($tool:expr),+) => {
        $(
            if !require_tool($tool) {
                return;
            }
        )+
    };
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
    require_tools!("qemu-img", "qemu-io");
    let bin = vmvol();
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();

    // A raw base with data, a qcow2 overlay on it.
    ok(
        bin,
        &["image", "create", "-f", "raw", &p("base.raw"), "64M"],
    );
    qemu_io(&["-f", "raw", "-c", "write -P 0x5a 1M 3M", &p("base.raw")]);
    ok(
        bin,
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
        bin,
        &["image", "info", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    let theirs = qemu_json(&["info", "--output=json", &p("top.qcow2")]);
    for k in ["virtual-size", "cluster-size", "backing-filename", "format"] {
        assert_eq!(ours[k], theirs[k], "field {k}");
    }

    // map --output json: same extents as qemu-img map.
    let ours: serde_json::Value = serde_json::from_str(&ok(
        bin,
        &["image", "map", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    let theirs = qemu_json(&["map", "--output=json", &p("top.qcow2")]);
    // The fields qemu-img 7.2 and 10.x both print; 10.x added "compressed"
    // (and "offset" is host-layout specific), so whole objects are not compared.
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
        bin,
        &["image", "check", &p("top.qcow2"), "--output", "json"],
    ))
    .unwrap();
    assert_eq!(c["corruptions"], 0);

    // resize: +SIZE grows; shrinking fails with a message naming both sizes.
    ok(bin, &["image", "resize", &p("top.qcow2"), "+64M"]);
    let i = qemu_json(&["info", "--output=json", &p("top.qcow2")]);
    assert_eq!(i["virtual-size"], 128u64 << 20);
    let o = run(bin, &["image", "resize", &p("top.qcow2"), "32M"], None);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("134217728") && err.contains("33554432"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // convert flattens; compact -c shrinks; both compare equal.
    ok(
        bin,
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
        bin,
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
    let o = run(bin, &["image", "info", &p("missing.qcow2")], None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.qcow2"));
}

#[test]
fn backing_outside_the_image_directory_is_refused_unless_allowed() {
    require_tools!("qemu-img");
    let bin = vmvol();
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
    let o = run(bin, &["image", "info", top.to_str().unwrap()], None);
    assert!(
        !o.status.success(),
        "a backing file outside the image's directory must be refused"
    );
    let out = ok(
        bin,
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
    let bin = vmvol();
    let root = tempfile::tempdir().unwrap();
    let r = Some(root.path());
    let o = run(
        bin,
        &["pool", "define", "p1", "--quota", "10G", "--activate"],
        r,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(bin, &["pool", "info", "p1", "--output", "json"], r);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["capacity"], 10u64 << 30);
    let o = run(bin, &["pool", "list", "--output", "json"], r);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    // Defining twice fails with a one-line error naming the pool.
    let o = run(bin, &["pool", "define", "p1"], r);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("p1"));
    // A bad name says which rule it broke.
    let o = run(bin, &["pool", "define", "a/b"], r);
    assert!(!o.status.success());
    for cmd in [
        ["pool", "deactivate", "p1"],
        ["pool", "refresh", "p1"],
        ["pool", "undefine", "p1"],
    ] {
        let o = run(bin, &cmd, r);
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = run(bin, &["pool", "list", "--output", "json"], r);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v.as_array().unwrap().is_empty());
}

#[test]
fn ext4_create_free_and_compact() {
    require_tools!("qemu-img", "e2fsck");
    let bin = vmvol();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("vol.qcow2");
    let img_s = img.to_str().unwrap();
    ok(
        bin,
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
        serde_json::from_str(&ok(bin, &["fs", "free", img_s, "--output", "json"])).unwrap();
    assert!(v["free_bytes"].as_u64().unwrap() > 200 << 20);
    ok(bin, &["image", "compact", img_s]);
    qemu_ok(&["check", img_s]);
}

#[test]
fn compact_drops_deleted_files_using_the_ext4_free_map() {
    require_tools!("qemu-img", "e2fsck", "debugfs");
    let bin = vmvol();
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
        bin,
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
        bin,
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
        bin,
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
        bin,
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

/// A raw file of `mib` MiB of non-zero, poorly compressible bytes (every
/// cluster allocated, so convert and compact must copy and compress all of it).
fn write_busy_raw(path: &Path, mib: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whether `dir` holds a temporary output (`*.vmvol-tmp`): convert or compact
/// is under way.
fn temp_output_in(dir: &Path) -> impl Fn() -> bool + '_ {
    move || names(dir).iter().any(|n| n.ends_with(".vmvol-tmp"))
}

/// Run `vmvol args` in the background, wait until `started` says the
/// operation is under way, send `signal`, and return its exit status and
/// stderr.
fn interrupt_midway(
    args: &[&str],
    started: impl Fn() -> bool,
    signal: libc::c_int,
) -> (Option<i32>, String) {
    let mut child = Command::new(vmvol())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let spawned = Instant::now();
    loop {
        if started() {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("vmvol {args:?} ended ({st}) before it could be interrupted: {err}");
        }
        assert!(
            spawned.elapsed() < Duration::from_secs(60),
            "vmvol {args:?} did not get under way in 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Let it get well into the copy.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().unwrap().is_none(),
        "vmvol {args:?} finished within 200 ms: the input is too small to interrupt"
    );
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been reaped yet (so the
    // pid cannot have been reused).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({pid})");
    let signalled = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "cancellation took {:?}",
        signalled.elapsed()
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ctrl_c_cancels_convert_and_leaves_no_output() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    write_busy_raw(&src, 512);
    let dst = d.path().join("out.qcow2");
    let (code, err) = interrupt_midway(
        &[
            "image",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
        temp_output_in(d.path()),
        libc::SIGINT,
    );
    assert_eq!(code, Some(130), "exit status after Ctrl-C; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("cancelled"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Neither the output nor its temporary file is left.
    assert_eq!(names(d.path()), ["src.raw"]);
}

#[test]
fn sigint_and_sigterm_cancel_compact_and_keep_the_image() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    write_busy_raw(&src, 512);
    let img = d.path().join("a.qcow2");
    let img_s = img.to_str().unwrap();
    ok(
        vmvol(),
        &[
            "image",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            img_s,
        ],
    );
    let meta = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.len(), m.mtime(), m.mtime_nsec())
    };
    let before = meta(&img);
    for (signal, status) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let (code, err) = interrupt_midway(
            &["image", "compact", "-c", "--no-fs-free", img_s],
            temp_output_in(d.path()),
            signal,
        );
        assert_eq!(
            code,
            Some(status),
            "exit status after signal {signal}; stderr: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains("compact cancelled"), "{err}");
        // No temporary file; the image is the very file it was (same inode,
        // untouched), not a replacement.
        assert_eq!(names(d.path()), ["a.qcow2", "src.raw"]);
        assert_eq!(meta(&img), before, "signal {signal}");
    }
    // Still a whole, valid image with the source's content.
    if require_tool("qemu-img") {
        qemu_ok(&["check", img_s]);
        qemu_ok(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            src.to_str().unwrap(),
            img_s,
        ]);
    }
}

/// A sparse raw image whose map has thousands of extents: 4 KiB of data every
/// 64 KiB over 256 MiB (far more output than a pipe buffers).
fn fragmented_raw(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(256 << 20).unwrap();
    for off in (0..256u64 << 20).step_by(64 << 10) {
        f.write_all_at(&[0xa5; 4096], off).unwrap();
    }
}

#[test]
fn closed_stdout_ends_quietly() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("frag.raw");
    fragmented_raw(&img);
    let img_s = img.to_str().unwrap();

    // `vmvol image map … | head -1`: read one line, then close the pipe.
    let mut child = Command::new(vmvol())
        .args(["image", "map", img_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("Offset"), "{first:?}");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "nothing on stderr, got: {err}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);

    // JSON output, reader closed before anything is read.
    let mut child = Command::new(vmvol())
        .args(["image", "map", img_s, "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "nothing on stderr, got: {err}");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);

    // The same command with a reader that stays: all of it arrives.
    let o = run(vmvol(), &["image", "map", img_s, "--output", "json"], None);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2 * 4096);
}

/// Whether `path` exists and has at least `bytes` allocated on the host.
fn allocated_at_least(path: &Path, bytes: u64) -> impl Fn() -> bool + '_ {
    move || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).is_ok_and(|m| m.blocks() * 512 >= bytes)
    }
}

#[test]
fn ctrl_c_cancels_populate_and_preallocation_and_removes_the_new_image() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    // Many files: populate polls the cancel flag between files and between a
    // file's data segments, not inside one dense segment.
    for i in 0..256 {
        write_busy_raw(&tree.join(format!("f{i:03}.bin")), 2);
    }

    // fs populate into an image it creates: the image goes with the cancel.
    let img = d.path().join("vol.raw");
    let (code, err) = interrupt_midway(
        &[
            "fs",
            "populate",
            img.to_str().unwrap(),
            "--from",
            tree.to_str().unwrap(),
        ],
        allocated_at_least(&img, 8 << 20),
        libc::SIGINT,
    );
    assert_eq!(code, Some(130), "exit status after Ctrl-C; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("populate cancelled"), "{err}");
    assert_eq!(names(d.path()), ["tree"]);

    // image create with full preallocation: the half-written file goes.
    let img = d.path().join("full.raw");
    let (code, err) = interrupt_midway(
        &[
            "image",
            "create",
            "-f",
            "raw",
            "--preallocation",
            "full",
            img.to_str().unwrap(),
            "8G",
        ],
        allocated_at_least(&img, 8 << 20),
        libc::SIGINT,
    );
    assert_eq!(code, Some(130), "exit status after Ctrl-C; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(names(d.path()), ["tree"]);
}

/// `vmvol` with `VMVOL_ROOT=root`: (success, stdout, stderr).
fn vol(root: &Path, args: &[&str]) -> (bool, String, String) {
    let o = run(vmvol(), args, Some(root));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn vol_ok(root: &Path, args: &[&str]) -> String {
    let (ok, out, err) = vol(root, args);
    assert!(ok, "vmvol {args:?} failed: {err}");
    out
}

fn vol_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&vol_ok(root, &a)).unwrap()
}

/// A one-line error on stderr and a non-zero exit.
fn vol_fails(root: &Path, args: &[&str], needle: &str) {
    let (ok, _, err) = vol(root, args);
    assert!(!ok, "vmvol {args:?} succeeded");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(needle),
        "vmvol {args:?}: {err:?} lacks {needle:?}"
    );
}

fn volume_file(root: &Path, name: &str, pool: &str) -> String {
    let d = vol_json(root, &["volume", "describe", name, "--pool", pool]);
    d["path"]["path"].as_str().unwrap().to_string()
}

#[test]
fn volume_template_snapshot_commands() {
    require_tools!("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("reg");
    let root = root.as_path();
    vol_ok(
        root,
        &["pool", "define", "default", "--quota", "4G", "--activate"],
    );
    vol_ok(
        root,
        &["pool", "define", "backup", "--quota", "4G", "--activate"],
    );

    // Blank volumes of each kind; --pool defaults to `default`.
    vol_ok(
        root,
        &["volume", "create", "web", "--size", "64M", "--ext4"],
    );
    vol_ok(
        root,
        &[
            "volume",
            "create",
            "raw1",
            "--pool",
            "default",
            "--size",
            "8M",
            "-f",
            "raw",
            "--prealloc",
            "full",
        ],
    );
    let j = vol_json(root, &["volume", "describe", "web", "--pool", "default"]);
    for k in [
        "name",
        "uuid",
        "pool",
        "path",
        "format",
        "capacity",
        "allocation",
        "backing",
        "attachments",
        "created",
    ] {
        assert!(j.get(k).is_some(), "describe --output json lacks {k}: {j}");
    }
    assert_eq!(j["capacity"], 64 << 20);
    qemu_ok(&["check", &volume_file(root, "web", "default")]);

    // From an archive.
    let src = d.path().join("tree");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello.txt"), b"hello from the archive\n").unwrap();
    let tarball = d.path().join("tree.tar");
    let st = Command::new("tar")
        .args([
            "-cf",
            tarball.to_str().unwrap(),
            "-C",
            src.to_str().unwrap(),
            ".",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    vol_ok(
        root,
        &[
            "volume",
            "create",
            "arch",
            "--pool",
            "default",
            "--from-archive",
            tarball.to_str().unwrap(),
        ],
    );
    qemu_ok(&["check", &volume_file(root, "arch", "default")]);

    // Templates, linked and full volumes.
    vol_ok(
        root,
        &[
            "template",
            "create",
            "tpl",
            "--pool",
            "default",
            "--from-volume",
            "web",
        ],
    );
    vol_ok(
        root,
        &[
            "volume",
            "create",
            "linked",
            "--pool",
            "default",
            "--from-template",
            "tpl",
        ],
    );
    vol_ok(
        root,
        &[
            "volume",
            "create",
            "copy",
            "--pool",
            "default",
            "--from-template",
            "tpl",
            "--full",
            "--size",
            "128M",
        ],
    );
    let j = vol_json(root, &["volume", "describe", "linked"]);
    assert_eq!(j["backing"][0]["name"], "tpl");
    qemu_ok(&["check", &volume_file(root, "linked", "default")]);
    qemu_ok(&[
        "compare",
        &volume_file(root, "linked", "default"),
        &volume_file(root, "web", "default"),
    ]);
    let t = vol_json(root, &["template", "list", "--pool", "default"]);
    assert_eq!(t.as_array().unwrap().len(), 1);
    vol_json(root, &["template", "describe", "tpl"]);
    vol_fails(root, &["template", "delete", "tpl"], "volume linked");

    // Lists with filters.
    let l = vol_json(root, &["volume", "list", "--name", "LINK"]);
    assert_eq!(l.as_array().unwrap().len(), 1);
    let l = vol_json(
        root,
        &[
            "volume",
            "list",
            "--pool",
            "default",
            "--format",
            "raw",
            "--available",
        ],
    );
    assert_eq!(l[0]["name"], "raw1");
    let l = vol_json(root, &["volume", "list", "--attached"]);
    assert!(l.as_array().unwrap().is_empty());

    // Resize, clone across pools, compress.
    vol_ok(
        root,
        &["volume", "resize", "web", "--pool", "default", "+16M"],
    );
    vol_ok(
        root,
        &["volume", "resize", "raw1", "--pool", "default", "16M"],
    );
    vol_fails(root, &["volume", "resize", "raw1", "4M"], "shrink");
    vol_ok(
        root,
        &[
            "volume",
            "clone",
            "web",
            "web2",
            "--pool",
            "default",
            "--to-pool",
            "backup",
        ],
    );
    qemu_ok(&[
        "compare",
        &volume_file(root, "web", "default"),
        &volume_file(root, "web2", "backup"),
    ]);
    let c = vol_json(
        root,
        &[
            "volume",
            "compress",
            "copy",
            "--pool",
            "default",
            "-c",
            "--compression-type",
            "zlib",
        ],
    );
    assert!(c["bytes_after"].as_u64().unwrap() <= c["bytes_before"].as_u64().unwrap());
    qemu_ok(&["check", &volume_file(root, "copy", "default")]);
    vol_fails(root, &["volume", "compress", "raw1"], "only qcow2");

    // Snapshots.
    vol_ok(
        root,
        &[
            "snapshot", "create", "s1", "--pool", "default", "--volume", "copy",
        ],
    );
    let s = vol_json(root, &["snapshot", "list", "--volume", "copy"]);
    assert_eq!(
        (s[0]["status"].as_str(), s[0]["record"]["name"].as_str()),
        (Some("ok"), Some("s1"))
    );
    vol_json(root, &["snapshot", "describe", "s1", "--pool", "default"]);
    vol_ok(
        root,
        &[
            "volume",
            "create",
            "restored",
            "--from-snapshot",
            "s1",
            "--full",
        ],
    );
    qemu_ok(&[
        "compare",
        &volume_file(root, "restored", "default"),
        &volume_file(root, "copy", "default"),
    ]);
    vol_fails(
        root,
        &["snapshot", "delete", "s1", "--pool", "default"],
        "volume copy",
    );
    vol_ok(
        root,
        &["snapshot", "delete", "s1", "--pool", "default", "--merge"],
    );
    qemu_ok(&["check", &volume_file(root, "copy", "default")]);

    // Bad input: one-line errors, non-zero exit.
    vol_fails(
        root,
        &["volume", "create", "../x", "--size", "1M"],
        "invalid name",
    );
    vol_fails(
        root,
        &["volume", "create", "web", "--size", "1M"],
        "already exists",
    );
    vol_fails(
        root,
        &["volume", "create", "n", "--pool", "nope", "--size", "1M"],
        "not found",
    );
    vol_fails(root, &["volume", "delete", "ghost"], "not found");

    // Delete.
    vol_ok(root, &["volume", "delete", "linked", "--pool", "default"]);
    vol_ok(root, &["template", "delete", "tpl", "--pool", "default"]);
    let l = vol_json(root, &["volume", "list"]);
    let names: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["arch", "copy", "raw1", "restored", "web", "web2"]);
}

/// `vmvol instance`: attach from `--volume` specs and from the seed's JSON
/// request, disks as CHV JSON and `--disk` arguments, list/show, refusals
/// as one line each, detach (idempotent).
#[test]
fn instance_commands() {
    require_tools!("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("reg");
    vol_ok(
        &root,
        &["pool", "define", "default", "--quota", "1G", "--activate"],
    );
    vol_ok(
        &root,
        &["pool", "define", "other", "--quota", "1G", "--activate"],
    );
    vol_ok(
        &root,
        &["volume", "create", "db", "--size", "32M", "--ext4"],
    );
    vol_ok(
        &root,
        &[
            "volume", "create", "base", "--size", "32M", "--ext4", "--pool", "other",
        ],
    );
    let rootfs = d.path().join("rootfs.raw");
    let ovl = d.path().join("overlay.qcow2");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    qemu_ok(&["create", "-q", "-f", "qcow2", ovl.to_str().unwrap(), "16M"]);
    let (r, o) = (rootfs.to_str().unwrap(), ovl.to_str().unwrap());
    fn with<'a>(r: &'a str, o: &'a str, id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "instance",
            "attach",
            id,
            "--rootfs",
            r,
            "--instance-overlay",
            o,
        ];
        a.extend(extra);
        a
    }
    let vm = vol_json(
        &root,
        &with(
            r,
            o,
            "vm-1",
            &[
                "--volume",
                "db:/data",
                "--volume",
                "other/base:/srv:ro:overlay=8M,block",
            ],
        ),
    );
    assert_eq!(vm["instance"]["instance"]["state"], "attached");
    // Formats were detected, never left to the VMM's probing.
    let disks: serde_json::Value =
        serde_json::from_str(&vol_ok(&root, &["instance", "disks", "vm-1"])).unwrap();
    assert_eq!(disks[0]["image_type"], "Raw");
    assert_eq!(disks[1]["image_type"], "Qcow2");
    assert_eq!(disks[4]["backing_files"], true);
    let args = vol_ok(
        &root,
        &["instance", "disks", "vm-1", "--output", "chv-args"],
    );
    assert_eq!(args.lines().filter(|l| *l == "--disk").count(), 1);
    assert!(args.contains("id=vdd,serial=vdd-db"), "{args}");

    // The seed's request JSON (sizes as strings) for a second instance.
    let req = d.path().join("req.json");
    std::fs::write(
        &req,
        r#"[{"pool": "other", "volume_id": "base", "mount_path": "/srv", "readonly": true,
             "overlay": true, "overlay_size": "16MB"}]"#,
    )
    .unwrap();
    let vm2 = vol_json(
        &root,
        &with(r, o, "vm-2", &["--request", req.to_str().unwrap()]),
    );
    assert_eq!(vm2["plan"]["volume_mounts"][0]["mode"], "overlay");
    assert_eq!(
        vm2["plan"]["volume_mounts"][0]["overlay_device"],
        "/dev/vde"
    );

    // Refusals: one line each, naming the rule and the holder.
    vol_fails(
        &root,
        &with(r, o, "vm-3", &["--volume", "db:/data:ro"]),
        "held by vm-1 (rw)",
    );
    vol_fails(
        &root,
        &with(r, o, "vm-3", &["--volume", "db:/etc"]),
        "belongs to the guest system",
    );
    vol_fails(
        &root,
        &with(r, o, "vm-1", &["--volume", "base:/x"]),
        "already exists",
    );
    vol_fails(
        &root,
        &with(r, o, "vm-3", &["--volume", "nope:/x"]),
        "not found",
    );
    vol_fails(
        &root,
        &with(r, o, "vm-3", &["--volume", "db:/x:overlay=1G"]),
        "readonly=true",
    );
    vol_fails(&root, &["volume", "delete", "db"], "vm-1");

    // Online resize of the read-write volume: the request names the disk
    // by the id its DiskConfig carries.
    let r = vol_json(&root, &["volume", "resize", "db", "64M"]);
    assert_eq!(r["request"]["id"], disks[3]["id"], "{r}");
    assert_eq!(r["request"]["id"], "vdd");

    let list = vol_json(&root, &["instance", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let show = vol_ok(&root, &["instance", "show", "vm-1"]);
    assert!(
        show.contains("/dev/vde") && show.contains("mount /dev/vdd at /data"),
        "{show}"
    );

    vol_ok(&root, &["instance", "detach", "vm-1"]);
    assert!(vol_ok(&root, &["instance", "detach", "vm-1"]).contains("nothing attached"));
    vol_ok(&root, &["instance", "detach", "vm-2"]);
    vol_fails(&root, &["instance", "show", "vm-1"], "not found");
    vol_ok(&root, &["volume", "delete", "db"]);
}
