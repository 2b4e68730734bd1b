//! The config disk against e2fsprogs: e2fsck -fn clean, debugfs reads the
//! files, and the shell form survives hostile values when sourced by sh.

use std::process::Command;

use serde_json::{json, Map, Value};
use vmvol_chv::{config_sh, plan, write_config_disk, MountMode, VolumeDisk};

use crate::common::{require_tool, run, sample_spec};

const HOSTILE: &str = "/data/it's \"$(touch PWNED)\" `touch PWNED2` ${HOME}\nsecond line\\ \t;&|";

fn hostile_spec() -> vmvol_chv::InstanceSpec {
    let mut spec = sample_spec();
    spec.volumes.push(VolumeDisk {
        volume: "evil'vol".into(),
        path: "/pools/main/volumes/evil/data.raw".into(),
        image_type: vmvol_chv::ImageType::Raw,
        transport: Default::default(),
        mount_path: HOSTILE.into(),
        mode: MountMode::Ro,
    });
    spec
}

fn extra() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("entrypoint".into(), json!(["/bin/sh", "-c", "echo hi"]));
    m.insert("env".into(), json!({"A": "1", "B": "it's"}));
    m.insert("network_enabled".into(), json!(false));
    m
}

#[test]
fn config_disk_is_clean_ext4_holding_the_plan() {
    let Some(debugfs) = require_tool("debugfs") else {
        return;
    };
    let Some(e2fsck) = require_tool("e2fsck") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.ext4");
    let p = plan(&hostile_spec()).unwrap();
    let report = write_config_disk(&path, &p, &extra()).unwrap();
    assert_eq!(report.size, 10 << 20);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 << 20);
    // Nothing left behind but the disk.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [std::ffi::OsString::from("config.ext4")]);

    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&path));
    assert!(ok, "e2fsck -fn: {out}");
    let (ok, feats) = run(Command::new(&debugfs).args(["-R", "features"]).arg(&path));
    assert!(ok && !feats.contains("has_journal"), "{feats}");
    let (ok, stats) = run(Command::new(&debugfs).args(["-R", "stats"]).arg(&path));
    assert!(
        ok && stats.contains("Block size:               4096"),
        "{stats}"
    );

    let cat = |file: &str| {
        let out = Command::new(&debugfs)
            .args(["-R", &format!("cat /{file}")])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let json_text = cat("config.json");
    assert_eq!(json_text, report.config_json);
    let v: Value = serde_json::from_str(&json_text).unwrap();
    assert_eq!(v["entrypoint"], json!(["/bin/sh", "-c", "echo hi"]));
    assert_eq!(v["env"]["B"], "it's");
    assert_eq!(v["network_enabled"], false);
    let mounts = v["volume_mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 5);
    assert_eq!(
        mounts[2],
        json!({"device": "/dev/vdf", "path": "/srv/dataset", "mode": "overlay", "overlay_device": "/dev/vdg"})
    );
    assert_eq!(mounts[4]["path"], HOSTILE);
    assert_eq!(mounts[4]["device"], "/dev/vdi");
    let disks = v["vmvol_disks"].as_array().unwrap();
    assert_eq!(disks.len(), 9);
    assert_eq!(
        disks[8],
        json!({"device": "/dev/vdi", "id": "vdi", "serial": "vdi-evil_vol"})
    );
    assert_eq!(cat("config.sh"), report.config_sh);

    // Rewriting replaces the disk whole (temp + rename).
    let r2 = write_config_disk(&path, &p, &Map::new()).unwrap();
    assert!(!cat("config.json").contains("entrypoint"));
    assert_eq!(r2.size, 10 << 20);
}

#[test]
fn shell_form_keeps_hostile_values_literal() {
    let Some(sh) = require_tool("sh") else { return };
    let dir = tempfile::tempdir().unwrap();
    let p = plan(&hostile_spec()).unwrap();
    let file = dir.path().join("config.sh");
    std::fs::write(&file, config_sh(&p).unwrap()).unwrap();
    // Source it, then print each value NUL-terminated.
    let script = r#". "$1"; i=0; while [ $i -lt $VMVOL_MOUNT_COUNT ]; do
        eval "printf '%s\0%s\0%s\0%s\0' \"\$VMVOL_MOUNT_${i}_DEVICE\" \"\$VMVOL_MOUNT_${i}_PATH\" \"\$VMVOL_MOUNT_${i}_MODE\" \"\$VMVOL_MOUNT_${i}_OVERLAY_DEVICE\""
        i=$((i+1)); done"#;
    let out = Command::new(&sh)
        .current_dir(dir.path())
        .args(["-c", script, "sh"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vals: Vec<String> = out
        .stdout
        .split(|&b| b == 0)
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    let mut want = Vec::new();
    for m in &p.volume_mounts {
        want.extend([
            m.device.clone(),
            m.path.clone(),
            m.mode.clone(),
            m.overlay_device.clone().unwrap_or_default(),
        ]);
    }
    want.push(String::new());
    assert_eq!(vals, want);
    // Nothing ran.
    assert!(!dir.path().join("PWNED").exists() && !dir.path().join("PWNED2").exists());
    // Busybox sh too, when present (the guest's shell).
    if let Some(bb) = require_tool("busybox") {
        let out = Command::new(bb)
            .current_dir(dir.path())
            .args(["sh", "-c", script, "sh"])
            .arg(&file)
            .output()
            .unwrap();
        let vals: Vec<String> = out
            .stdout
            .split(|&b| b == 0)
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        assert_eq!(vals, want);
        assert!(!dir.path().join("PWNED").exists());
    }
}

#[test]
fn config_disk_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let p = plan(&sample_spec()).unwrap();
    let mut bad = Map::new();
    bad.insert("volume_mounts".into(), json!([]));
    let e = write_config_disk(&dir.path().join("c.ext4"), &p, &bad).unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
    assert!(!dir.path().join("c.ext4").exists());
    let mut spec = sample_spec();
    spec.volumes[0].mount_path = "/nul\0here".into();
    assert!(plan(&spec).is_err());
    assert!(vmvol_chv::sh_quote("a\0b").is_err());
    // No such directory: an error naming the file, nothing created.
    let e = write_config_disk(&dir.path().join("missing/c.ext4"), &p, &Map::new()).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn build_config_disk_on_a_qcow2_and_refuses_a_small_device() {
    use vmvol_format::{BlockIo, Control, Prealloc, Qcow2CreateOptions, Qcow2Image, RawImage};
    let Some(e2fsck) = require_tool("e2fsck") else {
        return;
    };
    let Some(qemu_img) = require_tool("qemu-img") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = plan(&sample_spec()).unwrap();
    let files = vmvol_chv::ConfigFiles::new(&p, &Map::new()).unwrap();
    assert_eq!(files.disk_size(), 10 << 20);
    // Any BlockIo: a qcow2 here.
    let q = dir.path().join("config.qcow2");
    Qcow2Image::create(&q, &Qcow2CreateOptions::new(files.disk_size())).unwrap();
    let img =
        vmvol_format::Image::open(&q, &vmvol_format::OpenOptions::new().read_only(false)).unwrap();
    vmvol_chv::build_config_disk(&img, &files).unwrap();
    img.flush().unwrap();
    drop(img);
    let raw = dir.path().join("flat.raw");
    let (ok, out) = run(Command::new(&qemu_img)
        .args(["convert", "-O", "raw"])
        .arg(&q)
        .arg(&raw));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&raw));
    assert!(ok, "e2fsck -fn: {out}");
    // A device too small for an ext4 is refused with an error, not a panic.
    let tiny = RawImage::create(
        &dir.path().join("tiny.raw"),
        64 << 10,
        Prealloc::Off,
        &Control::new(),
    )
    .unwrap();
    assert!(vmvol_chv::build_config_disk(&tiny, &files).is_err());
}
