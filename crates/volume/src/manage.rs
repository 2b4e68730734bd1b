//! Changing volumes: delete, resize, clone, compress.

use serde::{Deserialize, Serialize};
use vmvol_format::{Compression, Control, Format, Prealloc};
use vmvol_pool::{EntryKind, ImageSpec, Reservation, DATA_IMAGE};

use crate::create::{commit_new, reserve_split};
use crate::error::{Error, Result};
use crate::record::{now_rfc3339, validate_name, AttachMode, Provenance, VolumeRecord};
use crate::volumes::{
    chain_host_bytes, check_size, copy_data, data_ref, find, obj, require_free, Found, Volumes,
};

/// The size a resize asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewSize {
    /// Exactly this many bytes.
    To(u64),
    /// This many bytes more.
    Grow(u64),
}

/// Cloud Hypervisor's `PUT /vm.resize-disk` request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeDiskRequest {
    /// The disk id the VMM knows the volume by: its device name in the
    /// read-write instance (`vdd`…, what vmvol-chv sets as `id`).
    pub id: String,
    /// New size in bytes (a multiple of 512).
    pub desired_size: u64,
}

/// An online resize: space reserved, image untouched. Send `request` to
/// the VMM, then [`Volumes::confirm_resize`]; dropping it releases the space.
#[derive(Debug)]
pub struct OnlineResize {
    /// The pool.
    pub pool: String,
    /// The volume's UUID.
    pub id: String,
    /// Size before.
    pub old_size: u64,
    /// The instance that has the volume attached read-write (whose VMM,
    /// or whose vhost-user export daemon, must grow the image).
    pub instance: String,
    /// The body of `PUT /vm.resize-disk`.
    pub request: ResizeDiskRequest,
    /// What the caller should tell the user.
    pub note: String,
    _reservation: Reservation,
}

/// What [`Volumes::resize_volume`] did.
#[derive(Debug)]
pub enum Resized {
    /// The image was grown (the volume was detached).
    Offline {
        /// Size before.
        old_size: u64,
        /// Size now.
        new_size: u64,
        /// The guest grows its own filesystem.
        note: String,
    },
    /// The volume is attached read-write: the VMM must grow it.
    Online(OnlineResize),
}

/// What [`Volumes::compress_volume`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compressed {
    /// Host bytes before.
    pub bytes_before: u64,
    /// Host bytes after.
    pub bytes_after: u64,
    /// Bytes ext4 reported unused (dropped).
    pub unused_bytes: u64,
}

const GUEST_FS_NOTE: &str =
    "the guest must grow its own partition/filesystem (e.g. resize2fs) to use the new space";

