//! The [`Volumes`] handle: opening pools, finding entries by name or UUID,
//! and the helpers every operation shares.

use std::collections::HashMap;
use std::sync::Mutex;

use vmvol_format::{BlockIo, Format};
use vmvol_pool::{
    EntryKind, ImageRef, Listed, Pool, PoolTxn, RecordType, Registry, Wait, DATA_IMAGE,
};

use crate::error::{Error, Result};
use crate::record::{BaseLink, SnapshotRecord, TemplateRecord, VolumeRecord};

/// Records that carry a name (every kind this crate stores).
pub(crate) trait Named: RecordType + Clone + Send + Sync + 'static {
    /// The kind of entry holding it.
    const KIND: EntryKind;
    /// Its name.
    fn name(&self) -> &str;
    /// Its image format.
    fn format(&self) -> Format;
}

impl Named for VolumeRecord {
    const KIND: EntryKind = EntryKind::Volume;
    fn name(&self) -> &str {
        &self.name
    }
    fn format(&self) -> Format {
        self.format
    }
}

impl Named for TemplateRecord {
    const KIND: EntryKind = EntryKind::Template;
    fn name(&self) -> &str {
        &self.name
    }
    fn format(&self) -> Format {
        self.format
    }
}

impl Named for SnapshotRecord {
    const KIND: EntryKind = EntryKind::Snapshot;
    fn name(&self) -> &str {
        &self.name
    }
    fn format(&self) -> Format {
        self.format
    }
}

/// A record with where it lives.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Found<T> {
    /// The pool.
    pub pool: String,
    /// The UUID (pool entry id).
    pub id: String,
    /// The record.
    pub record: T,
}

/// One row of a template or snapshot listing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Row<T> {
    /// A readable entry.
    Ok(Found<T>),
    /// An entry whose record is unusable (never hidden).
    Damaged {
        /// Its UUID (entry id).
        uuid: String,
        /// Why.
        reason: String,
    },
}

/// A listing of templates or snapshots.
pub type Rows<T> = Vec<Row<T>>;

/// Sorts rows by name, damaged ones last.
pub(crate) fn sort_rows<T: Named>(rows: &mut Rows<T>) {
    rows.sort_by(|a, b| match (a, b) {
        (Row::Ok(a), Row::Ok(b)) => a.record.name().cmp(b.record.name()),
        (Row::Ok(_), Row::Damaged { .. }) => std::cmp::Ordering::Less,
        (Row::Damaged { .. }, Row::Ok(_)) => std::cmp::Ordering::Greater,
        (Row::Damaged { uuid: a, .. }, Row::Damaged { uuid: b, .. }) => a.cmp(b),
    });
}

/// Entry point of the volume layer: volumes, templates and snapshots in the
/// pools of one [`Registry`]. `Send + Sync`; threads may share one handle.
#[derive(Debug)]
pub struct Volumes {
    pub(crate) registry: Registry,
    pub(crate) wait: Wait,
    pools: Mutex<HashMap<String, Pool>>,
    /// Whether this handle has looked for crashed instance attaches and
    /// detaches yet (done once, when it first opens a pool).
    instances_recovered: std::sync::atomic::AtomicBool,
    /// (pool, kind, name) → UUID, a hint only: every use re-reads the
    /// record and checks the name, falling back to a scan.
    names: Mutex<HashMap<(String, EntryKind, String), String>>,
}

/// `pool P kind NAME`, the object named in messages.
pub(crate) fn obj(pool: &str, kind: EntryKind, name: &str) -> String {
    format!("pool {pool} {kind} {name}")
}

/// The main image of entry `kind/id`.
pub(crate) fn data_ref(kind: EntryKind, id: &str, format: Format) -> ImageRef {
    ImageRef::entry(kind, id, DATA_IMAGE, format)
}

/// Size rule shared by create and resize: positive, a multiple of 512.
pub(crate) fn check_size(object: &str, op: &'static str, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(Error::invalid(
            object,
            op,
            format!("size {size} must be a positive multiple of 512 bytes"),
        ));
    }
    Ok(())
}

