//! Instances end to end: attach an instance's volumes (vmvol-volume), lay
//! out its Cloud Hypervisor disks and write its config disk, in one
//! all-or-nothing step; show them again later; detach. (The facade
//! re-exports this module as `vmvol::instance`.)
//!
//! The config disk lives in the instance's files directory
//! ([`InstanceDescription::files_dir`]) and is written before the attach
//! commits, so a crash leaves either an attached instance with its config
//! disk or neither; detach removes it with the overlays.

use std::path::PathBuf;

use crate::{ImageType, InstancePlan};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use vmvol_volume::{
    AttachRequest, AttachVolume, Detached, ErrorKind, InstanceDescription, Result, Volumes,
};

/// File name of the config disk inside the instance's files directory.
pub const CONFIG_DISK_FILE: &str = "config.ext4";

/// The disks of an instance that are not volumes, chosen by the caller
/// (kept in the instance record so the plan can be made again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDisks {
    /// The rootfs image (`/dev/vda`, read-only).
    pub rootfs: PathBuf,
    /// Its format.
    pub rootfs_image_type: ImageType,
    /// The instance's writable overlay (`/dev/vdb`).
    pub instance_overlay: PathBuf,
    /// Its format.
    pub instance_overlay_image_type: ImageType,
    /// Extra top-level fields of `/config.json` (entrypoint, env, ...).
    #[serde(default)]
    pub config_extra: Map<String, Value>,
}

/// An attached instance and its Cloud Hypervisor encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// The instance as the volume layer attached it.
    pub instance: InstanceDescription,
    /// Its non-volume disks.
    pub disks: VmDisks,
    /// Its disks in `/dev/vdX` order and the guest's mount plan.
    pub plan: InstancePlan,
    /// The config disk (`/dev/vdc`).
    pub config_disk: PathBuf,
}

fn chv_err<'a>(id: &'a str, op: &'static str) -> impl Fn(crate::Error) -> vmvol_volume::Error + 'a {
    move |e| {
        let kind = match e {
            crate::Error::Invalid { .. } => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        vmvol_volume::Error::external(format!("instance {id}"), op, kind, e)
    }
}

fn plan_of(desc: &InstanceDescription, disks: &VmDisks) -> Result<(InstancePlan, PathBuf)> {
    let id = desc.instance.id.as_str();
    let config_disk = desc.files_dir.join(CONFIG_DISK_FILE);
    let spec = crate::instance_spec(
        desc,
        (&disks.rootfs, disks.rootfs_image_type),
        (&disks.instance_overlay, disks.instance_overlay_image_type),
        &config_disk,
    )
    .map_err(chv_err(id, "plan disks"))?;
    let plan = crate::plan(&spec).map_err(chv_err(id, "plan disks"))?;
    Ok((plan, config_disk))
}

/// Attaches `volumes` to new instance `id` and writes its config disk; all
/// or nothing. See [`Volumes::attach_instance`] for the rules.
pub fn attach(vols: &Volumes, id: &str, volumes: Vec<AttachVolume>, disks: &VmDisks) -> Result<Vm> {
    let vmm = serde_json::to_value(disks).map_err(|e| {
        vmvol_volume::Error::external(
            format!("instance {id}"),
            "attach",
            ErrorKind::InvalidArgument,
            e,
        )
    })?;
    let req = AttachRequest {
        instance: id.to_string(),
        volumes,
        vmm,
    };
    let mut made = None;
    let desc = vols.attach_instance(&req, &mut |desc| {
        let (plan, config_disk) = plan_of(desc, disks)?;
        std::fs::create_dir_all(&desc.files_dir).map_err(|e| {
            vmvol_volume::Error::external(format!("instance {id}"), "attach", ErrorKind::Io, e)
        })?;
        crate::write_config_disk(&config_disk, &plan, &disks.config_extra)
            .map_err(chv_err(id, "write config disk"))?;
        made = Some((plan, config_disk));
        Ok(())
    })?;
    let (plan, config_disk) = match made {
        Some(m) => m,
        None => plan_of(&desc, disks)?,
    };
    Ok(Vm {
        instance: desc,
        disks: disks.clone(),
        plan,
        config_disk,
    })
}

/// Instance `id` as [`attach`] made it.
pub fn show(vols: &Volumes, id: &str) -> Result<Vm> {
    let desc = vols.describe_instance(id)?;
    let disks: VmDisks = serde_json::from_value(desc.instance.vmm.clone()).map_err(|e| {
        vmvol_volume::Error::external(
            format!("instance {id}"),
            "show (not attached through vmvol_chv::vm::attach)",
            ErrorKind::Corrupt,
            e,
        )
    })?;
    let (plan, config_disk) = plan_of(&desc, &disks)?;
    Ok(Vm {
        instance: desc,
        disks,
        plan,
        config_disk,
    })
}

/// Detaches instance `id`: volumes detached, overlays and config disk
/// removed, volumes kept. Idempotent.
pub fn detach(vols: &Volumes, id: &str) -> Result<Detached> {
    vols.detach_instance(id)
}
