//! Creating volumes: blank, from an archive, from a template or snapshot.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmvol_format::{Control, Format, Prealloc};
use vmvol_pool::{EntryKind, ImageSpec, PoolTxn, Reservation, Staging, DATA_IMAGE};

use crate::error::{Error, Result};
use crate::record::{now_rfc3339, validate_name, BaseLink, LinkMode, Provenance, VolumeRecord};
use crate::volumes::{
    chain_host_bytes, check_size, data_ref, find, obj, require_free, Found, Named, Volumes,
};
use crate::{SnapshotRecord, TemplateRecord};

/// What a new volume is made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VolumeSource {
    /// Empty.
    Blank {
        /// raw or qcow2.
        format: Format,
        /// Host space reservation of a raw volume.
        prealloc: Prealloc,
        /// Born ext4-formatted.
        ext4: bool,
    },
    /// An ext4 qcow2 volume holding a tar (or tar.gz) archive's tree.
    Archive {
        /// The archive file.
        path: PathBuf,
    },
    /// From a template of the same pool.
    Template {
        /// Template name or UUID.
        name: String,
        /// Linked overlay (default) or full copy.
        mode: LinkMode,
    },
    /// From a snapshot of the same pool (restore).
    Snapshot {
        /// Snapshot name or UUID.
        name: String,
        /// Linked overlay (default) or full copy.
        mode: LinkMode,
    },
}

/// A volume to create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// Its name.
    pub name: String,
    /// Virtual size in bytes; required for blank volumes, else derived
    /// (archive: content plus headroom; template/snapshot: its size).
    pub size: Option<u64>,
    /// What it is made from.
    pub source: VolumeSource,
}

const OP: &str = "create volume";

/// Reserves `virt` bytes of which `phys` are really written.
pub(crate) fn reserve_split(
    t: &mut PoolTxn<'_>,
    object: &str,
    op: &'static str,
    virt: u64,
    phys: u64,
) -> Result<Vec<Reservation>> {
    let phys = phys.min(virt);
    let mut out = Vec::new();
    if phys > 0 {
        out.push(
            t.reserve_physical(phys, object)
                .map_err(Error::pool(object, op))?,
        );
    }
    if virt > phys {
        out.push(
            t.reserve(virt - phys, object)
                .map_err(Error::pool(object, op))?,
        );
    }
    Ok(out)
}

/// Commits `staging` as a new `T` entry unless the name was taken
/// meanwhile (then the staging area is dropped, i.e. removed).
pub(crate) fn commit_new<T: Named + Clone>(
    vols: &Volumes,
    pool: &str,
    staging: Staging,
    record: &T,
    op: &'static str,
) -> Result<Found<T>> {
    commit_new_as(vols, pool, None, staging, record, op)
}

/// [`commit_new`] under the UUID `id` when given (else a new one).
pub(crate) fn commit_new_as<T: Named + Clone>(
    vols: &Volumes,
    pool: &str,
    id: Option<&str>,
    staging: Staging,
    record: &T,
    op: &'static str,
) -> Result<Found<T>> {
    let p = vols.pool(pool)?;
    let object = obj(pool, T::KIND, record.name());
    let id = id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    p.transaction(op, |t| {
        Ok(
            require_free::<T>(t, pool, record.name(), op).and_then(|()| {
                t.commit(staging, T::KIND, &id, record)
                    .map_err(Error::pool(&object, op))
            }),
        )
    })
    .map_err(Error::pool(&object, op))??;
    Ok(Found {
        pool: pool.to_string(),
        id,
        record: record.clone(),
    })
}

impl Volumes {
    /// Creates a volume. Space is reserved before any byte is written; the
    /// image is built in a staging area and committed atomically, so a
    /// failure, cancel or crash leaves no trace. Linked creates are O(1).
    pub fn create_volume(
        &self,
        pool: &str,
        req: &CreateVolume,
        ctl: &Control,
    ) -> Result<Found<VolumeRecord>> {
        self.create_volume_with(pool, None, req, ctl)
    }

    /// [`Volumes::create_volume`] under a UUID the caller chose (the seed
    /// system's `POST /volumes` takes an optional `id`): 1–63 of
    /// `a-z 0-9 . _ -`, not starting with `.`; an id in use is refused as
    /// already existing.
    pub fn create_volume_as(
        &self,
        pool: &str,
        id: &str,
        req: &CreateVolume,
        ctl: &Control,
    ) -> Result<Found<VolumeRecord>> {
        let object = obj(pool, EntryKind::Volume, &req.name);
        vmvol_pool::validate_name(id)
            .map_err(|e| Error::invalid(&object, OP, format!("id {id:?}: {e}")))?;
        self.create_volume_with(pool, Some(id), req, ctl)
    }

