//! From an instance the volume layer attached ([`InstanceDescription`]) to
//! this crate's input: the attached volumes as [`VolumeDisk`]s, in request
//! order, and the whole [`InstanceSpec`].

use std::path::{Path, PathBuf};

use vmvol_format::Format;
use vmvol_volume::{AttachMode, AttachTarget, InstanceDescription, OverlayKind as VolOverlay};

use crate::config::ImageType;
use crate::export::Export;
use crate::instance::{DiskTransport, InstanceSpec, MountMode, OverlayKind, VolumeDisk};
use crate::{Error, Result};

fn image_type(f: Format) -> ImageType {
    match f {
        Format::Raw => ImageType::Raw,
        Format::Qcow2 => ImageType::Qcow2,
    }
}

/// How the VMM reaches an attach target: a host file, or (RBD) the socket
/// of the vhost-user export of disk `device` in the instance's files dir
/// (see [`crate::export`]).
fn source_of(
    t: &AttachTarget,
    what: &str,
    files_dir: &Path,
    device: &str,
) -> Result<(PathBuf, ImageType, DiskTransport)> {
    match t {
        AttachTarget::File { path, format } => {
            Ok((path.clone(), image_type(*format), DiskTransport::File))
        }
        AttachTarget::Rbd(_) => Ok((
            crate::export::socket_path(files_dir, device),
            ImageType::Raw,
            DiskTransport::VhostUser,
        )),
        other => Err(Error::invalid(
            what,
            format!("{other:?} has no host file or export for Cloud Hypervisor to open"),
        )),
    }
}

fn device(i: usize, what: &str) -> Result<String> {
    crate::instance::device_name(i)
        .ok_or_else(|| Error::invalid(what, "more than 26 disks (/dev/vda../dev/vdz)"))
}

/// Index of the first volume disk (`vdd`: after rootfs, instance overlay
/// and config disk).
const FIRST_VOLUME_DISK: usize = 3;

/// The vhost-user exports an instance needs, in device order: one per
/// attach target without a host file (RBD). A read-only attachment and
/// the base of a guest-overlayfs overlay are exported read-only; a
/// read-write volume, a block overlay (an RBD clone) and a guest-overlayfs
/// overlay disk are writable.
pub fn instance_exports(desc: &InstanceDescription) -> Result<Vec<Export>> {
    let mut out = Vec::new();
    let mut n = FIRST_VOLUME_DISK;
    for d in &desc.disks {
        let name = &d.volume.volume;
        let writable = match (&d.volume.overlay, d.volume.mode) {
            (None, AttachMode::Rw) => true,
            (None, AttachMode::Ro) => false,
            (Some(o), _) => o.kind == VolOverlay::Block,
        };
        let dev = device(n, &format!("volume {name}"))?;
        if let AttachTarget::Rbd(t) = &d.target {
            out.push(Export::new(
                format!("volume {name} ({dev})"),
                t.clone(),
                writable,
                &desc.files_dir,
                &dev,
            ));
        }
        n += 1;
        if let Some(ot) = &d.overlay_target {
            let dev = device(n, &format!("volume {name}"))?;
            if let AttachTarget::Rbd(t) = ot {
                out.push(Export::new(
                    format!("overlay of volume {name} ({dev})"),
                    t.clone(),
                    true,
                    &desc.files_dir,
                    &dev,
                ));
            }
            n += 1;
        }
    }
    Ok(out)
}

/// The instance's volumes as vmvol-chv input, in request order: a plain
/// volume opens its image; a guest-overlayfs overlay opens the base
/// read-only plus the per-instance overlay disk; a block overlay opens the
/// per-instance qcow2 (whose chain the volume layer vetted), or on RBD the
/// per-instance clone. Images without a host file (RBD) are reached over
/// vhost-user: the socket of their export ([`instance_exports`]).
pub fn volume_disks(desc: &InstanceDescription) -> Result<Vec<VolumeDisk>> {
    let mut n = FIRST_VOLUME_DISK;
    let mut out = Vec::with_capacity(desc.disks.len());
    for d in &desc.disks {
        let what = format!("volume {}", d.volume.volume);
        let (path, image_type, transport) =
            source_of(&d.target, &what, &desc.files_dir, &device(n, &what)?)?;
        n += 1;
        let mode = match (&d.volume.overlay, d.volume.mode) {
            (None, AttachMode::Rw) => MountMode::Rw,
            (None, AttachMode::Ro) => MountMode::Ro,
            (Some(o), _) => match o.kind {
                VolOverlay::Block => MountMode::Overlay(OverlayKind::Block),
                VolOverlay::GuestOverlayfs => {
                    let t = d.overlay_target.as_ref().ok_or_else(|| {
                        Error::invalid(&what, "guest-overlayfs overlay without its disk")
                    })?;
                    let (overlay_path, _, ot) =
                        source_of(t, &what, &desc.files_dir, &device(n, &what)?)?;
                    n += 1;
                    if ot != transport {
                        return Err(Error::invalid(
                            &what,
                            "the base and its overlay disk are reached differently (file and vhost-user)",
                        ));
                    }
                    MountMode::Overlay(OverlayKind::GuestOverlayfs { overlay_path })
                }
            },
        };
        out.push(VolumeDisk {
            volume: d.volume.volume.clone(),
            path,
            image_type,
            transport,
            mount_path: d.volume.mount_path.clone(),
            mode,
        });
    }
    Ok(out)
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