impl Volumes {
    /// Deletes a volume: refused while attached (naming the instances).
    /// One atomic step in the pool, so a crash leaves it there or gone.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<()> {
        const OP: &str = "delete volume";
        let object = obj(pool, EntryKind::Volume, name);
        let p = self.pool(pool)?;
        p.transaction(OP, |t| {
            Ok((|| {
                let v = find::<VolumeRecord>(t, pool, name, OP)?;
                refuse_attached(&object, OP, &v.record)?;
                t.remove(EntryKind::Volume, &v.id)
                    .map_err(Error::pool(&object, OP))
            })())
        })
        .map_err(Error::pool(&object, OP))?
    }

    /// Grows a volume. Detached: the image grows now (preallocated raw
    /// volumes grow preallocated). Attached read-write: the image is left
    /// to the VMM; the space is reserved and Cloud Hypervisor's request is
    /// returned ([`Resized::Online`]).
    pub fn resize_volume(&self, pool: &str, name: &str, size: NewSize) -> Result<Resized> {
        const OP: &str = "resize volume";
        let object = obj(pool, EntryKind::Volume, name);
        let p = self.pool(pool)?;
        p.transaction(OP, |t| {
            Ok((|| {
                let v = find::<VolumeRecord>(t, pool, name, OP)?;
                let old = v.record.size;
                let new = match size {
                    NewSize::To(n) => n,
                    NewSize::Grow(d) => old
                        .checked_add(d)
                        .ok_or_else(|| Error::invalid(&object, OP, "size overflows 64 bits"))?,
                };
                check_size(&object, OP, new)?;
                if new < old {
                    return Err(Error::Shrink {
                        object: object.clone(),
                        current: old,
                        requested: new,
                    });
                }
                let rw = v
                    .record
                    .attachments
                    .iter()
                    .any(|a| a.mode == AttachMode::Rw);
                if rw {
                    if v.record.format == Format::Qcow2 && v.record.base.is_some() {
                        return Err(Error::refused(
                            &object,
                            OP,
                            "online resize: Cloud Hypervisor refuses to resize a qcow2 image \
                             that has a backing file",
                        ));
                    }
                    let mut r = reserve_split(t, &object, OP, new - old, 0)?;
                    let res = r.pop().ok_or_else(|| {
                        Error::invalid(&object, OP, format!("the size is already {new} bytes"))
                    })?;
                    let (instance, disk_id) = self.disk_id_of(&v)?;
                    return Ok(Resized::Online(OnlineResize {
                        pool: pool.to_string(),
                        id: v.id.clone(),
                        old_size: old,
                        instance,
                        request: ResizeDiskRequest {
                            id: disk_id,
                            desired_size: new,
                        },
                        note: GUEST_FS_NOTE.to_string(),
                        _reservation: res,
                    }));
                }
                refuse_attached(&object, OP, &v.record)?;
                if new == old {
                    return Ok(Resized::Offline {
                        old_size: old,
                        new_size: new,
                        note: GUEST_FS_NOTE.into(),
                    });
                }
                let phys = v.record.format == Format::Raw && v.record.prealloc != Prealloc::Off;
                let _r =
                    reserve_split(t, &object, OP, new - old, if phys { new - old } else { 0 })?;
                let img = data_ref(EntryKind::Volume, &v.id, v.record.format);
                t.grow_image(&img, new).map_err(Error::pool(&object, OP))?;
                if phys {
                    // Nobody else sees the tail yet (we hold the lock).
                    let dev = t.open_image(&img, true).map_err(Error::pool(&object, OP))?;
                    let buf = vec![0u8; 1 << 20];
                    let mut off = old;
                    while off < new {
                        let n = (new - off).min(1 << 20);
                        let b = buf.get(..n as usize).unwrap_or_default();
                        dev.write_at(b, off).map_err(Error::image(&object, OP))?;
                        off += n;
                    }
                    dev.flush().map_err(Error::image(&object, OP))?;
                    t.rescan_entry(EntryKind::Volume, &v.id)
                        .map_err(Error::pool(&object, OP))?;
                }
                let mut rec = v.record;
                rec.size = new;
                t.write_record(EntryKind::Volume, &v.id, &rec)
                    .map_err(Error::pool(&object, OP))?;
                Ok(Resized::Offline {
                    old_size: old,
                    new_size: new,
                    note: GUEST_FS_NOTE.into(),
                })
            })())
        })
        .map_err(Error::pool(&object, OP))?
    }

    /// Records the size of an online resize the VMM confirmed.
    pub fn confirm_resize(&self, resize: OnlineResize) -> Result<u64> {
        const OP: &str = "confirm online resize";
        let object = obj(&resize.pool, EntryKind::Volume, &resize.id);
        let p = self.pool(&resize.pool)?;
        let new = resize.request.desired_size;
        p.transaction(OP, |t| {
            Ok((|| {
                let v = find::<VolumeRecord>(t, &resize.pool, &resize.id, OP)?;
                let mut rec = v.record;
                rec.size = rec.size.max(new);
                t.write_record(EntryKind::Volume, &v.id, &rec)
                    .map_err(Error::pool(&object, OP))?;
                Ok(rec.size)
            })())
        })
        .map_err(Error::pool(&object, OP))?
    }

    /// Full independent copy of a volume into `to_pool` (default: the same
    /// pool). The source must not be attached read-write: a running guest
    /// would change it during the copy.
    pub fn clone_volume(
        &self,
        pool: &str,
        name: &str,
        new_name: &str,
        to_pool: Option<&str>,
        ctl: &Control,
    ) -> Result<Found<VolumeRecord>> {
        const OP: &str = "clone volume";
        validate_name("volume", OP, new_name)?;
        let dest = to_pool.unwrap_or(pool);
        let object = obj(pool, EntryKind::Volume, name);
        let dobject = obj(dest, EntryKind::Volume, new_name);
        let p = self.pool(pool)?;
        let src = p
            .transaction(OP, |t| {
                Ok((|| {
                    let v = find::<VolumeRecord>(t, pool, name, OP)?;
                    let rw: Vec<String> = v
                        .record
                        .attachments
                        .iter()
                        .filter(|a| a.mode == AttachMode::Rw)
                        .map(|a| a.instance.clone())
                        .collect();
                    if !rw.is_empty() {
                        return Err(Error::Attached {
                            object: object.clone(),
                            op: "clone volume (source attached read-write)",
                            instances: rw,
                        });
                    }
                    Ok(v)
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let phys = if dest == pool {
            p.transaction(OP, |t| Ok(chain_host_bytes(t, EntryKind::Volume, &src.id)))
                .map_err(Error::pool(&object, OP))?
        } else {
            // Read from the other pool without its lock held here.
            p.get::<VolumeRecord>(EntryKind::Volume, &src.id)
                .ok()
                .and_then(|e| e.image().map(|i| i.host_bytes))
                .unwrap_or(src.record.size)
        };
        let dp = self.pool(dest)?;
        let size = src.record.size;
        let (_res, staging) = dp
            .transaction(OP, |t| {
                Ok((|| {
                    require_free::<VolumeRecord>(t, dest, new_name, OP)?;
                    let r = reserve_split(t, &dobject, OP, size, phys)?;
                    let s = t.stage().map_err(Error::pool(&dobject, OP))?;
                    Ok((r, s))
                })())
            })
            .map_err(Error::pool(&dobject, OP))??;
        let sref = data_ref(EntryKind::Volume, &src.id, src.record.format);
        let made = if dest == pool {
            staging
                .copy_full(DATA_IMAGE, &sref, src.record.format, ctl)
                .map_err(Error::pool(&dobject, OP))?
        } else {
            let spec = ImageSpec {
                size,
                format: src.record.format,
                prealloc: Prealloc::Off,
            };
            let img = staging
                .create_image(DATA_IMAGE, &spec, ctl)
                .map_err(Error::pool(&dobject, OP))?;
            let s = p
                .open_image(&sref, false)
                .map_err(Error::pool(&object, OP))?;
            let d = staging
                .open_image(&img, true)
                .map_err(Error::pool(&dobject, OP))?;
            copy_data(&*s, &*d, ctl, &dobject, OP)?;
            img
        };
        let rec = VolumeRecord {
            name: new_name.to_string(),
            created: now_rfc3339(),
            // What the destination pool made (RBD: raw whatever was asked).
            format: made.format,
            size,
            prealloc: Prealloc::Off,
            ext4: src.record.ext4,
            provenance: Provenance::Clone {
                pool: pool.to_string(),
                id: src.id.clone(),
                name: src.record.name.clone(),
            },
            base: None,
            attachments: Vec::new(),
        };
        commit_new(self, dest, staging, &rec, OP)
    }

    /// Compacts a detached qcow2 volume: drops clusters ext4 does not use
    /// and all-zero clusters, optionally compressing the rest. Raw volumes
    /// are refused. Runs under the pool's exclusive lock (nothing can
    /// attach, snapshot or delete the volume meanwhile); the image is
    /// replaced atomically.
    pub fn compress_volume(
        &self,
        pool: &str,
        name: &str,
        compression: Option<Compression>,
        ctl: &Control,
    ) -> Result<Compressed> {
        const OP: &str = "compress volume";
        let object = obj(pool, EntryKind::Volume, name);
        let p = self.pool(pool)?;
        p.transaction(OP, |t| {
            Ok((|| {
                let v = find::<VolumeRecord>(t, pool, name, OP)?;
                // qcow2, or whatever the pool's links are made of (RBD:
                // raw images, compacted by discard and sparsify).
                if v.record.format != Format::Qcow2 && v.record.format != p.linked_format() {
                    return Err(Error::refused(
                        &object,
                        OP,
                        "only qcow2 volumes can be compressed (a raw image has no cluster \
                         map to drop or compress clusters in; clone it to qcow2 first)",
                    ));
                }
                refuse_attached(&object, OP, &v.record)?;
                let img = data_ref(EntryKind::Volume, &v.id, v.record.format);
                let mut unused = Vec::new();
                if v.record.ext4 {
                    let dev = t
                        .open_image(&img, false)
                        .map_err(Error::pool(&object, OP))?;
                    if let Some(r) = vmvol_fs::unused_ranges(&*dev)
                        .map_err(Error::fs(&object, "read ext4 free space"))?
                    {
                        unused = r;
                    }
                }
                let unused_bytes = unused.iter().map(|r| r.len).sum();
                let opts = vmvol_format::CompactOptions {
                    compression,
                    threads: 0,
                    unused_ranges: unused,
                };
                let rep = t
                    .compact_image(&img, &opts, ctl)
                    .map_err(Error::pool(&object, OP))?;
                Ok(Compressed {
                    bytes_before: rep.bytes_before,
                    bytes_after: rep.bytes_after,
                    unused_bytes,
                })
            })())
        })
        .map_err(Error::pool(&object, OP))?
    }
}

impl Volumes {
    /// The instance that has a volume attached read-write and the Cloud
    /// Hypervisor disk id of the volume there: its device (read without the
    /// instance's lock: records are replaced atomically, and the attachment
    /// we hold the pool lock over keeps the instance from detaching).
    fn disk_id_of(&self, v: &Found<VolumeRecord>) -> Result<(String, String)> {
        let object = obj(&v.pool, EntryKind::Volume, &v.record.name);
        let inst = v
            .record
            .attachments
            .iter()
            .find(|a| a.mode == AttachMode::Rw)
            .map(|a| a.instance.clone())
            .ok_or_else(|| Error::refused(&object, "online resize", "not attached read-write"))?;
        let rec = self
            .instance_records()?
            .read::<crate::InstanceRecord>(&inst)
            .map_err(Error::pool(&object, "online resize"))?;
        let dev = rec.and_then(|r| r.device_of(&v.id)).ok_or_else(|| {
            Error::refused(
                &object,
                "online resize",
                format!("instance {inst} has no record of the volume's device"),
            )
        })?;
        Ok((inst, dev))
    }
}

/// Refuses when anything is attached.
pub(crate) fn refuse_attached(object: &str, op: &'static str, v: &VolumeRecord) -> Result<()> {
    if v.attachments.is_empty() {
        return Ok(());
    }
    Err(Error::Attached {
        object: object.to_string(),
        op,
        instances: v.attachments.iter().map(|a| a.instance.clone()).collect(),
    })
}
