//! Instances: all of an instance's volumes attached in one call, all or
//! nothing across volumes and pools, and detached together.
//!
//! The instance record (a host record next to the registry, see
//! [`vmvol_pool::HostRecords`]) is the commit point. Attach writes it as
//! `attaching`, listing every volume and the name of every overlay image it
//! will make, *before* any pool changes; then changes one pool at a time,
//! each under that pool's lock (rules checked and attachments written
//! together, so they hold across threads and processes); then marks it
//! `attached`. Detach marks it `detaching`, then undoes every pool, then
//! removes it. Whoever finds a record `attaching` or `detaching` whose lock
//! is free (its writer died) undoes it: attachments of the instance are
//! removed from the listed volumes and the listed overlay images deleted.
//! Undo is idempotent, so a crash inside it is finished the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmvol_format::{Control, Format, Prealloc};
use vmvol_pool::{
    AttachTarget, EntryKind, HostRecordLock, HostRecords, ImageRef, ImageSpec, PoolTxn, RecordType,
};

use crate::attach::{attach_conflict, check_request, instance_object, AttachRequest, OverlayKind};
use crate::error::{Error, Result};
use crate::record::{now_rfc3339, AttachMode, Attachment, VolumeRecord};
use crate::volumes::{data_ref, find, obj, Volumes};

/// The host-record kind holding instances (`<registry root>/instances/`).
pub const INSTANCE_RECORDS: &str = "instances";

/// Where an instance's attach stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Being attached (or left so by a crash: recovery undoes it).
    Attaching,
    /// Every volume attached.
    Attached,
    /// Being detached (or left so by a crash: recovery finishes it).
    Detaching,
}

/// A per-instance overlay image, kept in the base volume's pool entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayImage {
    /// Guest overlayfs (raw ext4 disk) or block (qcow2 over the base).
    pub kind: OverlayKind,
    /// Size asked for, bytes (a block overlay's virtual size is the base's).
    pub size: u64,
    /// The image's name inside the volume's entry.
    pub image: String,
}

impl OverlayImage {
    /// The image's format on a local pool.
    pub fn format(&self) -> Format {
        self.format_in(Format::Qcow2)
    }

    /// The image's format in a pool whose linked images are `linked`
    /// ([`vmvol_pool::Pool::linked_format`]; RBD: raw clones).
    pub fn format_in(&self, linked: Format) -> Format {
        match self.kind {
            OverlayKind::GuestOverlayfs => Format::Raw,
            OverlayKind::Block => linked,
        }
    }
}

/// One volume of an instance, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceVolume {
    /// The pool.
    pub pool: String,
    /// The volume's UUID.
    pub volume_id: String,
    /// Its name.
    pub volume: String,
    /// Its image format.
    pub format: Format,
    /// Where the guest mounts it.
    pub mount_path: String,
    /// How the base volume is attached.
    pub mode: AttachMode,
    /// The instance's overlay over it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayImage>,
}

/// An instance's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The instance id.
    pub id: String,
    /// When it was attached, RFC 3339 UTC.
    pub created: String,
    /// Where its attach stands.
    pub state: InstanceState,
    /// Its volumes, in request order.
    pub volumes: Vec<InstanceVolume>,
    /// The caller's data ([`AttachRequest::vmm`]).
    #[serde(default)]
    pub vmm: serde_json::Value,
}

impl InstanceRecord {
    /// The guest device of volume `volume_id` (`vdd`, ...): volumes follow
    /// `vda` rootfs, `vdb` instance overlay and `vdc` config disk in
    /// request order, a guest-overlayfs overlay taking two. This is the
    /// `id` vmvol-chv gives the disk, what `vm.resize-disk` takes.
    pub fn device_of(&self, volume_id: &str) -> Option<String> {
        let mut n = 3usize;
        for v in &self.volumes {
            if v.volume_id == volume_id {
                let letter = u8::try_from(n).ok().filter(|&i| i < 26)?;
                return Some(format!("vd{}", char::from(b'a' + letter)));
            }
            n += v.overlay.as_ref().map_or(1, |o| o.kind.devices());
        }
        None
    }
}

impl RecordType for InstanceRecord {
    const SCHEMA_VERSION: u32 = 1;
}

/// One attached volume as a VMM needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceDisk {
    /// The volume.
    pub volume: InstanceVolume,
    /// What the VMM opens for the volume's device: the volume itself, or
    /// for a block overlay the per-instance qcow2 over it.
    pub target: AttachTarget,
    /// For a guest-overlayfs overlay: the per-instance overlay disk (the
    /// next device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_target: Option<AttachTarget>,
}

