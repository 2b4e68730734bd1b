//! Helpers shared by the fs tests: external tools and loop mounts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the environment demands every external tool (`VMVOL_REQUIRE_TOOLS=1`,
/// set by `.ci/run`): then a missing tool fails the test instead of skipping it.
pub fn tools_required() -> bool {
    std::env::var("VMVOL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Something a test needs is missing: skip (saying why) or, when tools are
/// required, fail naming it.
pub fn unavailable(what: &str) -> bool {
    assert!(!tools_required(), "VMVOL_REQUIRE_TOOLS=1 but {what}");
    eprintln!("SKIP: {what}");
    false
}

/// A capability the host withholds even from root (containers drop
/// `CAP_SYS_RESOURCE`, which online resize needs): skip, saying why, even
/// under `VMVOL_REQUIRE_TOOLS=1` — no tool is missing, and CI runs in such
/// containers. Returns false.
pub fn host_forbids(what: &str) -> bool {
    eprintln!("SKIP (host restriction, not a missing tool): {what}");
    false
}

/// Whether the external tool `tool` can be run. When it cannot, the calling
/// test skips the check (this prints why) — or, under `VMVOL_REQUIRE_TOOLS=1`,
/// this panics naming the tool.
pub fn require_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok || unavailable(&format!(
        "required tool {tool} is not installed (not on PATH)"
    ))
}

/// Run a prepared command, return stdout; panics with its output on failure.
pub fn run_cmd(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `e2fsck -fn` on an image; panics with its output unless clean.
pub fn e2fsck_clean(img: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("run e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "e2fsck -fn {} not clean:\n{text}",
        img.display()
    );
}

/// Run a command, return stdout; panics on failure.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img convert -O raw QCOW2 RAW`: the raw image e2fsprogs can read.
pub fn qcow2_to_raw(qcow2: &Path, raw: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}

/// `debugfs -R REQ IMG` stdout.
pub fn debugfs(img: &Path, req: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .expect("run debugfs");
    out.stdout
}

/// Whether we can loop-mount: root, `/dev/loop-control`, and `mount`,
/// `umount` and `losetup` on PATH. Like [`require_tool`], a missing piece
/// skips, or fails under `VMVOL_REQUIRE_TOOLS=1`.
pub fn require_loop_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        return unavailable("loop mounts need root (not running as root)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return unavailable("loop mounts need /dev/loop-control (absent)");
    }
    require_tool("mount") && require_tool("umount") && require_tool("losetup")
}

/// A loop mount that unmounts on drop.
pub struct Mount {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mount {
    pub fn new(img: &Path, ro: bool) -> Mount {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let opts = if ro { "loop,ro" } else { "loop" };
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                opts,
                img.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        Mount { dir, _tmp: tmp }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `dumpe2fs -h` feature line.
pub fn features(img: &Path) -> String {
    let out = run("dumpe2fs", &["-h", img.to_str().unwrap()]);
    out.lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or("")
        .to_string()
}
