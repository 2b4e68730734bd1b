//! An instance's disk list in `/dev/vdX` order and its mount plan.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, ImageType, MAX_SERIAL_BYTES};
use crate::{Error, Result};

pub use vmvol_volume::MAX_VOLUME_DEVICES;

/// How the guest uses an attached volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountMode {
    /// Read-only, shared; mounted `ro,noload`.
    Ro,
    /// Read-write, exclusive; mounted plainly.
    Rw,
    /// Read-only base with per-instance writes kept apart.
    Overlay(OverlayKind),
}

/// Where an overlay's writes go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlayKind {
    /// Two devices: the base (read-only) and a per-instance ext4 disk at
    /// `overlay_path` (read-write, raw); the guest joins them with overlayfs.
    GuestOverlayfs {
        /// The per-instance overlay disk (sparse raw ext4).
        overlay_path: PathBuf,
    },
    /// One device: [`VolumeDisk::path`] is a per-instance qcow2 whose backing
    /// file is the base (chain vetted by the volume layer); opened with
    /// `backing_files: true` and mounted read-write by the guest.
    Block,
}

/// How the VMM reaches a volume's disk(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskTransport {
    /// A host file the VMM opens ([`VolumeDisk::path`]).
    #[default]
    File,
    /// A vhost-user-blk socket ([`VolumeDisk::path`], and a guest-overlayfs
    /// overlay's `overlay_path`) served by an export daemon (see
    /// [`crate::export`]); raw to the guest, and the VMM needs shared
    /// guest memory.
    VhostUser,
}

/// One attached volume as the volume layer hands it to vmvol-chv, in the
/// instance's request order. The volume layer checks the attachment rules
/// (exclusivity, mount paths, overlay sizes) before it makes these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDisk {
    /// The volume's name or id (for serials, reports and resize look-ups).
    pub volume: String,
    /// The image file the VMM opens: the volume itself, or for a block
    /// overlay the per-instance qcow2 over it; for
    /// [`DiskTransport::VhostUser`] the socket serving it.
    pub path: PathBuf,
    /// Format of `path` (vhost-user: [`ImageType::Raw`]).
    pub image_type: ImageType,
    /// How the VMM reaches `path` (default: a file).
    #[serde(default)]
    pub transport: DiskTransport,
    /// Where the guest mounts it (absolute).
    pub mount_path: String,
    /// How the guest uses it.
    pub mode: MountMode,
}

/// The caller's description of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The instance's rootfs image (`/dev/vda`, read-only).
    pub rootfs: PathBuf,
    /// Its format.
    pub rootfs_image_type: ImageType,
    /// The instance's writable overlay (`/dev/vdb`).
    pub instance_overlay: PathBuf,
    /// Its format.
    pub instance_overlay_image_type: ImageType,
    /// The config disk (`/dev/vdc`, raw, read-only), see [`crate::write_config_disk`].
    pub config_disk: PathBuf,
    /// The attached volumes, in request order.
    pub volumes: Vec<VolumeDisk>,
}

/// What a disk of the instance is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskRole {
    /// `/dev/vda`.
    Rootfs,
    /// `/dev/vdb`.
    InstanceOverlay,
    /// `/dev/vdc`.
    ConfigDisk,
    /// A volume (or a block overlay over it).
    Volume,
    /// A guest-overlayfs overlay's per-instance disk.
    VolumeOverlay,
}

/// One disk of the instance: its device, role and Cloud Hypervisor config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDisk {
    /// The guest device, e.g. `/dev/vdd`.
    pub device: String,
    /// What it is for.
    pub role: DiskRole,
    /// The volume it belongs to (volume disks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The Cloud Hypervisor disk.
    pub config: DiskConfig,
}

/// One entry of the config disk's `volume_mounts` (the schema the seed's
/// guest init reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The device to mount, e.g. `/dev/vdd`.
    pub device: String,
    /// Mount point in the guest.
    pub path: String,
    /// `ro`, `rw` or `overlay`.
    pub mode: String,
    /// For `overlay`: the per-instance writable disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_device: Option<String>,
}

