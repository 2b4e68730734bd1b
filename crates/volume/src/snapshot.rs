//! Snapshots: external for qcow2 volumes (O(1)), full reflinked copies
//! for raw ones; delete with optional merge into the dependents.

use vmvol_format::{Control, Prealloc};
use vmvol_pool::{EntryKind, ImageRef, ImageSpec, ImageSummary, Listed, PoolTxn, DATA_IMAGE};

use crate::create::{commit_new, reserve_split};
use crate::error::{Error, Result};
use crate::manage::refuse_attached;
use crate::record::{now_rfc3339, validate_name, BaseLink, SnapshotRecord, VolumeRecord};
use crate::volumes::{
    chain_host_bytes, data_ref, dependents, find, obj, require_free, sort_rows, Found, Row, Rows,
    Volumes,
};

/// Image name a merge builds its replacement under (recovery finishes it).
pub(crate) const MERGED_IMAGE: &str = "merged";

/// The replacement an unfinished merge left among an entry's images.
pub(crate) fn merged_image(images: &[ImageSummary]) -> Option<ImageRef> {
    images
        .iter()
        .find(|i| i.image.name == MERGED_IMAGE)
        .map(|i| i.image.clone())
}

impl Volumes {
    /// Snapshots detached volume `volume`. Where the pool's storage
    /// snapshots natively (RBD): a snapshot of the volume's image, staged
    /// and committed with the entry in one step; the volume keeps its image
    /// (no data copied, nothing renamed). Else qcow2: its
    /// current image becomes the snapshot and the volume continues on a new
    /// overlay linked to it (no data copied). raw: a full (reflinked where
    /// possible) copy.
    pub fn create_snapshot(
        &self,
        pool: &str,
        name: &str,
        volume: &str,
        ctl: &Control,
    ) -> Result<Found<SnapshotRecord>> {
        const OP: &str = "create snapshot";
        validate_name("snapshot", OP, name)?;
        let object = obj(pool, EntryKind::Snapshot, name);
        let p = self.pool(pool)?;
        // Images of the format the pool links (local: qcow2; RBD: raw, as
        // clones) are snapshotted by linking; others are copied.
        let linked = p.linked_format();
        let native = p.native_snapshots();
        let v = p
            .transaction(OP, |t| {
                Ok((|| {
                    require_free::<SnapshotRecord>(t, pool, name, OP)?;
                    let v = find::<VolumeRecord>(t, pool, volume, OP)?;
                    refuse_attached(&obj(pool, EntryKind::Volume, volume), OP, &v.record)?;
                    if v.record.format != linked && !native {
                        return Ok((v, None));
                    }
                    let rec = SnapshotRecord {
                        name: name.to_string(),
                        created: now_rfc3339(),
                        format: v.record.format,
                        size: v.record.size,
                        ext4: v.record.ext4,
                        volume: v.id.clone(),
                        volume_name: v.record.name.clone(),
                        base: v.record.base.clone(),
                        // Native: staged and committed in one step.
                        pending: !native,
                        native,
                    };
                    // External: the volume's new overlay counts its virtual
                    // size again (the snapshot keeps the old image's). All
                    // of it happens under this transaction's lock: a check
                    // will do, no reservation record. Native: the snapshot
                    // counts its virtual size like any entry.
                    t.require_room(v.record.size)
                        .map_err(Error::pool(&object, OP))?;
                    let sid = uuid::Uuid::new_v4().to_string();
                    let s = t.stage().map_err(Error::pool(&object, OP))?;
                    if native {
                        // The storage's snapshot of the volume's image, in
                        // staging; the commit makes it the entry's.
                        s.snapshot_image(
                            DATA_IMAGE,
                            &data_ref(EntryKind::Volume, &v.id, v.record.format),
                        )
                        .map_err(Error::pool(&object, OP))?;
                        t.commit(s, EntryKind::Snapshot, &sid, &rec)
                            .map_err(Error::pool(&object, OP))?;
                    } else {
                        // Step 1: the (empty) snapshot entry, marked pending.
                        t.commit(s, EntryKind::Snapshot, &sid, &rec)
                            .map_err(Error::pool(&object, OP))?;
                        finish_snapshot(t, pool, &sid, rec.clone())?;
                    }
                    let mut rec = rec;
                    rec.pending = false;
                    Ok((
                        v,
                        Some(Found {
                            pool: pool.to_string(),
                            id: sid,
                            record: rec,
                        }),
                    ))
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let (v, done) = v;
        if let Some(f) = done {
            return Ok(f);
        }
        // Not linkable (local: raw): a full copy in staging, committed in one step.
        let (_res, staging) = p
            .transaction(OP, |t| {
                Ok((|| {
                    require_free::<SnapshotRecord>(t, pool, name, OP)?;
                    let phys = chain_host_bytes(t, EntryKind::Volume, &v.id);
                    let r = reserve_split(t, &object, OP, v.record.size, phys)?;
                    let s = t.stage().map_err(Error::pool(&object, OP))?;
                    Ok((r, s))
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let img = staging
            .copy_full(
                DATA_IMAGE,
                &data_ref(EntryKind::Volume, &v.id, v.record.format),
                v.record.format,
                ctl,
            )
            .map_err(Error::pool(&object, OP))?;
        let rec = SnapshotRecord {
            name: name.to_string(),
            created: now_rfc3339(),
            format: img.format,
            size: v.record.size,
            ext4: v.record.ext4,
            volume: v.id,
            volume_name: v.record.name,
            base: None,
            pending: false,
            native: false,
        };
        commit_new(self, pool, staging, &rec, OP)
    }

    /// Snapshots of `pool` (all, or of one volume given by name or UUID).
    pub fn list_snapshots(&self, pool: &str, volume: Option<&str>) -> Result<Rows<SnapshotRecord>> {
        let p = self.pool(pool)?;
        let mut out: Vec<_> = p
            .list::<SnapshotRecord>(EntryKind::Snapshot, |_, r| {
                volume.is_none_or(|v| r.volume == v || r.volume_name == v)
            })
            .map_err(Error::pool(format!("pool {pool}"), "list snapshots"))?
            .into_iter()
            .map(|l| match l {
                Listed::Ok(e) => Row::Ok(Found {
                    pool: pool.to_string(),
                    id: e.id,
                    record: e.record.data,
                }),
                Listed::Damaged(d) => Row::Damaged {
                    uuid: d.id,
                    reason: d.reason,
                },
            })
            .collect();
        sort_rows(&mut out);
        Ok(out)
    }

    /// Snapshot `name` (or UUID) of `pool`.
    pub fn describe_snapshot(&self, pool: &str, name: &str) -> Result<Found<SnapshotRecord>> {
        const OP: &str = "describe snapshot";
        let object = obj(pool, EntryKind::Snapshot, name);
        self.pool(pool)?
            .transaction(OP, |t| Ok(find::<SnapshotRecord>(t, pool, name, OP)))
            .map_err(Error::pool(&object, OP))?
    }

    /// Deletes a snapshot. While volumes or snapshots are linked to it the
    /// delete is refused (naming them) unless `merge`: then its data is
    /// first pulled into each dependent (like `qemu-img rebase` onto the
    /// snapshot's own base), which makes the delete O(size).
    pub fn delete_snapshot(&self, pool: &str, name: &str, merge: bool) -> Result<()> {
        const OP: &str = "delete snapshot";
        let object = obj(pool, EntryKind::Snapshot, name);
        self.pool(pool)?
            .transaction(OP, |t| {
                Ok((|| {
                    let s = find::<SnapshotRecord>(t, pool, name, OP)?;
                    let deps = dependents(t, pool, EntryKind::Snapshot, &s.id, OP)?;
                    if !deps.is_empty() && !merge {
                        return Err(Error::HasDependents {
                            object: object.clone(),
                            op: OP,
                            dependents: deps
                                .into_iter()
                                .map(|(k, _, n)| format!("{k} {n}"))
                                .collect(),
                        });
                    }
                    for (kind, id, _) in deps {
                        rebase(t, pool, &s, kind, &id)?;
                    }
                    t.remove(EntryKind::Snapshot, &s.id)
                        .map_err(Error::pool(&object, OP))
                })())
            })
            .map_err(Error::pool(&object, OP))?
    }
}

/// Steps 2–4 of an external snapshot (also run by recovery): move the
/// volume's image into the snapshot, put a new overlay on it into the
/// volume, point the volume's record at the snapshot, clear `pending`. Each
/// step is skipped when already done. (A native snapshot is committed with
/// its image and never pending; a pending one is kept if it has its image,
/// else removed.)
pub(crate) fn finish_snapshot(
    t: &mut PoolTxn<'_>,
    pool: &str,
    sid: &str,
    mut rec: SnapshotRecord,
) -> Result<()> {
    const OP: &str = "create snapshot";
    let object = obj(pool, EntryKind::Snapshot, &rec.name);
    let has = |t: &mut PoolTxn<'_>, kind, id: &str| -> Result<bool> {
        Ok(t.get::<serde_json::Value>(kind, id)
            .map_err(Error::pool(&object, OP))?
            .image()
            .is_some())
    };
    let vid = rec.volume.clone();
    let vol_exists = t
        .contains(EntryKind::Volume, &vid)
        .map_err(Error::pool(&object, OP))?;
    if rec.native {
        if !has(t, EntryKind::Snapshot, sid)? {
            // Nothing to take: undo.
            return t
                .remove(EntryKind::Snapshot, sid)
                .map_err(Error::pool(&object, OP));
        }
        rec.pending = false;
        return t
            .write_record(EntryKind::Snapshot, sid, &rec)
            .map_err(Error::pool(&object, OP));
    }
    // The volume's image moves into the snapshot as it is; its new overlay
    // is of the same format (only images of the pool's linked format are
    // snapshotted this way).
    let snap_img = data_ref(EntryKind::Snapshot, sid, rec.format);
    if !has(t, EntryKind::Snapshot, sid)? {
        if !vol_exists || !has(t, EntryKind::Volume, &vid)? {
            // Nothing to take: undo.
            return t
                .remove(EntryKind::Snapshot, sid)
                .map_err(Error::pool(&object, OP));
        }
        t.move_image(
            &data_ref(EntryKind::Volume, &vid, rec.format),
            EntryKind::Snapshot,
            sid,
            DATA_IMAGE,
        )
        .map_err(Error::pool(&object, OP))?;
    }
    if vol_exists {
        if !has(t, EntryKind::Volume, &vid)? {
            let s = t.stage().map_err(Error::pool(&object, OP))?;
            let o = s
                .create_linked(DATA_IMAGE, &snap_img, Some(rec.size))
                .map_err(Error::pool(&object, OP))?;
            t.move_image(&o, EntryKind::Volume, &vid, DATA_IMAGE)
                .map_err(Error::pool(&object, OP))?;
        }
        let mut v = t
            .get::<VolumeRecord>(EntryKind::Volume, &vid)
            .map_err(Error::pool(&object, OP))?
            .record
            .data;
        let link = BaseLink {
            kind: EntryKind::Snapshot,
            id: sid.to_string(),
            name: rec.name.clone(),
        };
        if v.base.as_ref() != Some(&link) {
            v.base = Some(link);
            t.write_record(EntryKind::Volume, &vid, &v)
                .map_err(Error::pool(&object, OP))?;
        }
    }
    rec.pending = false;
    t.write_record(EntryKind::Snapshot, sid, &rec)
        .map_err(Error::pool(&object, OP))
}

/// Rebases dependent `kind/id` of snapshot `s` onto `s`'s own base: builds
/// a replacement image holding every cluster where the dependent's view
/// differs from the new base's, moves it in as [`MERGED_IMAGE`], then
/// [`finish_merge`] swaps it in.
fn rebase(
    t: &mut PoolTxn<'_>,
    pool: &str,
    s: &Found<SnapshotRecord>,
    kind: EntryKind,
    id: &str,
) -> Result<()> {
    const OP: &str = "merge snapshot into dependent";
    let object = format!("pool {pool} {kind} {id}");
    let dep = entry_image(t, kind, id, DATA_IMAGE, &object, OP)?;
    let size = t
        .image_summary(&dep)
        .map_err(Error::pool(&object, OP))?
        .virtual_size
        .unwrap_or(s.record.size);
    let new_base = match &s.record.base {
        Some(b) => {
            let f = match b.kind {
                EntryKind::Template => {
                    find::<crate::TemplateRecord>(t, pool, &b.id, OP)?
                        .record
                        .format
                }
                _ => find::<SnapshotRecord>(t, pool, &b.id, OP)?.record.format,
            };
            Some(data_ref(b.kind, &b.id, f))
        }
        None => None,
    };
    // Until the old image goes, the entry holds both.
    let _r = reserve_split(t, &object, OP, size, 0)?;
    let st = t.stage().map_err(Error::pool(&object, OP))?;
    let img = match &new_base {
        Some(b) => st.create_linked(DATA_IMAGE, b, Some(size)),
        None => st.create_image(
            DATA_IMAGE,
            &ImageSpec {
                size,
                format: dep.format,
                prealloc: Prealloc::Off,
            },
            &Control::new(),
        ),
    }
    .map_err(Error::pool(&object, OP))?;
    {
        let from = t
            .open_image(&dep, false)
            .map_err(Error::pool(&object, OP))?;
        let base = match &new_base {
            Some(b) => Some(t.open_image(b, false).map_err(Error::pool(&object, OP))?),
            None => None,
        };
        let to = st
            .open_image(&img, true)
            .map_err(Error::pool(&object, OP))?;
        const CHUNK: u64 = 64 << 10;
        let mut a = vec![0u8; CHUNK as usize];
        let mut b = vec![0u8; CHUNK as usize];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(CHUNK) as usize;
            let (a, b) = (&mut a[..n], &mut b[..n]);
            from.read_at(a, off).map_err(Error::image(&object, OP))?;
            b.fill(0);
            if let Some(base) = &base {
                let bs = base.size();
                if off < bs {
                    let m = ((bs - off) as usize).min(n);
                    base.read_at(&mut b[..m], off)
                        .map_err(Error::image(&object, OP))?;
                }
            }
            if a != b {
                to.write_at(a, off).map_err(Error::image(&object, OP))?;
            }
            off += n as u64;
        }
        to.flush().map_err(Error::image(&object, OP))?;
    }
    t.move_image(&img, kind, id, MERGED_IMAGE)
        .map_err(Error::pool(&object, OP))?;
    drop(st);
    finish_merge(t, pool, kind, id, s.record.base.clone())
}

/// Entry `kind/id`'s image `name`, in whatever format it is stored.
fn entry_image(
    t: &mut PoolTxn<'_>,
    kind: EntryKind,
    id: &str,
    name: &str,
    object: &str,
    op: &'static str,
) -> Result<ImageRef> {
    t.get::<serde_json::Value>(kind, id)
        .map_err(Error::pool(object, op))?
        .images
        .into_iter()
        .find(|i| i.image.name == name)
        .map(|i| i.image)
        .ok_or_else(|| Error::NotFound {
            object: format!("{object} image {name}"),
            op,
        })
}

/// Swaps a dependent's [`MERGED_IMAGE`] in for its data image and points
/// its record at `new_base` (also run by recovery).
pub(crate) fn finish_merge(
    t: &mut PoolTxn<'_>,
    pool: &str,
    kind: EntryKind,
    id: &str,
    new_base: Option<BaseLink>,
) -> Result<()> {
    const OP: &str = "merge snapshot into dependent";
    let object = format!("pool {pool} {kind} {id}");
    let e = t
        .get::<serde_json::Value>(kind, id)
        .map_err(Error::pool(&object, OP))?;
    let Some(merged) = merged_image(&e.images) else {
        return Ok(());
    };
    // Record first: from here on the merged image is the one that counts.
    match kind {
        EntryKind::Volume => {
            let mut r = t
                .get::<VolumeRecord>(kind, id)
                .map_err(Error::pool(&object, OP))?
                .record
                .data;
            r.base = new_base;
            r.format = merged.format;
            t.write_record(kind, id, &r)
                .map_err(Error::pool(&object, OP))?;
        }
        _ => {
            let mut r = t
                .get::<SnapshotRecord>(kind, id)
                .map_err(Error::pool(&object, OP))?
                .record
                .data;
            r.base = new_base;
            r.format = merged.format;
            t.write_record(kind, id, &r)
                .map_err(Error::pool(&object, OP))?;
        }
    }
    if let Some(data) = e.images.iter().find(|i| i.image.name == DATA_IMAGE) {
        t.remove_image(&data.image)
            .map_err(Error::pool(&object, OP))?;
    }
    t.move_image(&merged, kind, id, DATA_IMAGE)
        .map_err(Error::pool(&object, OP))?;
    Ok(())
}
