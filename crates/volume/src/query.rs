//! Reading volumes: list with filters, describe.

use serde::{Deserialize, Serialize};
use vmvol_format::Format;
use vmvol_pool::{AttachTarget, EntryKind, Listed};

use crate::error::{Error, Result};
use crate::record::{
    Attachment, BaseLink, Provenance, SnapshotRecord, TemplateRecord, VolumeRecord,
};
use crate::volumes::{data_ref, find, obj, Volumes};

/// Which volumes [`Volumes::list_volumes`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilter {
    /// Only this pool (default: every pool).
    pub pool: Option<String>,
    /// `Some(true)`: attached only; `Some(false)`: available only.
    pub attached: Option<bool>,
    /// Only this format.
    pub format: Option<Format>,
    /// Case-insensitive substring of the name.
    pub name: Option<String>,
    /// Sort order.
    pub sort: SortKey,
}

/// Sort order of a listing (ties broken by pool, then name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortKey {
    /// By name.
    #[default]
    Name,
    /// By creation time.
    Created,
    /// By virtual size.
    Size,
    /// By pool.
    Pool,
}

/// One row of a volume listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum VolumeRow {
    /// A readable volume.
    Ok {
        /// Pool.
        pool: String,
        /// UUID.
        uuid: String,
        /// Name.
        name: String,
        /// Format.
        format: Format,
        /// Virtual size.
        capacity: u64,
        /// Host bytes of its own image.
        allocation: u64,
        /// Attached instances.
        attached_to: Vec<String>,
        /// Creation time.
        created: String,
        /// What it is linked to.
        base: Option<BaseLink>,
    },
    /// A volume whose record is unusable, never hidden.
    Damaged {
        /// Pool.
        pool: String,
        /// UUID (entry id).
        uuid: String,
        /// Why.
        reason: String,
    },
}

impl VolumeRow {
    fn key(&self) -> (&str, &str) {
        match self {
            VolumeRow::Ok { pool, name, .. } => (pool, name),
            VolumeRow::Damaged { pool, uuid, .. } => (pool, uuid),
        }
    }
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// `template` or `snapshot`.
    pub kind: EntryKind,
    /// Its name.
    pub name: String,
    /// Its format.
    pub format: Format,
}

/// Filesystem figures of an ext4 volume (read-only, our own reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsUsage {
    /// Bytes the filesystem spans.
    pub size: u64,
    /// Bytes in use.
    pub used: u64,
    /// Bytes free.
    pub free: u64,
}

/// Everything about one volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeDescription {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Pool.
    pub pool: String,
    /// What a VMM opens.
    pub path: AttachTarget,
    /// Format.
    pub format: Format,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Host bytes its own image occupies.
    pub allocation: u64,
    /// Backing chain, nearest first.
    pub backing: Vec<ChainLink>,
    /// Attachments.
    pub attachments: Vec<Attachment>,
    /// Provenance.
    pub provenance: Provenance,
    /// Creation time.
    pub created: String,
    /// ext4 usage, for volumes born ext4 whose filesystem reads.
    pub filesystem: Option<FsUsage>,
}

