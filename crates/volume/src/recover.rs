//! Finishing volume operations a crash interrupted (run when a pool is
//! first opened by a [`Volumes`](crate::Volumes) handle). Every multi-step
//! operation is rolled forward from the state its steps left.

use vmvol_pool::{EntryKind, ImageOwner, Listed, Pool};

use crate::error::{Error, Result};
use crate::record::{BaseLink, SnapshotRecord, TemplateRecord, VolumeRecord};
use crate::snapshot::{finish_merge, finish_snapshot, merged_image};

/// Runs recovery on `pool` (named `name`) under its exclusive lock.
pub(crate) fn recover(pool: &Pool, name: &str) -> Result<()> {
    const OP: &str = "recover volume operations";
    let object = format!("pool {name}");
    pool.transaction(OP, |t| {
        Ok((|| {
            // Pending snapshots: finish them.
            for l in t
                .list::<SnapshotRecord>(EntryKind::Snapshot, |_, r| r.pending)
                .map_err(Error::pool(&object, OP))?
            {
                if let Listed::Ok(e) = l {
                    finish_snapshot(t, name, &e.id, e.record.data)?;
                }
            }
            // Interrupted merges: swap the merged image in.
            for kind in [EntryKind::Volume, EntryKind::Snapshot] {
                let rows = t
                    .list::<serde_json::Value>(kind, |_, _| true)
                    .map_err(Error::pool(&object, OP))?;
                for l in rows {
                    let Listed::Ok(e) = l else { continue };
                    let Some(merged) = merged_image(&e.images) else {
                        continue;
                    };
                    let backing = t
                        .image_summary(&merged)
                        .map_err(Error::pool(&object, OP))?
                        .backing;
                    let base = match backing.map(|b| b.owner) {
                        Some(ImageOwner::Entry { kind: bk, id: bid }) => {
                            let bname = match bk {
                                EntryKind::Template => t
                                    .get::<TemplateRecord>(bk, &bid)
                                    .map(|e| e.record.data.name),
                                _ => t
                                    .get::<SnapshotRecord>(bk, &bid)
                                    .map(|e| e.record.data.name),
                            }
                            .map_err(Error::pool(&object, OP))?;
                            Some(BaseLink {
                                kind: bk,
                                id: bid,
                                name: bname,
                            })
                        }
                        _ => None,
                    };
                    finish_merge(t, name, kind, &e.id, base)?;
                }
            }
            // A grow whose record write was cut: the image is the truth.
            for l in t
                .list::<VolumeRecord>(EntryKind::Volume, |_, _| true)
                .map_err(Error::pool(&object, OP))?
            {
                let Listed::Ok(e) = l else { continue };
                if let Some(v) = e.image().and_then(|i| i.virtual_size) {
                    if v > e.record.data.size && e.record.data.attachments.is_empty() {
                        let mut r = e.record.data;
                        r.size = v;
                        t.write_record(EntryKind::Volume, &e.id, &r)
                            .map_err(Error::pool(&object, OP))?;
                    }
                }
            }
            Ok(())
        })())
    })
    .map_err(Error::pool(&object, OP))?
}
