//! Helpers shared by the fs tests: external tools and loop mounts.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether an external tool can be run; says so when a test will skip.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {tool} not installed");
    }
    ok
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

/// Whether we can loop-mount (root, mount available, loop devices work).
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping kernel mount: not root");
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping kernel mount: no /dev/loop-control");
        return false;
    }
    true
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
