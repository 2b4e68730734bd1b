//! The registry of pools on one host.
//!
//! Layout of a registry root:
//! ```text
//! registry.lock             serialises define/undefine
//! registry/<name>.json      one record per pool: name, uuid, backend
//! pools/<name>/             default directory of a pool (any other may be given)
//! ```
//! One record per pool (rather than one file for all) so that a damaged
//! record shows up as that pool being damaged and never hides the others.
//! The pool's own config, including its state, lives in its `pool.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backend::PoolBackend;
use crate::error::{Error, Result};
use crate::host_records::HostRecords;
use crate::local::{write_err, LocalBackend};
use crate::lock::{lock_file, LockMode, Wait};
use crate::name::validate_name;
use crate::pool::{CapacityPolicy, Pool, PoolConfig, PoolDescription};
use crate::record::{fsync_dir, is_temp_name, write_atomic, Record, RecordType};
use crate::spec::BackendSpec;

/// The registry's record of one pool.
///
/// Schema 2 names the backend (`"backend": {"type": "local", "path": ...}`);
/// schema-1 records (a bare `"path"`) still read, as a local backend, and
/// are rewritten in the new form the next time they are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PoolRefWire")]
pub struct PoolRef {
    /// Pool name.
    pub name: String,
    /// Pool UUID (same as in its config).
    pub uuid: Uuid,
    /// Where the pool lives.
    pub backend: BackendSpec,
    /// Whether `define` created the directory (then `undefine` removes it).
    pub created_dir: bool,
}

impl RecordType for PoolRef {
    const SCHEMA_VERSION: u32 = 2;
}

/// Every schema of [`PoolRef`] as read from disk.
#[derive(Deserialize)]
struct PoolRefWire {
    name: String,
    uuid: Uuid,
    #[serde(default)]
    backend: Option<BackendSpec>,
    #[serde(default)]
    path: Option<PathBuf>,
    created_dir: bool,
}

impl TryFrom<PoolRefWire> for PoolRef {
    type Error = String;
    fn try_from(w: PoolRefWire) -> std::result::Result<PoolRef, String> {
        Ok(PoolRef {
            backend: crate::spec::backend_of(w.backend, w.path)?,
            name: w.name,
            uuid: w.uuid,
            created_dir: w.created_dir,
        })
    }
}

/// Opens the backend a record names, if this build has it.
pub(crate) fn open_backend(name: &str, spec: &BackendSpec) -> Result<Arc<dyn PoolBackend>> {
    match spec {
        BackendSpec::Local { path } => Ok(Arc::new(LocalBackend::open(path)?)),
        other => match crate::provider::provider(other.type_name()) {
            Some(p) => p.open(other),
            None => Err(Error::BackendNotBuiltIn {
                pool: name.to_string(),
                backend: other.type_name(),
            }),
        },
    }
}

/// What `define` needs besides the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// The pool's directory; default `<root>/pools/<name>`. It must not
    /// exist, or be an empty directory.
    pub path: Option<PathBuf>,
    /// Capacity policy.
    pub capacity: CapacityPolicy,
    /// Overcommit ratio for thin provisioning (finite, > 0, ≤ 1000; 1.0 = none).
    pub overcommit_ratio: f64,
}

impl Default for PoolSpec {
    fn default() -> PoolSpec {
        PoolSpec {
            path: None,
            capacity: CapacityPolicy::Filesystem,
            overcommit_ratio: 1.0,
        }
    }
}

