//! Shared helpers: external tools, the sample instance.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmvol_chv::{ImageType, InstanceSpec, MountMode, OverlayKind, VolumeDisk};

/// Find `tool` on PATH (and /sbin, /usr/sbin). Missing: panic when
/// VMVOL_REQUIRE_TOOLS=1, else say why the test is skipped and return None.
pub fn require_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/sbin", "/usr/sbin"]) {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    missing(tool)
}

/// Report a missing prerequisite: panic under VMVOL_REQUIRE_TOOLS=1.
pub fn missing<T>(what: &str) -> Option<T> {
    if std::env::var("VMVOL_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("required tool missing: {what} (VMVOL_REQUIRE_TOOLS=1)");
    }
    eprintln!("skipping: {what} not found");
    None
}

/// Run a command, return (success, stdout+stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// The sample instance of the goldens: rw, ro, guest-overlayfs and block
/// overlays, one path needing quoting on the command line.
pub fn sample_spec() -> InstanceSpec {
    InstanceSpec {
        rootfs: "/var/lib/hypeman/images/alpine/rootfs.ext4".into(),
        rootfs_image_type: ImageType::Raw,
        instance_overlay: "/var/lib/hypeman/guests/i-1/overlay.raw".into(),
        instance_overlay_image_type: ImageType::Raw,
        config_disk: "/var/lib/hypeman/guests/i-1/config.ext4".into(),
        volumes: vec![
            VolumeDisk {
                volume: "work".into(),
                path: "/pools/main/volumes/work/data.raw".into(),
                image_type: ImageType::Raw,
                transport: Default::default(),
                mount_path: "/data".into(),
                mode: MountMode::Rw,
            },
            VolumeDisk {
                volume: "models, \"big\"".into(),
                path: "/pools/main/volumes/models, \"big\"/data.qcow2".into(),
                image_type: ImageType::Qcow2,
                transport: Default::default(),
                mount_path: "/models".into(),
                mode: MountMode::Ro,
            },
            VolumeDisk {
                volume: "dataset-2026-with-a-long-name".into(),
                path: "/pools/main/volumes/dataset/data.raw".into(),
                image_type: ImageType::Raw,
                transport: Default::default(),
                mount_path: "/srv/dataset".into(),
                mode: MountMode::Overlay(OverlayKind::GuestOverlayfs {
                    overlay_path: "/var/lib/hypeman/guests/i-1/vol-overlays/dataset.raw".into(),
                }),
            },
            VolumeDisk {
                volume: "cache".into(),
                path: "/var/lib/hypeman/guests/i-1/vol-overlays/cache.qcow2".into(),
                image_type: ImageType::Qcow2,
                transport: Default::default(),
                mount_path: "/var-cache".into(),
                mode: MountMode::Overlay(OverlayKind::Block),
            },
        ],
    }
}