/// An instance with what its VMM opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceDescription {
    /// The record.
    pub instance: InstanceRecord,
    /// Its volumes, in request order.
    pub disks: Vec<InstanceDisk>,
    /// A directory for files that live and die with the instance (e.g. its
    /// config disk); created on demand by whoever puts files there,
    /// removed at detach.
    pub files_dir: PathBuf,
}

/// One row of [`Volumes::list_instances`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum InstanceRow {
    /// A readable record.
    Ok(InstanceRecord),
    /// A record that cannot be read (never hidden).
    Damaged {
        /// The instance id.
        id: String,
        /// Why.
        reason: String,
    },
}

/// What [`Volumes::detach_instance`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detached {
    /// The instance.
    pub instance: String,
    /// The volumes it had (empty if it had none or did not exist).
    pub volumes: Vec<InstanceVolume>,
}

/// A hook [`Volumes::attach_instance`] runs after every volume is attached
/// and before the attach is committed (e.g. to write the config disk into
/// [`InstanceDescription::files_dir`]); an error undoes the attach.
pub type PrepareHook<'a> = &'a mut dyn FnMut(&InstanceDescription) -> Result<()>;

const ATTACH: &str = "attach";
const DETACH: &str = "detach";

impl Volumes {
    /// The instance records of this host.
    pub fn instance_records(&self) -> Result<HostRecords> {
        self.registry
            .host_records(INSTANCE_RECORDS, self.wait)
            .map_err(Error::pool("instances", "open instance records"))
    }

    /// Attaches every volume of a new instance, all or nothing (see the
    /// module docs). Refused: an instance that exists (no hot-attach), a
    /// request breaking a rule ([`check_request`]), an unknown volume, an
    /// inactive pool, a volume whose attachments forbid it, or a pool
    /// without room for an overlay. Nothing changes on refusal.
    pub fn attach_instance(
        &self,
        req: &AttachRequest,
        prepare: PrepareHook<'_>,
    ) -> Result<InstanceDescription> {
        check_request(req)?;
        let object = instance_object(&req.instance);
        let store = self.instance_records()?;
        self.recover_instances()?;
        let lock = store
            .lock(&req.instance, "attach instance")
            .map_err(Error::pool(&object, ATTACH))?;
        if read_record(&store, &req.instance)?.is_some() {
            return Err(Error::AlreadyExists {
                object,
                op: "attach (volumes attach only when an instance is created; detach it first)",
            });
        }
        let volumes = match self.resolve(req) {
            Ok(v) => v,
            Err(e) => {
                // Refused before anything was written: leave no lock file.
                let _ = store.remove(&lock, &req.instance);
                return Err(e);
            }
        };
        let mut rec = InstanceRecord {
            id: req.instance.clone(),
            created: now_rfc3339(),
            state: InstanceState::Attaching,
            volumes,
            vmm: req.vmm.clone(),
        };
        store
            .write(&lock, &rec.id, &rec)
            .map_err(Error::pool(&object, ATTACH))?;
        let done = (|| {
            for (pool, idx) in by_pool(&rec.volumes) {
                self.apply(&rec, &pool, &idx)?;
            }
            let desc = self.describe_record(&store, rec.clone())?;
            prepare(&desc)?;
            rec.state = InstanceState::Attached;
            store
                .write(&lock, &rec.id, &rec)
                .map_err(Error::pool(&object, ATTACH))?;
            Ok(InstanceDescription {
                instance: rec.clone(),
                ..desc
            })
        })();
        if done.is_err() {
            // Best effort: if the undo fails too, the record stays
            // `attaching` and the next recovery finishes it.
            let _ = self.undo(&store, &lock, &rec);
        }
        done
    }

    /// Detaches every volume of an instance and removes its overlays and
    /// files; never deletes a volume. Idempotent: an unknown instance
    /// detaches nothing. A crash inside is finished by recovery.
    pub fn detach_instance(&self, id: &str) -> Result<Detached> {
        crate::record::validate_name("instance", DETACH, id)?;
        let object = instance_object(id);
        let store = self.instance_records()?;
        let lock = store
            .lock(id, "detach instance")
            .map_err(Error::pool(&object, DETACH))?;
        let Some(mut rec) = read_record(&store, id)? else {
            store
                .remove(&lock, id)
                .map_err(Error::pool(&object, DETACH))?;
            return Ok(Detached {
                instance: id.to_string(),
                volumes: Vec::new(),
            });
        };
        if rec.state != InstanceState::Detaching {
            rec.state = InstanceState::Detaching;
            store
                .write(&lock, id, &rec)
                .map_err(Error::pool(&object, DETACH))?;
        }
        self.undo(&store, &lock, &rec)?;
        Ok(Detached {
            instance: id.to_string(),
            volumes: rec.volumes,
        })
    }