/// An instance's disks in `/dev/vdX` order and its mount plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePlan {
    /// Every disk, `/dev/vda` first.
    pub disks: Vec<PlannedDisk>,
    /// What the guest mounts, in request order.
    pub volume_mounts: Vec<VolumeMount>,
    /// A disk is vhost-user: the VMM must share guest memory with the
    /// export daemons (Cloud Hypervisor: `--memory …,shared=on`; QEMU: a
    /// `share=on` memory backend).
    #[serde(default)]
    pub requires_shared_memory: bool,
}

impl InstancePlan {
    /// The `DiskConfig` array for `PUT /vm.create` (`disks`), in order.
    pub fn disk_configs(&self) -> Vec<DiskConfig> {
        self.disks.iter().map(|d| d.config.clone()).collect()
    }

    /// The `DiskConfig` array as JSON (pretty, stable field order).
    pub fn disks_json(&self) -> Result<String> {
        serde_json::to_string_pretty(&self.disk_configs()).map_err(|source| Error::Json {
            what: "DiskConfig array",
            source,
        })
    }

    /// `["--disk", …]` for the `cloud-hypervisor` command line.
    pub fn disk_args(&self) -> Result<Vec<String>> {
        crate::config::disk_args(&self.disk_configs())
    }

    /// The disk id of a volume's device (for `vm.resize-disk`): the volume
    /// disk itself, not a guest-overlayfs overlay disk.
    pub fn disk_id(&self, volume: &str) -> Option<&str> {
        self.disks
            .iter()
            .find(|d| d.role == DiskRole::Volume && d.volume.as_deref() == Some(volume))
            .and_then(|d| d.config.id.as_deref())
    }
}

/// `vd` + letter for disk index `i` (0 → `vda`).
pub(crate) fn device_name(i: usize) -> Option<String> {
    let letter = u8::try_from(i).ok().filter(|&n| n < 26)?;
    Some(format!("vd{}", char::from(b'a' + letter)))
}