impl Volumes {
    /// A handle over `registry`; pool locks wait as long as needed.
    pub fn new(registry: Registry) -> Volumes {
        Volumes::with_wait(registry, Wait::Block)
    }

    /// A handle whose pool locks follow `wait`.
    pub fn with_wait(registry: Registry, wait: Wait) -> Volumes {
        Volumes {
            registry,
            wait,
            pools: Mutex::new(HashMap::new()),
            instances_recovered: std::sync::atomic::AtomicBool::new(false),
            names: Mutex::new(HashMap::new()),
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Opens pool `name` (once per handle), finishing any volume operation
    /// a crash interrupted.
    pub fn pool(&self, name: &str) -> Result<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pools.get(name) {
            return Ok(p.clone());
        }
        let object = format!("pool {name}");
        let pool = self
            .registry
            .open_pool(name, self.wait)
            .map_err(|e| match e {
                vmvol_pool::Error::PoolNotFound { .. } => Error::NotFound {
                    object: object.clone(),
                    op: "open pool",
                },
                e => Error::Pool {
                    object: object.clone(),
                    op: "open pool",
                    source: Box::new(e),
                },
            })?;
        if pool
            .config()
            .map_err(Error::pool(&object, "open pool"))?
            .state
            == vmvol_pool::PoolState::Active
        {
            crate::recover::recover(&pool, name)?;
        }
        pools.insert(name.to_string(), pool.clone());
        drop(pools);
        // A crashed instance attach leaves attachments that would refuse
        // deletes and resizes: finish it before the first use of any pool.
        if !self
            .instances_recovered
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.recover_instances()?;
        }
        Ok(pool)
    }

    /// Forgets cached pool handles (the next call reopens and recovers).
    pub fn forget_pools(&self) {
        self.pools.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.instances_recovered
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// [`find`], first trying the UUID this handle last found for the name
    /// (one record read instead of a scan of every record).
    pub(crate) fn lookup<T: Named>(
        &self,
        t: &mut PoolTxn<'_>,
        pool: &str,
        key: &str,
        op: &'static str,
    ) -> Result<Found<T>> {
        let k = (pool.to_string(), T::KIND, key.to_string());
        let hint = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&k)
            .cloned();
        if let Some(id) = hint {
            if let Ok(e) = t.get::<T>(T::KIND, &id) {
                if e.record.data.name() == key {
                    return Ok(Found {
                        pool: pool.to_string(),
                        id: e.id,
                        record: e.record.data,
                    });
                }
            }
        }
        let f = find::<T>(t, pool, key, op)?;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, f.id.clone());
        Ok(f)
    }

    /// Names of every pool with a readable configuration.
    pub(crate) fn pool_names(&self) -> Result<Vec<String>> {
        Ok(self
            .registry
            .list()
            .map_err(Error::pool("registry", "list pools"))?
            .into_iter()
            .filter_map(|l| match l {
                vmvol_pool::PoolListing::Ok(c) => Some(c.name),
                vmvol_pool::PoolListing::Damaged { .. } => None,
            })
            .collect())
    }
}

/// Finds entry `kind` by name or UUID inside a transaction.
pub(crate) fn find<T: Named>(
    t: &mut PoolTxn<'_>,
    pool: &str,
    key: &str,
    op: &'static str,
) -> Result<Found<T>> {
    let object = obj(pool, T::KIND, key);
    if t.contains(T::KIND, key).map_err(Error::pool(&object, op))? {
        let e = t.get::<T>(T::KIND, key).map_err(|e| match e {
            vmvol_pool::Error::Damaged { reason, .. } => Error::Corrupt {
                object: object.clone(),
                op,
                reason,
            },
            e => Error::Pool {
                object: object.clone(),
                op,
                source: Box::new(e),
            },
        })?;
        return Ok(Found {
            pool: pool.to_string(),
            id: e.id,
            record: e.record.data,
        });
    }
    let rows = t
        .list::<T>(T::KIND, |_, r| r.name() == key)
        .map_err(Error::pool(&object, op))?;
    rows.into_iter()
        .find_map(|l| match l {
            Listed::Ok(e) => Some(Found {
                pool: pool.to_string(),
                id: e.id,
                record: e.record.data,
            }),
            Listed::Damaged(_) => None,
        })
        .ok_or(Error::NotFound { object, op })
}

