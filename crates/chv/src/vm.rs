//! Instances end to end: attach an instance's volumes (vmvol-volume), lay
//! out its Cloud Hypervisor disks and write its config disk, in one
//! all-or-nothing step; show them again later; detach. (The facade
//! re-exports this module as `vmvol::instance`.)
//!
//! The config disk lives in the instance's files directory
//! ([`InstanceDescription::files_dir`]) and is written before the attach
//! commits, so a crash leaves either an attached instance with its config
//! disk or neither; detach removes it with the overlays.
//!
//! Volumes without a host file (RBD) are exported over vhost-user-blk, one
//! `qemu-storage-daemon` per disk ([`crate::export`]), sockets and pidfiles
//! in the same directory: attach starts them before it commits (and stops
//! them if it fails), detach stops them first (an RBD image with a client
//! cannot be removed). Daemons a crashed attach or detach left are stopped
//! by the next attach, show or detach on this host (any instance whose
//! record is not `attached` and whose lock is free); [`restart_exports`]
//! starts again those of an attached instance that died (a host reboot).
//!
//! [`resize_volume`] grows a volume whoever must do it: the volume layer
//! when it is detached; when it is attached read-write over vhost-user
//! (RBD), its export daemon (QMP `block_resize`; see [`Export::resize`]
//! for when the guest sees it), after which the new size is recorded; a
//! host file attached read-write is left to Cloud Hypervisor
//! (`vm.resize-disk`), as [`Volumes::resize_volume`] returns it.

use std::path::PathBuf;

