//! From an instance the volume layer attached ([`InstanceDescription`]) to
//! this crate's input: the attached volumes as [`VolumeDisk`]s, in request
//! order, and the whole [`InstanceSpec`].

use std::path::{Path, PathBuf};

use vmvol_format::Format;
use vmvol_volume::{AttachMode, AttachTarget, InstanceDescription, OverlayKind as VolOverlay};

use crate::config::ImageType;
use crate::instance::{InstanceSpec, MountMode, OverlayKind, VolumeDisk};
use crate::{Error, Result};

fn image_type(f: Format) -> ImageType {
    match f {
        Format::Raw => ImageType::Raw,
        Format::Qcow2 => ImageType::Qcow2,
    }
}

/// The host file of an attach target (Cloud Hypervisor opens files; images
/// without one need a vhost-user export first).
fn file_of(t: &AttachTarget, what: &str) -> Result<(PathBuf, ImageType)> {
    match t {
        AttachTarget::File { path, format } => Ok((path.clone(), image_type(*format))),
        other => Err(Error::invalid(
            what,
            format!("{other:?} has no host file for Cloud Hypervisor to open"),
        )),
    }
}

/// The instance's volumes as vmvol-chv input, in request order: a plain
/// volume opens its image; a guest-overlayfs overlay opens the base
/// read-only plus the per-instance overlay disk; a block overlay opens the
/// per-instance qcow2 (whose chain the volume layer vetted).
pub fn volume_disks(desc: &InstanceDescription) -> Result<Vec<VolumeDisk>> {
    desc.disks
        .iter()
        .map(|d| {
            let what = format!("volume {}", d.volume.volume);
            let (path, image_type) = file_of(&d.target, &what)?;
            let mode = match (&d.volume.overlay, d.volume.mode) {
                (None, AttachMode::Rw) => MountMode::Rw,
                (None, AttachMode::Ro) => MountMode::Ro,
                (Some(o), _) => match o.kind {
                    VolOverlay::Block => MountMode::Overlay(OverlayKind::Block),
                    VolOverlay::GuestOverlayfs => {
                        let t = d.overlay_target.as_ref().ok_or_else(|| {
                            Error::invalid(&what, "guest-overlayfs overlay without its disk")
                        })?;
                        let (overlay_path, _) = file_of(t, &what)?;
                        MountMode::Overlay(OverlayKind::GuestOverlayfs { overlay_path })
                    }
                },
            };
            Ok(VolumeDisk {
                volume: d.volume.volume.clone(),
                path,
                image_type,
                mount_path: d.volume.mount_path.clone(),
                mode,
            })
        })
        .collect()
}

/// The whole instance: the caller's rootfs and instance overlay, the
/// config disk at `config_disk`, and the attached volumes.
pub fn instance_spec(
    desc: &InstanceDescription,
    rootfs: (&Path, ImageType),
    instance_overlay: (&Path, ImageType),
    config_disk: &Path,
) -> Result<InstanceSpec> {
    Ok(InstanceSpec {
        rootfs: rootfs.0.to_path_buf(),
        rootfs_image_type: rootfs.1,
        instance_overlay: instance_overlay.0.to_path_buf(),
        instance_overlay_image_type: instance_overlay.1,
        config_disk: config_disk.to_path_buf(),
        volumes: volume_disks(desc)?,
    })
}