/// One row of [`Registry::list`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum PoolListing {
    /// A pool whose records are readable.
    Ok(PoolConfig),
    /// A pool whose registry record or `pool.json` is unusable.
    Damaged {
        /// The pool name (from the record's file name).
        name: String,
        /// The unusable file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The pools defined on this host, rooted in one directory.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

fn validate_spec(name: &str, spec: &PoolSpec) -> Result<()> {
    validate_policy(name, spec.capacity, spec.overcommit_ratio)
}

fn validate_policy(name: &str, capacity: CapacityPolicy, ratio: f64) -> Result<()> {
    crate::pool::validate_policy(name, capacity, ratio)
}

impl Registry {
    /// The default registry root: `$VMVOL_ROOT`, else
    /// `$XDG_DATA_HOME/vmvol`, else `$HOME/.local/share/vmvol`, else
    /// `/var/lib/vmvol`.
    pub fn default_root() -> PathBuf {
        let env = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(r) = env("VMVOL_ROOT") {
            return r;
        }
        if let Some(x) = env("XDG_DATA_HOME") {
            return x.join("vmvol");
        }
        if let Some(h) = env("HOME") {
            return h.join(".local/share/vmvol");
        }
        PathBuf::from("/var/lib/vmvol")
    }

    /// Opens (creating if needed) the registry at `root`.
    ///
    /// Errors: [`Error::NotADirectory`] if `root` or a parent is a file,
    /// [`Error::Unwritable`] if it cannot be created or written.
    pub fn open(root: impl AsRef<Path>) -> Result<Registry> {
        let root = root.as_ref();
        let root =
            std::path::absolute(root).map_err(|e| Error::io(root, "resolve registry root", e))?;
        match std::fs::metadata(&root) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::NotADirectory {
                    path: root,
                    reason: "the registry root exists and is not a directory".into(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(&root)
                .map_err(|e| write_err(&root, "create registry root", e))?,
            Err(e) => return Err(write_err(&root, "stat registry root", e)),
        }
        let reg = Registry { root };
        let rdir = reg.records_dir();
        match std::fs::create_dir(&rdir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(write_err(&rdir, "create registry directory", e)),
        }
        Ok(reg)
    }

    /// The registry root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host records of `kind` (a directory `<root>/<kind>`, created if
    /// missing), e.g. the volume layer's `instances`. `kind` follows the
    /// pool name rule and must not be one of the registry's own names.
    pub fn host_records(&self, kind: &str, wait: Wait) -> Result<HostRecords> {
        validate_name(kind)?;
        if matches!(kind, "registry" | "pools") {
            return Err(Error::InvalidName {
                name: kind.to_string(),
                rule: "is used by the registry itself",
            });
        }
        HostRecords::open(self.root.join(kind), wait)
    }

    fn records_dir(&self) -> PathBuf {
        self.root.join("registry")
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.records_dir().join(format!("{name}.json"))
    }

    fn lock(&self, op: &'static str) -> Result<crate::lock::FileLock> {
        let p = self.root.join("registry.lock");
        lock_file(&p, LockMode::Exclusive, Wait::Block, op).map_err(|e| match e {
            Error::Io { path, op, source } => write_err(&path, op, source),
            other => other,
        })
    }

    /// The registry record of `name`.
    pub fn pool_ref(&self, name: &str) -> Result<PoolRef> {
        validate_name(name)?;
        let p = self.record_path(name);
        match std::fs::read(&p) {
            Ok(bytes) => Record::<PoolRef>::parse(&bytes)
                .map(|r| r.data)
                .map_err(|reason| Error::Damaged { path: p, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::PoolNotFound {
                name: name.to_string(),
                root: self.root.clone(),
            }),
            Err(e) => Err(Error::io(&p, "read registry record", e)),
        }
    }

    /// Defines pool `name`: creates its directory layout and registers it.
    /// The new pool is inactive, as in libvirt; [`Registry::activate`] it.
    pub fn define(&self, name: &str, spec: &PoolSpec) -> Result<PoolConfig> {
        validate_name(name)?;
        validate_spec(name, spec)?;
        let _l = self.lock("define pool")?;
        let rec = self.record_path(name);
        if rec.exists() {
            let path = self
                .pool_ref(name)
                .ok()
                .and_then(|r| r.backend.local_path().map(Path::to_path_buf))
                .unwrap_or(rec);
            return Err(Error::AlreadyDefined {
                name: name.to_string(),
                path,
            });
        }
        let want = spec
            .path
            .clone()
            .unwrap_or_else(|| self.root.join("pools").join(name));
        let path =
            std::path::absolute(&want).map_err(|e| Error::io(&want, "resolve pool path", e))?;
        let mut created_dir = false;
        let mut adopted = None;
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::NotADirectory {
                    path,
                    reason: "the pool path exists and is not a directory".into(),
                })
            }
            Ok(_) => {
                let cfg = LocalBackend::config_file(&path);
                if cfg.exists() {
                    // A pool directory without a registry record: a define
                    // that crashed before registering, or a pool moved here.
                    // Adopt it only if it is this very pool.
                    match Record::<PoolConfig>::read(&cfg) {
                        Ok(r) if r.data.name == name => adopted = Some(r.data),
                        Ok(r) => {
                            return Err(Error::PathInUse {
                                name: name.to_string(),
                                path,
                                reason: format!("it holds pool {}", r.data.name),
                            })
                        }
                        Err(e) => {
                            return Err(Error::PathInUse {
                                name: name.to_string(),
                                path,
                                reason: format!("it holds a damaged pool: {e}"),
                            })
                        }
                    }
                } else {
                    let mut rd = std::fs::read_dir(&path)
                        .map_err(|e| write_err(&path, "list pool directory", e))?;
                    if rd.next().is_some() {
                        return Err(Error::PathInUse {
                            name: name.to_string(),
                            path,
                            reason: "the directory is not empty".into(),
                        });
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&path)
                    .map_err(|e| write_err(&path, "create pool directory", e))?;
                created_dir = true;
            }
            Err(e) => return Err(write_err(&path, "stat pool directory", e)),
        }
        let config = match adopted {
            Some(c) => c,
            None => {
                let config = PoolConfig::new(
                    name,
                    BackendSpec::Local { path: path.clone() },
                    spec.capacity,
                    spec.overcommit_ratio,
                )?;
                let bytes =
                    Record::new(config.clone()).to_bytes(&LocalBackend::config_file(&path))?;
                if let Err(e) = LocalBackend::create(&path, &bytes) {
                    if created_dir {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    return Err(e);
                }
                config
            }
        };
        let r = PoolRef {
            name: name.to_string(),
            uuid: config.uuid,
            backend: BackendSpec::Local { path },
            created_dir,
        };
        write_atomic(&rec, &Record::new(r).to_bytes(&rec)?)?;
        Ok(config)
    }

    /// Defines pool `name` on a backend other than a local directory (one
    /// served by a [`BackendProvider`](crate::BackendProvider), e.g. RBD):
    /// creates its layout there and registers it; it starts inactive. A
    /// local `backend` is defined as by [`Registry::define`] with its path.
    ///
    /// Errors: [`Error::BackendNotBuiltIn`] if no provider serves the type.
    pub fn define_on(
        &self,
        name: &str,
        backend: &BackendSpec,
        capacity: CapacityPolicy,
        overcommit_ratio: f64,
    ) -> Result<PoolConfig> {
        if let Some(path) = backend.local_path() {
            let spec = PoolSpec {
                path: Some(path.to_path_buf()),
                capacity,
                overcommit_ratio,
            };
            return self.define(name, &spec);
        }
        validate_name(name)?;
        validate_policy(name, capacity, overcommit_ratio)?;
        let p = crate::provider::provider(backend.type_name()).ok_or_else(|| {
            Error::BackendNotBuiltIn {
                pool: name.to_string(),
                backend: backend.type_name(),
            }
        })?;
        let _l = self.lock("define pool")?;
        let rec = self.record_path(name);
        if rec.exists() {
            return Err(Error::AlreadyDefined {
                name: name.to_string(),
                path: rec,
            });
        }
        let config = PoolConfig::new(name, backend.clone(), capacity, overcommit_ratio)?;
        let bytes = Record::new(config.clone()).to_bytes(&rec)?;
        p.create(backend, &bytes)?;
        let r = PoolRef {
            name: name.to_string(),
            uuid: config.uuid,
            backend: backend.clone(),
            created_dir: false,
        };
        write_atomic(&rec, &Record::new(r).to_bytes(&rec)?)?;
        Ok(config)
    }

    /// Every defined pool, sorted by name; damaged ones included with path
    /// and reason.
    pub fn list(&self) -> Result<Vec<PoolListing>> {
        let rdir = self.records_dir();
        let rd = std::fs::read_dir(&rdir).map_err(|e| Error::io(&rdir, "list registry", e))?;
        let mut out = Vec::new();
        for de in rd {
            let de = de.map_err(|e| Error::io(&rdir, "list registry", e))?;
            if is_temp_name(&de.file_name()) {
                continue; // a half-written record's temp file, not a record
            }
            let fname = de.file_name().to_string_lossy().into_owned();
            let path = de.path();
            let name = fname.strip_suffix(".json").unwrap_or(&fname).to_string();
            let row = match self.read_listing(&name, &path) {
                Ok(cfg) => PoolListing::Ok(cfg),
                Err((path, reason)) => PoolListing::Damaged { name, path, reason },
            };
            out.push(row);
        }
        out.sort_by(|a, b| listing_name(a).cmp(listing_name(b)));
        Ok(out)
    }

    fn read_listing(
        &self,
        name: &str,
        rec: &Path,
    ) -> std::result::Result<PoolConfig, (PathBuf, String)> {
        if let Err(e) = validate_name(name) {
            return Err((rec.to_path_buf(), format!("not a registry record: {e}")));
        }
        let r = self
            .pool_ref(name)
            .map_err(|e| (rec.to_path_buf(), e.to_string()))?;
        let (cfg, cfg_path) = match r.backend.local_path() {
            Some(dir) => {
                let cfg_path = LocalBackend::config_file(dir);
                let cfg = Record::<PoolConfig>::read(&cfg_path)
                    .map_err(|e| (cfg_path.clone(), e.to_string()))?;
                (cfg, cfg_path)
            }
            None => {
                // Another backend (a registered provider): its own config record.
                let b = open_backend(name, &r.backend)
                    .map_err(|e| (rec.to_path_buf(), e.to_string()))?;
                let cfg_path = b.config_path();
                let bytes = b
                    .read_config()
                    .map_err(|e| (cfg_path.clone(), e.to_string()))?;
                let cfg = Record::<PoolConfig>::parse(&bytes)
                    .map_err(|reason| (cfg_path.clone(), reason))?;
                (cfg, cfg_path)
            }
        };
        if cfg.data.name != name || cfg.data.uuid != r.uuid {
            return Err((
                cfg_path,
                format!(
                    "pool.json describes pool {} ({}), the registry expects {name} ({})",
                    cfg.data.name, cfg.data.uuid, r.uuid
                ),
            ));
        }
        Ok(cfg.data)
    }

    /// The config of pool `name`.
    pub fn get(&self, name: &str) -> Result<PoolConfig> {
        let r = self.pool_ref(name)?;
        let b = open_backend(name, &r.backend)?;
        let bytes = b.read_config()?;
        Record::<PoolConfig>::parse(&bytes)
            .map(|r| r.data)
            .map_err(|reason| Error::Damaged {
                path: b.config_path(),
                reason,
            })
    }

    /// Opens pool `name` (recovery + scan); `wait` is the handle's lock policy.
    pub fn open_pool(&self, name: &str, wait: Wait) -> Result<Pool> {
        let r = self.pool_ref(name)?;
        let pool = Pool::with_backend(open_backend(name, &r.backend)?, wait)?;
        self.upgrade_record(&r)?;
        Ok(pool)
    }

    /// Rewrites a schema-1 registry record in the current form (the pool's
    /// own config is rewritten by its next config change).
    fn upgrade_record(&self, r: &PoolRef) -> Result<()> {
        let p = self.record_path(&r.name);
        let version = |bytes: &[u8]| {
            serde_json::from_slice::<Record<serde::de::IgnoredAny>>(bytes)
                .map(|e| e.schema_version)
                .unwrap_or(PoolRef::SCHEMA_VERSION)
        };
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, "read registry record", e))?;
        if version(&bytes) >= PoolRef::SCHEMA_VERSION {
            return Ok(()); // the common case: no registry lock taken
        }
        let _l = self.lock("upgrade registry record")?;
        // Again under the lock: an undefine or another upgrade may have won.
        match std::fs::read(&p) {
            Ok(b) if version(&b) < PoolRef::SCHEMA_VERSION && b == bytes => {
                write_atomic(&p, &Record::new(r.clone()).to_bytes(&p)?)
            }
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&p, "read registry record", e)),
        }
    }

    /// Activates pool `name`.
    pub fn activate(&self, name: &str, wait: Wait) -> Result<PoolConfig> {
        self.open_pool(name, wait)?.activate()
    }

    /// Deactivates pool `name`.
    pub fn deactivate(&self, name: &str, wait: Wait) -> Result<PoolConfig> {
        self.open_pool(name, wait)?.deactivate()
    }

    /// Rescans pool `name` and returns its figures.
    pub fn refresh(&self, name: &str, wait: Wait) -> Result<PoolDescription> {
        // Opening already recovers and rescans.
        self.open_pool(name, wait)?.describe()
    }

    /// Figures of pool `name` (opening it rescans, so they are fresh).
    pub fn info(&self, name: &str, wait: Wait) -> Result<PoolDescription> {
        self.open_pool(name, wait)?.describe()
    }

    /// Undefines pool `name`: refused with [`Error::NotEmpty`] unless it
    /// holds no entries, live staging work or open reservations; then its
    /// layout is removed (and its directory, if `define` created it) and it
    /// leaves the registry. A registry record that is damaged, or whose pool
    /// directory is gone, is simply removed.
    pub fn undefine(&self, name: &str, wait: Wait) -> Result<()> {
        validate_name(name)?;
        let _l = self.lock("undefine pool")?;
        let rec = self.record_path(name);
        match self.pool_ref(name) {
            Ok(r) => match r.backend.local_path() {
                Some(dir) => {
                    if LocalBackend::config_file(dir).exists() {
                        Pool::open(dir, wait)?.destroy_if_empty(r.created_dir)?;
                    }
                }
                None => {
                    let b = open_backend(name, &r.backend)?;
                    Pool::with_backend(b, wait)?.destroy_if_empty(false)?;
                }
            },
            Err(Error::Damaged { .. }) => {}
            Err(e) => return Err(e),
        }
        std::fs::remove_file(&rec).map_err(|e| write_err(&rec, "remove registry record", e))?;
        fsync_dir(&self.records_dir())
    }
}

fn listing_name(l: &PoolListing) -> &str {
    match l {
        PoolListing::Ok(c) => &c.name,
        PoolListing::Damaged { name, .. } => name,
    }
}
