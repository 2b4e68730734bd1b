//! The CLI cases of issue 9: `vmvol fs populate` into an existing qcow2 and
//! `vmvol image resize +N` on a 4 KiB-cluster qcow2, SIGKILLed at random
//! moments. No kill may leave an image that is corrupt without the dirty
//! flag, and after `vmvol image check -r all` every one is clean.
//! `VMVOL_CLI_KILLS` sets the kills per case (default 100, as issue 9 asks).
//! A module of the CLI test binary: it uses its binary finder and tool checks.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{require_tool, vmvol as vmvol_bin};

/// The CLI binary, once qemu-img (the judge of every kill) is known present.
fn setup() -> Option<&'static Path> {
    require_tool("qemu-img").then(vmvol_bin)
}

fn kills() -> usize {
    std::env::var("VMVOL_CLI_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn vmvol(bin: &Path, args: &[&str]) {
    let o = Command::new(bin).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "vmvol {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// (errors, leaks, dirty) of `path` as qemu-img sees it.
fn state(path: &Path) -> (u64, u64, bool) {
    let o = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let i = Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    let dirty = info
        .pointer("/dirty-flag")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    (n("corruptions") + n("check-errors"), n("leaks"), dirty)
}

/// Run `args` and SIGKILL it after a random delay below `max`; then check.
fn kill_and_check(bin: &Path, args: &[&str], img: &Path, max: Duration, seed: &mut u64) -> bool {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let delay = Duration::from_micros(*seed % max.as_micros().max(1) as u64);
    let mut ch = Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = ch.kill();
    let killed = ch.wait().unwrap().code().is_none();
    let (errors, _, dirty) = state(img);
    assert!(
        errors == 0 || dirty,
        "{args:?} killed after {delay:?} left a corrupt image without the dirty flag"
    );
    vmvol(bin, &["image", "check", "-r", "all", img.to_str().unwrap()]);
    let (errors, leaks, dirty) = state(img);
    assert!(
        errors == 0 && leaks == 0 && !dirty,
        "{args:?} killed after {delay:?}: after check -r all: {errors} errors, {leaks} leaks, dirty {dirty}"
    );
    killed
}

/// `vmvol image create` of a qcow2 with 4 KiB clusters (many L2 tables).
fn create_4k_qcow2(bin: &Path, img: &str, size: &str) {
    vmvol(
        bin,
        &[
            "image",
            "create",
            "-f",
            "qcow2",
            "--cluster-size",
            "4K",
            img,
            size,
        ],
    );
}

#[test]
fn killed_populate_into_existing_qcow2() {
    let Some(bin) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..300u64 {
        let len = 1000 + (i * 7919) % 40000;
        let body: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
        std::fs::write(src.join(format!("f{i}")), body).unwrap();
    }
    let img = dir.path().join("p.qcow2");
    let img_s = img.to_str().unwrap();
    create_4k_qcow2(bin, img_s, "512M");
    let args = ["fs", "populate", img_s, "--from", src.to_str().unwrap()];
    // How long an uninterrupted run takes sets the range of kill moments.
    let t = Instant::now();
    vmvol(bin, &args);
    let full = t.elapsed();
    let mut seed = 0x9e37_79b9u64;
    let mut killed = 0;
    for _ in 0..kills() {
        killed += usize::from(kill_and_check(bin, &args, &img, full, &mut seed));
    }
    eprintln!(
        "populate: {killed} of {} runs killed mid-way (full run {full:?})",
        kills()
    );
    assert!(killed > 0);
}

#[test]
fn killed_resize_of_qcow2() {
    let Some(bin) = setup() else { return };
    if !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    let img_s = img.to_str().unwrap();
    create_4k_qcow2(bin, img_s, "64M");
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x33 0 32M", img_s])
        .output();
    assert!(o.is_ok_and(|o| o.status.success()), "qemu-io write");
    let args = ["image", "resize", img_s, "+8G"];
    let t = Instant::now();
    vmvol(bin, &args);
    let full = t.elapsed();
    let mut seed = 0x1234_5678u64;
    let mut killed = 0;
    for _ in 0..kills() {
        killed += usize::from(kill_and_check(bin, &args, &img, full, &mut seed));
    }
    eprintln!(
        "resize: {killed} of {} runs killed mid-way (full run {full:?})",
        kills()
    );
}