/// Refuses when `name` is taken among the pool's entries of `T`'s kind.
pub(crate) fn require_free<T: Named>(
    t: &mut PoolTxn<'_>,
    pool: &str,
    name: &str,
    op: &'static str,
) -> Result<()> {
    let object = obj(pool, T::KIND, name);
    let taken = t
        .list::<T>(T::KIND, |_, r| r.name() == name)
        .map_err(Error::pool(&object, op))?
        .iter()
        .any(|l| matches!(l, Listed::Ok(_)));
    if taken {
        return Err(Error::AlreadyExists { object, op });
    }
    Ok(())
}

/// Everything in the pool linked to `base` (`volume NAME`, `snapshot NAME`).
pub(crate) fn dependents(
    t: &mut PoolTxn<'_>,
    pool: &str,
    kind: EntryKind,
    id: &str,
    op: &'static str,
) -> Result<Vec<(EntryKind, String, String)>> {
    let object = format!("pool {pool}");
    let is = |b: &Option<BaseLink>| b.as_ref().is_some_and(|b| b.kind == kind && b.id == id);
    let mut out = Vec::new();
    for l in t
        .list::<VolumeRecord>(EntryKind::Volume, |_, r| is(&r.base))
        .map_err(Error::pool(&object, op))?
    {
        if let Listed::Ok(e) = l {
            out.push((EntryKind::Volume, e.id, e.record.data.name));
        }
    }
    for l in t
        .list::<SnapshotRecord>(EntryKind::Snapshot, |_, r| is(&r.base))
        .map_err(Error::pool(&object, op))?
    {
        if let Listed::Ok(e) = l {
            out.push((EntryKind::Snapshot, e.id, e.record.data.name));
        }
    }
    Ok(out)
}

/// Host bytes a full copy of entry `kind/id` may write: its image's plus
/// those of every image down its chain of bases (a flattened copy holds
/// at most all of them), capped by the caller at the virtual size.
pub(crate) fn chain_host_bytes(t: &mut PoolTxn<'_>, kind: EntryKind, id: &str) -> u64 {
    let mut total = 0u64;
    let mut next = Some((kind, id.to_string()));
    for _ in 0..64 {
        let Some((k, i)) = next.take() else { break };
        let Ok(e) = t.get::<serde_json::Value>(k, &i) else {
            break;
        };
        total = total.saturating_add(e.image().map(|i| i.host_bytes).unwrap_or(0));
        let base = &e.record.data["base"];
        let bk = match base["kind"].as_str() {
            Some("template") => EntryKind::Template,
            Some("snapshot") => EntryKind::Snapshot,
            _ => break,
        };
        next = base["id"].as_str().map(|s| (bk, s.to_string()));
    }
    total
}

/// Copies `src` into `dst` (same size or larger), chunk by chunk, writing
/// only chunks that are not all zeros (the destination reads zeros there
/// already). Used where the pool's own `copy_full` cannot reach: across
/// pools and from image files outside any pool.
pub(crate) fn copy_data(
    src: &dyn BlockIo,
    dst: &dyn BlockIo,
    ctl: &vmvol_format::Control,
    object: &str,
    op: &'static str,
) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let size = src.size().min(dst.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        if ctl.is_cancelled() {
            return Err(cancelled(object, op));
        }
        let n = (size - off).min(CHUNK);
        let b = buf
            .get_mut(..n as usize)
            .ok_or_else(|| cancelled(object, op))?;
        if !src.known_zero(off, n).map_err(Error::image(object, op))? {
            src.read_at(b, off).map_err(Error::image(object, op))?;
            if b.iter().any(|&x| x != 0) {
                dst.write_at(b, off).map_err(Error::image(object, op))?;
            }
        }
        off += n;
        ctl.report(off, size);
    }
    dst.flush().map_err(Error::image(object, op))
}

pub(crate) fn cancelled(object: &str, op: &'static str) -> Error {
    Error::Cancelled {
        object: object.to_string(),
        op,
    }
}