impl Volumes {
    /// Volumes matching `filter`, sorted; damaged records are listed
    /// (with their reason) whatever the filter.
    pub fn list_volumes(&self, filter: &ListFilter) -> Result<Vec<VolumeRow>> {
        let pools = match &filter.pool {
            Some(p) => vec![p.clone()],
            None => self.pool_names()?,
        };
        let needle = filter.name.as_ref().map(|n| n.to_lowercase());
        let mut rows = Vec::new();
        for pname in pools {
            let p = match (self.pool(&pname), &filter.pool) {
                (Ok(p), _) => p,
                (Err(e), Some(_)) => return Err(e),
                // All pools: an inactive or broken pool is skipped.
                (Err(_), None) => continue,
            };
            let listed = p.list::<VolumeRecord>(EntryKind::Volume, |_, r| {
                filter.format.is_none_or(|f| f == r.format)
                    && filter
                        .attached
                        .is_none_or(|a| a != r.attachments.is_empty())
                    && needle
                        .as_ref()
                        .is_none_or(|n| contains_ignore_case(&r.name, n))
            });
            let listed = match (listed, &filter.pool) {
                (Ok(l), _) => l,
                (Err(e), Some(_)) => {
                    return Err(Error::Pool {
                        object: format!("pool {pname}"),
                        op: "list volumes",
                        source: Box::new(e),
                    })
                }
                (Err(_), None) => continue,
            };
            for l in listed {
                rows.push(match l {
                    Listed::Ok(e) => VolumeRow::Ok {
                        pool: pname.clone(),
                        allocation: e.image().map(|i| i.host_bytes).unwrap_or(0),
                        uuid: e.id,
                        name: e.record.data.name,
                        format: e.record.data.format,
                        capacity: e.record.data.size,
                        attached_to: e
                            .record
                            .data
                            .attachments
                            .into_iter()
                            .map(|a| a.instance)
                            .collect(),
                        created: e.record.data.created,
                        base: e.record.data.base,
                    },
                    Listed::Damaged(d) => VolumeRow::Damaged {
                        pool: pname.clone(),
                        uuid: d.id,
                        reason: d.reason,
                    },
                });
            }
        }
        rows.sort_by(|a, b| {
            let primary = match (filter.sort, a, b) {
                (
                    SortKey::Created,
                    VolumeRow::Ok { created: x, .. },
                    VolumeRow::Ok { created: y, .. },
                ) => x.cmp(y),
                (
                    SortKey::Size,
                    VolumeRow::Ok { capacity: x, .. },
                    VolumeRow::Ok { capacity: y, .. },
                ) => x.cmp(y),
                (SortKey::Name, VolumeRow::Ok { name: x, .. }, VolumeRow::Ok { name: y, .. }) => {
                    x.cmp(y)
                }
                _ => std::cmp::Ordering::Equal,
            };
            primary.then_with(|| a.key().cmp(&b.key()))
        });
        Ok(rows)
    }

    /// Describes volume `name` (or UUID) of `pool`.
    pub fn describe_volume(&self, pool: &str, name: &str) -> Result<VolumeDescription> {
        const OP: &str = "describe volume";
        let object = obj(pool, EntryKind::Volume, name);
        let p = self.pool(pool)?;
        let (v, allocation, backing, path) = p
            .transaction(OP, |t| {
                Ok((|| {
                    let v = self.lookup::<VolumeRecord>(t, pool, name, OP)?;
                    let e = t
                        .get::<VolumeRecord>(EntryKind::Volume, &v.id)
                        .map_err(Error::pool(&object, OP))?;
                    let allocation = e.image().map(|i| i.host_bytes).unwrap_or(0);
                    let mut backing = Vec::new();
                    let mut next = v.record.base.clone();
                    while let Some(b) = next.take() {
                        if backing.len() > 64 {
                            break;
                        }
                        match b.kind {
                            EntryKind::Template => {
                                let r = find::<TemplateRecord>(t, pool, &b.id, OP)?;
                                backing.push(ChainLink {
                                    kind: b.kind,
                                    name: r.record.name,
                                    format: r.record.format,
                                });
                            }
                            _ => {
                                let r = find::<SnapshotRecord>(t, pool, &b.id, OP)?;
                                backing.push(ChainLink {
                                    kind: b.kind,
                                    name: r.record.name,
                                    format: r.record.format,
                                });
                                next = r.record.base;
                            }
                        }
                    }
                    let path = t
                        .attach_target(&data_ref(EntryKind::Volume, &v.id, v.record.format))
                        .map_err(Error::pool(&object, OP))?;
                    Ok((v, allocation, backing, path))
                })())
            })
            .map_err(Error::pool(&object, OP))??;
        let filesystem = if v.record.ext4 {
            p.open_image(&data_ref(EntryKind::Volume, &v.id, v.record.format), false)
                .ok()
                .and_then(|dev| vmvol_fs::free_map(&*dev).ok())
                .map(|m| FsUsage {
                    size: m.fs_bytes,
                    used: m.fs_bytes.saturating_sub(m.free_bytes),
                    free: m.free_bytes,
                })
        } else {
            None
        };
        Ok(VolumeDescription {
            name: v.record.name,
            uuid: v.id,
            pool: pool.to_string(),
            path,
            format: v.record.format,
            capacity: v.record.size,
            allocation,
            backing,
            attachments: v.record.attachments,
            provenance: v.record.provenance,
            created: v.record.created,
            filesystem,
        })
    }
}

/// Whether `hay` contains `needle` (already lower case), ignoring ASCII
/// case: names are ASCII by rule, and a listing of 10,000 volumes should
/// not allocate a lower-cased copy of each.
fn contains_ignore_case(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.is_empty()
        || h.windows(n.len())
            .any(|w| w.iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b))
}