    fn create_volume_with(
        &self,
        pool: &str,
        id: Option<&str>,
        req: &CreateVolume,
        ctl: &Control,
    ) -> Result<Found<VolumeRecord>> {
        validate_name("volume", OP, &req.name)?;
        let object = obj(pool, EntryKind::Volume, &req.name);
        if let Some(s) = req.size {
            check_size(&object, OP, s)?;
        }
        let p = self.pool(pool)?;
        match &req.source {
            VolumeSource::Blank {
                format,
                prealloc,
                ext4,
            } => {
                let size = req
                    .size
                    .ok_or_else(|| Error::invalid(&object, OP, "a blank volume needs a size"))?;
                if *format == Format::Qcow2 && *prealloc != Prealloc::Off {
                    return Err(Error::invalid(
                        &object,
                        OP,
                        "preallocation applies to raw volumes only (qcow2 volumes are thin)",
                    ));
                }
                let spec = ImageSpec {
                    size,
                    format: *format,
                    prealloc: *prealloc,
                };
                let phys = if spec.is_physical() { size } else { 0 };
                let (_res, staging) = p
                    .transaction(OP, |t| {
                        Ok(
                            require_free::<VolumeRecord>(t, pool, &req.name, OP).and_then(|()| {
                                let r = reserve_split(t, &object, OP, size, phys)?;
                                let s = t.stage().map_err(Error::pool(&object, OP))?;
                                Ok((r, s))
                            }),
                        )
                    })
                    .map_err(Error::pool(&object, OP))??;
                let img = staging
                    .create_image(DATA_IMAGE, &spec, ctl)
                    .map_err(Error::pool(&object, OP))?;
                if *ext4 {
                    let dev = staging
                        .open_image(&img, true)
                        .map_err(Error::pool(&object, OP))?;
                    let opts = vmvol_fs::MkfsOptions {
                        label: label_of(&req.name),
                        ..vmvol_fs::MkfsOptions::default()
                    };
                    vmvol_fs::mkfs_with_control(&*dev, &opts, ctl)
                        .map_err(Error::fs(&object, "format volume as ext4"))?;
                    dev.flush().map_err(Error::image(&object, OP))?;
                }
                let rec = VolumeRecord {
                    name: req.name.clone(),
                    created: now_rfc3339(),
                    // What the pool made (RBD: raw whatever was asked).
                    format: img.format,
                    size,
                    prealloc: *prealloc,
                    ext4: *ext4,
                    provenance: Provenance::Blank,
                    base: None,
                    attachments: Vec::new(),
                };
                commit_new_as(self, pool, id, staging, &rec, OP)
            }
            VolumeSource::Archive { path } => {
                let popts = vmvol_fs::PopulateOptions {
                    mkfs: vmvol_fs::MkfsOptions {
                        label: label_of(&req.name),
                        ..vmvol_fs::MkfsOptions::default()
                    },
                    ..vmvol_fs::PopulateOptions::default()
                };
                let size = match req.size {
                    Some(s) => s,
                    None => vmvol_fs::required_size(&vmvol_fs::Source::Tar(path.clone()), &popts)
                        .map_err(Error::fs(&object, "size archive content"))?,
                };
                let file = std::fs::File::open(path).map_err(|e| Error::Io {
                    object: object.clone(),
                    op: "open archive",
                    source: e,
                })?;
                let (_res, staging) = p
                    .transaction(OP, |t| {
                        Ok(
                            require_free::<VolumeRecord>(t, pool, &req.name, OP).and_then(|()| {
                                let r = reserve_split(t, &object, OP, size, 0)?;
                                let s = t.stage().map_err(Error::pool(&object, OP))?;
                                Ok((r, s))
                            }),
                        )
                    })
                    .map_err(Error::pool(&object, OP))??;
                let spec = ImageSpec {
                    size,
                    format: Format::Qcow2,
                    prealloc: Prealloc::Off,
                };
                let img = staging
                    .create_image(DATA_IMAGE, &spec, ctl)
                    .map_err(Error::pool(&object, OP))?;
                let dev = staging
                    .open_image(&img, true)
                    .map_err(Error::pool(&object, OP))?;
                vmvol_fs::populate_tar(&*dev, std::io::BufReader::new(file), &popts, ctl)
                    .map_err(Error::fs(&object, "populate volume from archive"))?;
                dev.flush().map_err(Error::image(&object, OP))?;
                drop(dev);
                let rec = VolumeRecord {
                    name: req.name.clone(),
                    created: now_rfc3339(),
                    format: img.format,
                    size,
                    prealloc: Prealloc::Off,
                    ext4: true,
                    provenance: Provenance::Archive {
                        source: path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    },
                    base: None,
                    attachments: Vec::new(),
                };
                commit_new_as(self, pool, id, staging, &rec, OP)
            }
            VolumeSource::Template { name, mode } => {
                self.create_from::<TemplateRecord>(pool, id, req, name, *mode, ctl)
            }
            VolumeSource::Snapshot { name, mode } => {
                self.create_from::<SnapshotRecord>(pool, id, req, name, *mode, ctl)
            }
        }
    }

