//! Which backend a pool lives on, as its records name it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The backend of a pool, tagged by type in the registry record and in the
/// pool's config: `{"type": "local", "path": "/srv/pool"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum BackendSpec {
    /// A directory on a local (or locally mounted) filesystem.
    Local {
        /// The pool directory (absolute).
        path: PathBuf,
    },
    /// A Ceph RBD pool, opened through the provider `vmvol-rbd` registers
    /// ([`register_backend`](crate::register_backend)); without it, refused
    /// with [`Error::BackendNotBuiltIn`](crate::Error::BackendNotBuiltIn).
    Rbd(RbdSpec),
    /// A process-local pool in memory (tests only; never opened from a registry).
    Memory {
        /// A label for messages.
        label: String,
    },
}

/// Where a Ceph RBD pool is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdSpec {
    /// The cluster's configuration file (e.g. `/etc/ceph/ceph.conf`).
    pub conf: PathBuf,
    /// The Ceph client id (user), e.g. `vmvol` for `client.vmvol`.
    pub id: String,
    /// The RADOS pool.
    pub pool: String,
    /// The RBD namespace inside the pool (empty: the default one).
    #[serde(default)]
    pub namespace: String,
}

impl BackendSpec {
    /// The type tag (`local`, `rbd`, `memory`).
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendSpec::Local { .. } => "local",
            BackendSpec::Rbd(_) => "rbd",
            BackendSpec::Memory { .. } => "memory",
        }
    }

    /// The directory of a local pool.
    pub fn local_path(&self) -> Option<&std::path::Path> {
        match self {
            BackendSpec::Local { path } => Some(path),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendSpec::Local { path } => write!(f, "{}", path.display()),
            BackendSpec::Rbd(r) => {
                write!(f, "rbd:{}", r.pool)?;
                if !r.namespace.is_empty() {
                    write!(f, "/{}", r.namespace)?;
                }
                write!(f, " (client.{}, {})", r.id, r.conf.display())
            }
            BackendSpec::Memory { label } => write!(f, "memory:{label}"),
        }
    }
}

/// The backend of a record that may be schema 1 (a bare `path`) or later
/// (a tagged `backend`).
pub(crate) fn backend_of(
    backend: Option<BackendSpec>,
    path: Option<PathBuf>,
) -> std::result::Result<BackendSpec, String> {
    match (backend, path) {
        (Some(b), _) => Ok(b),
        (None, Some(path)) => Ok(BackendSpec::Local { path }),
        (None, None) => Err("record names no backend (neither \"backend\" nor \"path\")".into()),
    }
}