use crate::export::{self, Export, ExportStatus};
use crate::{ImageType, InstancePlan};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use vmvol_volume::{
    AttachRequest, AttachVolume, Detached, ErrorKind, InstanceDescription, InstanceRecord,
    InstanceState, NewSize, OnlineResize, Resized, Result, Volumes,
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
    /// Its vhost-user exports and where they stand, in device order
    /// (empty when every disk is a host file; then
    /// `plan.requires_shared_memory` is false).
    #[serde(default)]
    pub exports: Vec<ExportStatus>,
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

/// The files directory of instance `id` (where its exports live).
fn files_dir(vols: &Volumes, id: &str) -> Result<PathBuf> {
    vols.instance_records()?.files_dir(id).map_err(|e| {
        vmvol_volume::Error::external(
            format!("instance {id}"),
            "find instance files",
            ErrorKind::Io,
            e,
        )
    })
}

/// Stops the exports of every instance whose attach or detach died (its
/// record not `attached`, or missing, and its lock free), so recovery can
/// remove its overlays. Best effort: what fails is tried again next time.
fn stop_leftovers(vols: &Volumes) {
    let Ok(store) = vols.instance_records() else {
        return;
    };
    for id in store.list().unwrap_or_default() {
        let Ok(Some(_lock)) = store.try_lock(&id, "stop leftover exports") else {
            continue;
        };
        let stale = match store.read::<InstanceRecord>(&id) {
            Ok(Some(r)) => r.state != InstanceState::Attached,
            Ok(None) => true,
            Err(_) => false,
        };
        if stale {
            if let Ok(dir) = store.files_dir(&id) {
                let _ = export::stop_all_in(&dir);
            }
        }
    }
}

fn stop_all(exports: &[Export]) {
    for e in exports {
        let _ = e.stop();
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
    stop_leftovers(vols);
    let mut made = None;
    let attached = vols.attach_instance(&req, &mut |desc| {
        let (plan, config_disk) = plan_of(desc, disks)?;
        std::fs::create_dir_all(&desc.files_dir).map_err(|e| {
            vmvol_volume::Error::external(format!("instance {id}"), "attach", ErrorKind::Io, e)
        })?;
        let exports = crate::instance_exports(desc).map_err(chv_err(id, "plan exports"))?;
        let mut statuses = Vec::with_capacity(exports.len());
        for (i, e) in exports.iter().enumerate() {
            match e.start() {
                Ok(s) => statuses.push(s),
                Err(err) => {
                    stop_all(exports.get(..i).unwrap_or_default());
                    return Err(chv_err(id, "start export")(err));
                }
            }
        }
        if let Err(err) = crate::write_config_disk(&config_disk, &plan, &disks.config_extra) {
            stop_all(&exports);
            return Err(chv_err(id, "write config disk")(err));
        }
        made = Some((plan, config_disk, statuses));
        Ok(())
    });
    let desc = match attached {
        Ok(d) => d,
        Err(e) => {
            // The commit itself failed after the exports started: stop
            // them, then let recovery finish the undo their clients blocked.
            if made.is_some() {
                if let Ok(dir) = files_dir(vols, id) {
                    let _ = export::stop_all_in(&dir);
                }
                let _ = vols.recover_instances();
            }
            return Err(e);
        }
    };
    let (plan, config_disk, exports) = match made {
        Some(m) => m,
        None => {
            let (p, c) = plan_of(&desc, disks)?;
            (p, c, export_status(&desc)?)
        }
    };
    Ok(Vm {
        instance: desc,
        disks: disks.clone(),
        plan,
        config_disk,
        exports,
    })
}

fn export_status(desc: &InstanceDescription) -> Result<Vec<ExportStatus>> {
    let id = desc.instance.id.as_str();
    Ok(crate::instance_exports(desc)
        .map_err(chv_err(id, "plan exports"))?
        .iter()
        .map(Export::status)
        .collect())
}

/// Instance `id` as [`attach`] made it.
pub fn show(vols: &Volumes, id: &str) -> Result<Vm> {
    stop_leftovers(vols);
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
    let exports = export_status(&desc)?;
    Ok(Vm {
        instance: desc,
        disks,
        plan,
        config_disk,
        exports,
    })
}

/// Starts again every export of attached instance `id` whose daemon is
/// not running (after a crash or a host reboot); running ones are left
/// alone. Returns every export's status.
pub fn restart_exports(vols: &Volumes, id: &str) -> Result<Vec<ExportStatus>> {
    let desc = vols.describe_instance(id)?;
    if desc.instance.state != InstanceState::Attached {
        return Err(vmvol_volume::Error::external(
            format!("instance {id}"),
            "restart exports",
            ErrorKind::InvalidArgument,
            format!(
                "the instance is {} (only an attached instance's exports run)",
                desc.instance.state.as_str()
            ),
        ));
    }
    crate::instance_exports(&desc)
        .map_err(chv_err(id, "plan exports"))?
        .iter()
        .map(|e| e.restart_if_dead().map_err(chv_err(id, "restart export")))
        .collect()
}

/// Detaches instance `id`: exports stopped, volumes detached, overlays
/// and config disk removed, volumes kept. Idempotent.
pub fn detach(vols: &Volumes, id: &str) -> Result<Detached> {
    stop_leftovers(vols);
    // Unknown or invalid ids have no files: detach_instance says why.
    if let Ok(dir) = files_dir(vols, id) {
        export::stop_all_in(&dir).map_err(chv_err(id, "stop exports"))?;
    }
    vols.detach_instance(id)
}

/// What [`resize_volume`] did.
#[derive(Debug)]
pub enum VolumeResized {
    /// The image grew and the volume's record says so: it was detached
    /// (`online` false), or attached read-write over vhost-user and grown
    /// by its export daemon under the running guest (`online` true).
    Done {
        /// Size before.
        old_size: u64,
        /// Size now (recorded).
        new_size: u64,
        /// Whether an instance had it attached read-write.
        online: bool,
        /// What to tell the user (the guest grows its own filesystem).
        note: String,
    },
    /// A host file attached read-write: send `request` to the instance's
    /// Cloud Hypervisor (`PUT /vm.resize-disk`), then
    /// [`Volumes::confirm_resize`]; dropping it releases the reserved space.
    Vmm(OnlineResize),
}

/// Grows volume `name` of `pool` ([`Volumes::resize_volume`]), carrying
/// out an online resize this host can do itself: a volume attached
/// read-write over vhost-user (RBD) is grown by the instance's export
/// daemon ([`Export::resize`]) and then confirmed, so its record shows the
/// new size. A host file attached read-write is returned as
/// [`VolumeResized::Vmm`] for Cloud Hypervisor.
pub fn resize_volume(
    vols: &Volumes,
    pool: &str,
    name: &str,
    size: NewSize,
) -> Result<VolumeResized> {
    let on = match vols.resize_volume(pool, name, size)? {
        Resized::Offline {
            old_size,
            new_size,
            note,
        } => {
            return Ok(VolumeResized::Done {
                old_size,
                new_size,
                online: false,
                note,
            })
        }
        Resized::Online(on) => on,
    };
    let id = on.instance.clone();
    let desc = vols.describe_instance(&id)?;
    let socket = export::socket_path(&desc.files_dir, &on.request.id);
    let exports = crate::instance_exports(&desc).map_err(chv_err(&id, "plan exports"))?;
    let Some(e) = exports.iter().find(|e| e.socket == socket) else {
        return Ok(VolumeResized::Vmm(on));
    };
    // A stopped or dead daemon is a state to fix (restart the exports),
    // not an I/O failure.
    let kind = if e.status().is_running() {
        None
    } else {
        Some(ErrorKind::Refused)
    };
    e.resize(on.request.desired_size)
        .map_err(|err| match kind {
            Some(k) => {
                vmvol_volume::Error::external(format!("instance {id}"), "resize volume", k, err)
            }
            None => chv_err(&id, "resize volume")(err),
        })?;
    let old_size = on.old_size;
    let note = format!(
        "grown by its export daemon, which signals instance {id}'s VMM; the guest sees the new \
         size at once only if the daemon and the VMM pass on vhost-user config changes, else \
         once the disk is reconnected (the VMM restarted); {}",
        on.note
    );
    let new_size = vols.confirm_resize(on)?;
    Ok(VolumeResized::Done {
        old_size,
        new_size,
        online: true,
        note,
    })
}