/// A serial of at most 20 bytes: `<dev>-<label>` with the label reduced to
/// `[A-Za-z0-9._-]` and cut to fit. Unique because the device prefix is.
fn serial(dev: &str, label: &str) -> String {
    let mut s = format!("{dev}-");
    for c in label.chars() {
        if s.len() >= MAX_SERIAL_BYTES {
            break;
        }
        s.push(
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            },
        );
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn disk(
    index: usize,
    role: DiskRole,
    volume: Option<&str>,
    label: &str,
    path: &Path,
    image_type: ImageType,
    transport: DiskTransport,
    readonly: bool,
) -> Result<PlannedDisk> {
    let dev = device_name(index).ok_or_else(|| {
        Error::invalid(
            format!("disk {index}"),
            "more than 26 disks (/dev/vda../dev/vdz)",
        )
    })?;
    if image_type == ImageType::Unknown {
        return Err(Error::invalid(
            format!("disk {dev} ({label})"),
            "image type must be set, not left to probing",
        ));
    }
    let mut config = DiskConfig::new(path, image_type);
    config.readonly = readonly;
    // The device name is unique, stable for a given request, and never starts with "__".
    config.id = Some(dev.clone());
    config.serial = Some(serial(&dev, label));
    if transport == DiskTransport::VhostUser {
        // The export daemon serves the device (its size, read-only flag
        // and serial); the VMM only connects to the socket.
        config.path = None;
        config.vhost_user = true;
        config.vhost_socket = Some(path.to_string_lossy().into_owned());
        config.serial = None;
    }
    config.validate()?;
    Ok(PlannedDisk {
        device: format!("/dev/{dev}"),
        role,
        volume: volume.map(str::to_string),
        config,
    })
}

/// Lay out an instance's disks: `/dev/vda` rootfs (ro), `/dev/vdb` instance
/// overlay (rw), `/dev/vdc` config disk (ro), then each volume in request
/// order (a guest-overlayfs overlay takes two devices: the base read-only,
/// then its overlay disk read-write). At most 23 volume devices.
pub fn plan(spec: &InstanceSpec) -> Result<InstancePlan> {
    let devices: usize = spec
        .volumes
        .iter()
        .map(|v| match v.mode {
            MountMode::Overlay(OverlayKind::GuestOverlayfs { .. }) => 2,
            _ => 1,
        })
        .sum();
    if devices > MAX_VOLUME_DEVICES {
        return Err(Error::invalid(
            "instance volumes",
            format!(
                "{devices} volume devices, at most {MAX_VOLUME_DEVICES} (/dev/vdd../dev/vdz; a guest-overlayfs overlay counts 2)"
            ),
        ));
    }
    let mut disks = vec![
        disk(
            0,
            DiskRole::Rootfs,
            None,
            "rootfs",
            &spec.rootfs,
            spec.rootfs_image_type,
            DiskTransport::File,
            true,
        )?,
        disk(
            1,
            DiskRole::InstanceOverlay,
            None,
            "overlay",
            &spec.instance_overlay,
            spec.instance_overlay_image_type,
            DiskTransport::File,
            false,
        )?,
        disk(
            2,
            DiskRole::ConfigDisk,
            None,
            "config",
            &spec.config_disk,
            ImageType::Raw,
            DiskTransport::File,
            true,
        )?,
    ];
    let mut mounts = Vec::with_capacity(spec.volumes.len());
    for v in &spec.volumes {
        let what = || format!("volume {:?} at {:?}", v.volume, v.mount_path);
        if !v.mount_path.starts_with('/') || v.mount_path.contains('\0') {
            return Err(Error::invalid(
                what(),
                "mount path must be absolute, without NUL",
            ));
        }
        if v.volume.is_empty() {
            return Err(Error::invalid(what(), "empty volume name"));
        }
        let index = disks.len();
        let (readonly, backing, mode) = match &v.mode {
            MountMode::Ro => (true, false, "ro"),
            MountMode::Rw => (false, false, "rw"),
            MountMode::Overlay(OverlayKind::GuestOverlayfs { .. }) => (true, false, "overlay"),
            // The guest sees one writable disk: a plain rw mount.
            MountMode::Overlay(OverlayKind::Block) => (false, true, "rw"),
        };
        // Over vhost-user a block overlay is an RBD clone: raw, no chain.
        let backing = backing && v.transport == DiskTransport::File;
        if backing && v.image_type != ImageType::Qcow2 {
            return Err(Error::invalid(
                what(),
                "a block overlay must be a qcow2 image",
            ));
        }
        let mut base = disk(
            index,
            DiskRole::Volume,
            Some(&v.volume),
            &v.volume,
            &v.path,
            v.image_type,
            v.transport,
            readonly,
        )?;
        base.config.backing_files = backing;
        let device = base.device.clone();
        disks.push(base);
        let mut overlay_device = None;
        if let MountMode::Overlay(OverlayKind::GuestOverlayfs { overlay_path }) = &v.mode {
            let ov = disk(
                index + 1,
                DiskRole::VolumeOverlay,
                Some(&v.volume),
                &format!("ovl-{}", v.volume),
                overlay_path,
                ImageType::Raw,
                v.transport,
                false,
            )?;
            overlay_device = Some(ov.device.clone());
            disks.push(ov);
        }
        mounts.push(VolumeMount {
            device,
            path: v.mount_path.clone(),
            mode: mode.to_string(),
            overlay_device,
        });
    }
    let requires_shared_memory = disks.iter().any(|d| d.config.vhost_user);
    Ok(InstancePlan {
        disks,
        volume_mounts: mounts,
        requires_shared_memory,
    })
}