    /// An instance and what its VMM opens.
    pub fn describe_instance(&self, id: &str) -> Result<InstanceDescription> {
        crate::record::validate_name("instance", "describe", id)?;
        let store = self.instance_records()?;
        self.recover_instances()?;
        let rec = read_record(&store, id)?.ok_or(Error::NotFound {
            object: instance_object(id),
            op: "describe",
        })?;
        self.describe_record(&store, rec)
    }

    /// Every instance of this host, by id; damaged records shown, not hidden.
    pub fn list_instances(&self) -> Result<Vec<InstanceRow>> {
        let store = self.instance_records()?;
        self.recover_instances()?;
        let mut rows = Vec::new();
        for id in store.list().map_err(Error::pool("instances", "list"))? {
            match store.read::<InstanceRecord>(&id) {
                Ok(Some(r)) => rows.push(InstanceRow::Ok(r)),
                Ok(None) => {}
                Err(e) => rows.push(InstanceRow::Damaged {
                    id,
                    reason: e.to_string(),
                }),
            }
        }
        Ok(rows)
    }

    /// Finishes every attach or detach whose process died: undoes an
    /// `attaching` instance, completes a `detaching` one. Instances whose
    /// writer is alive are left alone. Failures (an inactive pool, say)
    /// leave the record for a later run; the instance shows its state.
    pub fn recover_instances(&self) -> Result<()> {
        let store = self.instance_records()?;
        for id in store.list().map_err(Error::pool("instances", "recover"))? {
            let Some(lock) = store
                .try_lock(&id, "recover instance")
                .map_err(Error::pool(instance_object(&id), "recover"))?
            else {
                continue;
            };
            match store.read::<InstanceRecord>(&id) {
                Ok(None) => {
                    // A lock file or files left before the first record write.
                    let _ = store.remove(&lock, &id);
                }
                Ok(Some(r)) if r.state != InstanceState::Attached => {
                    let _ = self.undo(&store, &lock, &r);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Looks every volume up (one transaction per pool) and checks the
    /// rules against today's attachments, so a refusal comes before
    /// anything is written.
    fn resolve(&self, req: &AttachRequest) -> Result<Vec<InstanceVolume>> {
        let object = instance_object(&req.instance);
        let mut out: Vec<Option<InstanceVolume>> = vec![None; req.volumes.len()];
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, v) in req.volumes.iter().enumerate() {
            groups.entry(v.pool()).or_default().push(i);
        }
        for (pool, idx) in groups {
            let p = self.pool(pool)?;
            let pobj = format!("pool {pool}");
            p.transaction(ATTACH, |t| {
                Ok((|| {
                    t.config().map_err(Error::pool(&pobj, ATTACH))?;
                    require_active(t, &pobj)?;
                    for i in idx {
                        let Some(v) = req.volumes.get(i) else {
                            continue;
                        };
                        let f = find::<VolumeRecord>(t, pool, &v.volume_id, ATTACH).map_err(
                            |e| match e {
                                Error::NotFound { object, .. } => Error::NotFound {
                                    object: format!(
                                        "{object} (volume entry {} of instance {})",
                                        i + 1,
                                        req.instance
                                    ),
                                    op: ATTACH,
                                },
                                e => e,
                            },
                        )?;
                        if let Some(j) = out.iter().position(|o| {
                            o.as_ref()
                                .is_some_and(|o| o.pool == pool && o.volume_id == f.id)
                        }) {
                            return Err(Error::invalid(
                                &object,
                                ATTACH,
                                format!(
                                    "volume entry {} ({}) is the same volume as entry {} \
                                     (an instance attaches a volume once)",
                                    i + 1,
                                    v.label(),
                                    j + 1
                                ),
                            ));
                        }
                        conflict(&f.record, pool, &req.instance, v.mode())?;
                        let overlay = v.overlay().map(|kind| OverlayImage {
                            kind,
                            size: v.overlay_size.unwrap_or(0),
                            image: format!("ovl-{}", uuid::Uuid::new_v4().simple()),
                        });
                        if let Some(slot) = out.get_mut(i) {
                            *slot = Some(InstanceVolume {
                                pool: pool.to_string(),
                                volume_id: f.id,
                                volume: f.record.name,
                                format: f.record.format,
                                mount_path: v.mount_path.clone(),
                                mode: v.mode(),
                                overlay,
                            });
                        }
                    }
                    Ok(())
                })())
            })
            .map_err(Error::pool(&pobj, ATTACH))??;
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Attaches the instance's volumes of one pool under its lock: rules
    /// checked again, overlays made and moved into their volume's entry,
    /// attachments written.
    fn apply(&self, rec: &InstanceRecord, pool: &str, idx: &[usize]) -> Result<()> {
        let p = self.pool(pool)?;
        let pobj = format!("pool {pool}");
        p.transaction(ATTACH, |t| {
            Ok((|| {
                for &i in idx {
                    let Some(v) = rec.volumes.get(i) else {
                        continue;
                    };
                    let object = obj(pool, EntryKind::Volume, &v.volume);
                    let e = t
                        .get::<VolumeRecord>(EntryKind::Volume, &v.volume_id)
                        .map_err(|e| match e {
                            vmvol_pool::Error::EntryNotFound { .. } => Error::NotFound {
                                object: object.clone(),
                                op: ATTACH,
                            },
                            e => Error::Pool {
                                object: object.clone(),
                                op: ATTACH,
                                source: Box::new(e),
                            },
                        })?;
                    let mut vr = e.record.data;
                    conflict(&vr, pool, &rec.id, v.mode)?;
                    if let Some(o) = &v.overlay {
                        make_overlay(t, &object, v, &vr, o)?;
                    }
                    vr.attachments.push(Attachment {
                        instance: rec.id.clone(),
                        mount_path: v.mount_path.clone(),
                        mode: v.mode,
                        overlay: v.overlay.as_ref().map(|o| o.kind),
                    });
                    t.write_record(EntryKind::Volume, &v.volume_id, &vr)
                        .map_err(Error::pool(&object, ATTACH))?;
                }
                Ok(())
            })())
        })
        .map_err(Error::pool(&pobj, ATTACH))?
    }

    /// Removes the instance's attachments and overlays from every listed
    /// volume, then its record. Idempotent.
    fn undo(&self, store: &HostRecords, lock: &HostRecordLock, rec: &InstanceRecord) -> Result<()> {
        let object = instance_object(&rec.id);
        for (pool, idx) in by_pool(&rec.volumes) {
            let p = self.pool(&pool)?;
            let pobj = format!("pool {pool}");
            p.transaction(DETACH, |t| {
                Ok((|| {
                    for &i in &idx {
                        let Some(v) = rec.volumes.get(i) else {
                            continue;
                        };
                        let vobj = obj(&pool, EntryKind::Volume, &v.volume);
                        if !t
                            .contains(EntryKind::Volume, &v.volume_id)
                            .map_err(Error::pool(&vobj, DETACH))?
                        {
                            continue;
                        }
                        let e = t
                            .get::<VolumeRecord>(EntryKind::Volume, &v.volume_id)
                            .map_err(Error::pool(&vobj, DETACH))?;
                        if let Some(o) = &v.overlay {
                            // In whatever format the pool stored it.
                            let img = e.images.iter().find(|i| i.image.name == o.image);
                            if let Some(img) = img.map(|i| i.image.clone()) {
                                t.remove_image(&img).map_err(Error::pool(&vobj, DETACH))?;
                            }
                        }
                        let mut vr = e.record.data;
                        let n = vr.attachments.len();
                        vr.attachments.retain(|a| a.instance != rec.id);
                        if vr.attachments.len() != n {
                            t.write_record(EntryKind::Volume, &v.volume_id, &vr)
                                .map_err(Error::pool(&vobj, DETACH))?;
                        }
                    }
                    Ok(())
                })())
            })
            .map_err(Error::pool(&pobj, DETACH))??;
        }
        store
            .remove(lock, &rec.id)
            .map_err(Error::pool(&object, DETACH))
    }

    fn describe_record(
        &self,
        store: &HostRecords,
        rec: InstanceRecord,
    ) -> Result<InstanceDescription> {
        let object = instance_object(&rec.id);
        let mut disks = Vec::with_capacity(rec.volumes.len());
        for v in &rec.volumes {
            let p = self.pool(&v.pool)?;
            let vobj = obj(&v.pool, EntryKind::Volume, &v.volume);
            let target = |img: &ImageRef| {
                p.attach_target(img)
                    .map_err(Error::pool(vobj.clone(), "describe attachment"))
            };
            let base = target(&data_ref(EntryKind::Volume, &v.volume_id, v.format))?;
            let overlay = match &v.overlay {
                Some(o) => Some(target(&ImageRef::entry(
                    EntryKind::Volume,
                    &v.volume_id,
                    &o.image,
                    o.format_in(p.linked_format()),
                ))?),
                None => None,
            };
            let (target, overlay_target) = match (&v.overlay, overlay) {
                (Some(o), Some(t)) if o.kind == OverlayKind::Block => (t, None),
                (_, ot) => (base, ot),
            };
            disks.push(InstanceDisk {
                volume: v.clone(),
                target,
                overlay_target,
            });
        }
        let files_dir = store
            .files_dir(&rec.id)
            .map_err(Error::pool(&object, "describe"))?;
        Ok(InstanceDescription {
            instance: rec,
            disks,
            files_dir,
        })
    }
}

/// Makes overlay `o` of volume `v` in a staging area and moves it into the
/// volume's entry (space reserved first; the caller holds the lock).
fn make_overlay(
    t: &mut PoolTxn<'_>,
    object: &str,
    v: &InstanceVolume,
    vr: &VolumeRecord,
    o: &crate::instance::OverlayImage,
) -> Result<()> {
    let size = match o.kind {
        OverlayKind::GuestOverlayfs => o.size,
        OverlayKind::Block => vr.size,
    };
    let _reserved = t
        .reserve(size, object)
        .map_err(Error::pool(object, "reserve overlay"))?;
    let staging = t.stage().map_err(Error::pool(object, "stage overlay"))?;
    let img = match o.kind {
        OverlayKind::GuestOverlayfs => {
            let spec = ImageSpec {
                size,
                format: Format::Raw,
                prealloc: Prealloc::Off,
            };
            let img = staging
                .create_image(&o.image, &spec, &Control::new())
                .map_err(Error::pool(object, "create overlay"))?;
            let dev = staging
                .open_image(&img, true)
                .map_err(Error::pool(object, "create overlay"))?;
            let opts = vmvol_fs::MkfsOptions {
                label: "vmvol-overlay".into(),
                ..vmvol_fs::MkfsOptions::default()
            };
            vmvol_fs::mkfs(&*dev, &opts).map_err(Error::fs(object, "format overlay as ext4"))?;
            dev.flush()
                .map_err(Error::image(object, "format overlay"))?;
            img
        }
        OverlayKind::Block => {
            let base = data_ref(EntryKind::Volume, &v.volume_id, vr.format);
            let img = staging
                .create_linked(&o.image, &base, None)
                .map_err(Error::pool(object, "create overlay"))?;
            // Open it through the pool's backing policy: the chain a VMM will
            // follow (backing_files) is vetted here first.
            staging
                .open_image(&img, false)
                .map_err(Error::pool(object, "vet overlay chain"))?;
            img
        }
    };
    t.move_image(&img, EntryKind::Volume, &v.volume_id, &o.image)
        .map_err(Error::pool(object, "move overlay into place"))?;
    Ok(())
}

/// Refuses an attachment the volume's attachments forbid, naming the rule
/// and the holders.
fn conflict(vr: &VolumeRecord, pool: &str, instance: &str, mode: AttachMode) -> Result<()> {
    match attach_conflict(&vr.attachments, instance, mode) {
        None => Ok(()),
        Some((rule, holders)) => Err(Error::AttachRefused {
            object: obj(pool, EntryKind::Volume, &vr.name),
            instance: instance.to_string(),
            mode,
            rule,
            holders,
        }),
    }
}

fn require_active(t: &mut PoolTxn<'_>, object: &str) -> Result<()> {
    let c = t.config().map_err(Error::pool(object, ATTACH))?;
    if c.state != vmvol_pool::PoolState::Active {
        return Err(Error::refused(
            object,
            ATTACH,
            "the pool is inactive (activate it first)",
        ));
    }
    Ok(())
}

fn read_record(store: &HostRecords, id: &str) -> Result<Option<InstanceRecord>> {
    store.read::<InstanceRecord>(id).map_err(|e| match e {
        vmvol_pool::Error::Damaged { reason, .. } => Error::Corrupt {
            object: instance_object(id),
            op: "read instance record",
            reason,
        },
        e => Error::Pool {
            object: instance_object(id),
            op: "read instance record",
            source: Box::new(e),
        },
    })
}

impl InstanceState {
    /// `attaching`, `attached` or `detaching`.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Attaching => "attaching",
            InstanceState::Attached => "attached",
            InstanceState::Detaching => "detaching",
        }
    }
}

/// Indexes of `volumes` grouped by pool, pools in name order (so every
/// process takes pool locks in the same order).
fn by_pool(volumes: &[InstanceVolume]) -> BTreeMap<String, Vec<usize>> {
    let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, v) in volumes.iter().enumerate() {
        m.entry(v.pool.clone()).or_default().push(i);
    }
    m
}