    /// Create from a template or snapshot.
    fn create_from<T: Named + Clone + BaseInfo>(
        &self,
        pool: &str,
        id: Option<&str>,
        req: &CreateVolume,
        base: &str,
        mode: LinkMode,
        ctl: &Control,
    ) -> Result<Found<VolumeRecord>> {
        let object = obj(pool, EntryKind::Volume, &req.name);
        let p = self.pool(pool)?;
        let prov = |id: &str, name: &str| match T::KIND {
            EntryKind::Snapshot => Provenance::Snapshot {
                id: id.to_string(),
                name: name.to_string(),
                mode,
            },
            _ => Provenance::Template {
                id: id.to_string(),
                name: name.to_string(),
                mode,
            },
        };
        match mode {
            LinkMode::Linked => p
                .transaction(OP, |t| {
                    Ok((|| {
                        require_free::<VolumeRecord>(t, pool, &req.name, OP)?;
                        let b = find::<T>(t, pool, base, OP)?;
                        let bsize = b.record.size();
                        let size = req.size.unwrap_or(bsize);
                        if size < bsize {
                            return Err(Error::invalid(
                                &object,
                                OP,
                                format!(
                                    "size {size} is smaller than {} {}'s {bsize} bytes",
                                    T::KIND,
                                    b.record.name()
                                ),
                            ));
                        }
                        // Made and committed under this transaction's
                        // lock: a check will do, no reservation record.
                        t.require_room(size).map_err(Error::pool(&object, OP))?;
                        let s = t.stage().map_err(Error::pool(&object, OP))?;
                        let bref = data_ref(T::KIND, &b.id, b.record.format());
                        let img = s
                            .create_linked(DATA_IMAGE, &bref, Some(size))
                            .map_err(Error::pool(&object, OP))?;
                        let rec = VolumeRecord {
                            name: req.name.clone(),
                            created: now_rfc3339(),
                            format: img.format,
                            size,
                            prealloc: Prealloc::Off,
                            ext4: b.record.ext4(),
                            provenance: prov(&b.id, b.record.name()),
                            base: Some(BaseLink {
                                kind: T::KIND,
                                id: b.id.clone(),
                                name: b.record.name().to_string(),
                            }),
                            attachments: Vec::new(),
                        };
                        let id =
                            id.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
                        t.commit(s, EntryKind::Volume, &id, &rec)
                            .map_err(Error::pool(&object, OP))?;
                        Ok(Found {
                            pool: pool.to_string(),
                            id,
                            record: rec,
                        })
                    })())
                })
                .map_err(Error::pool(&object, OP))?,
            LinkMode::Full => {
                let (b, _res, staging, size) = p
                    .transaction(OP, |t| {
                        Ok((|| {
                            require_free::<VolumeRecord>(t, pool, &req.name, OP)?;
                            let b = find::<T>(t, pool, base, OP)?;
                            let bsize = b.record.size();
                            let size = req.size.unwrap_or(bsize);
                            if size < bsize {
                                return Err(Error::invalid(
                                    &object,
                                    OP,
                                    format!("size {size} is smaller than the base's {bsize} bytes"),
                                ));
                            }
                            let phys = chain_host_bytes(t, T::KIND, &b.id);
                            let r = reserve_split(t, &object, OP, size, phys)?;
                            let s = t.stage().map_err(Error::pool(&object, OP))?;
                            Ok((b, r, s, size))
                        })())
                    })
                    .map_err(Error::pool(&object, OP))??;
                let bref = data_ref(T::KIND, &b.id, b.record.format());
                let img = staging
                    .copy_full(DATA_IMAGE, &bref, b.record.format(), ctl)
                    .map_err(Error::pool(&object, OP))?;
                if size > b.record.size() {
                    staging
                        .grow_image(&img, size)
                        .map_err(Error::pool(&object, OP))?;
                }
                let rec = VolumeRecord {
                    name: req.name.clone(),
                    created: now_rfc3339(),
                    format: img.format,
                    size,
                    prealloc: Prealloc::Off,
                    ext4: b.record.ext4(),
                    provenance: prov(&b.id, b.record.name()),
                    base: None,
                    attachments: Vec::new(),
                };
                commit_new_as(self, pool, id, staging, &rec, OP)
            }
        }
    }
}

/// What creating from a template or snapshot needs of its record.
pub(crate) trait BaseInfo {
    fn size(&self) -> u64;
    fn ext4(&self) -> bool;
}

impl BaseInfo for TemplateRecord {
    fn size(&self) -> u64 {
        self.size
    }
    fn ext4(&self) -> bool {
        self.ext4
    }
}

impl BaseInfo for SnapshotRecord {
    fn size(&self) -> u64 {
        self.size
    }
    fn ext4(&self) -> bool {
        self.ext4
    }
}

/// An ext4 label (at most 16 bytes) from a volume name.
fn label_of(name: &str) -> String {
    name.chars().take(16).collect()
}
