//! Ceph RBD for vmvol: a [`BlockIo`](vmvol_format::BlockIo) over librbd
//! ([`RbdImage`]) and a pool backend ([`RbdBackend`]) implementing the pool
//! seam's traits on one RADOS pool and namespace: records, the change
//! journal and liveness markers in the omap of one pool object, the pool
//! lock as a RADOS lock with a lease renewed while held (every fenced write
//! asserts the lock in the same atomic RADOS operation, so the cluster, not
//! this process, refuses a stale holder), and images as RBD images (linked =
//! snapshot + protect + clone, full = copy, grow = resize, snapshots =
//! native RBD snapshots of the volume's image, see [`NativeSnapshot`]).
//!
//! The binding to librados/librbd is a small hand-written FFI module
//! (`ffi`), the only place with `unsafe`.

mod backend;
mod error;
mod ffi;
mod figures;
mod image;
mod lease;

pub use backend::{NativeSnapshot, RbdBackend, RbdOptions};
pub use error::{Error, Result};
pub use image::RbdImage;

use std::path::PathBuf;
use std::sync::Arc;

use vmvol_pool::RbdSpec;

/// A connection to one pool/namespace of a Ceph cluster.
#[derive(Debug, Clone)]
pub struct Connection {
    io: Arc<ffi::IoCtx>,
    cluster: Arc<ffi::Cluster>,
    spec: RbdSpec,
}

impl Connection {
    /// Connects as `client.<spec.id>` with `spec.conf` to `spec.pool` /
    /// `spec.namespace`. Client timeouts come from the config file; without
    /// any, 30 s op timeouts are set so a broken cluster fails instead of
    /// hanging.
    pub fn connect(spec: &RbdSpec) -> Result<Connection> {
        let conf = spec.conf.to_string_lossy().into_owned();
        let cluster = ffi::Cluster::connect(
            &conf,
            &spec.id,
            &[
                ("rados_osd_op_timeout", "30"),
                ("rados_mon_op_timeout", "30"),
                ("client_mount_timeout", "30"),
            ],
        )
        .map_err(|e| Error::Ceph {
            object: spec.conf.clone(),
            op: "connect to the cluster",
            source: e.io(),
        })?;
        let io = cluster
            .ioctx(&spec.pool, &spec.namespace)
            .map_err(|e| Error::Ceph {
                object: PathBuf::from(format!("rbd:{}", spec.pool)),
                op: "open pool",
                source: e.io(),
            })?;
        Ok(Connection {
            io,
            cluster,
            spec: spec.clone(),
        })
    }

    /// `rbd:POOL[/NS]/NAME`, for messages.
    pub fn label(&self, name: &str) -> PathBuf {
        let mut s = format!("rbd:{}", self.spec.pool);
        if !self.spec.namespace.is_empty() {
            s.push('/');
            s.push_str(&self.spec.namespace);
        }
        if !name.is_empty() {
            s.push('/');
            s.push_str(name);
        }
        PathBuf::from(s)
    }

    /// Where this connection points.
    pub fn spec(&self) -> &RbdSpec {
        &self.spec
    }

    /// Creates RBD image `name` of `size` bytes (thin).
    pub fn create_image(&self, name: &str, size: u64) -> Result<()> {
        self.io.rbd_create(name, size).map_err(|e| Error::Ceph {
            object: self.label(name),
            op: "create image",
            source: e.io(),
        })
    }

    /// Removes RBD image `name`.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        self.io.rbd_remove(name).map_err(|e| Error::Ceph {
            object: self.label(name),
            op: "remove image",
            source: e.io(),
        })
    }

    /// Names of the RBD images in the pool/namespace.
    pub fn list_images(&self) -> Result<Vec<String>> {
        self.io.rbd_list().map_err(|e| Error::Ceph {
            object: self.label(""),
            op: "list images",
            source: e.io(),
        })
    }

    /// Calls made through this connection so far, by kind (see [`OpCounts`]).
    pub fn op_counts(&self) -> OpCounts {
        let c = &self.io.counts;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        OpCounts {
            rados_ops: get(&c.rados_ops),
            image_lists: get(&c.image_lists),
            image_opens: get(&c.image_opens),
        }
    }

    /// Opens RBD image `name` as a [`BlockIo`](vmvol_format::BlockIo).
    pub fn open_image(&self, name: &str, writable: bool) -> Result<RbdImage> {
        RbdImage::open(&self.io, name, self.label(name), writable)
    }
}

/// How many costly calls a [`Connection`] made: an operation's cost counted
/// rather than timed (tests and benches compare these; timings on a loaded
/// machine are noise). Lease renewals in the background count too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpCounts {
    /// Single-object RADOS operations (one round trip each): omap and
    /// object reads and writes, locks.
    pub rados_ops: u64,
    /// Listings of every image of the namespace (`rbd_list`).
    pub image_lists: u64,
    /// Image opens (several round trips each, plus the parent's open).
    pub image_opens: u64,
}

impl std::ops::Sub for OpCounts {
    type Output = OpCounts;
    fn sub(self, o: OpCounts) -> OpCounts {
        OpCounts {
            rados_ops: self.rados_ops.saturating_sub(o.rados_ops),
            image_lists: self.image_lists.saturating_sub(o.image_lists),
            image_opens: self.image_opens.saturating_sub(o.image_opens),
        }
    }
}

/// Serves `BackendSpec::Rbd` pools to every [`vmvol_pool::Registry`] of the
/// process (see [`register`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RbdProvider {
    /// Lease and other tunables of the backends it opens.
    pub options: RbdOptions,
}

fn rbd_spec(spec: &vmvol_pool::BackendSpec) -> vmvol_pool::Result<&RbdSpec> {
    match spec {
        vmvol_pool::BackendSpec::Rbd(r) => Ok(r),
        other => Err(vmvol_pool::Error::BackendNotBuiltIn {
            pool: other.to_string(),
            backend: other.type_name(),
        }),
    }
}

impl vmvol_pool::BackendProvider for RbdProvider {
    fn type_name(&self) -> &'static str {
        "rbd"
    }

    fn create(&self, spec: &vmvol_pool::BackendSpec, config: &[u8]) -> vmvol_pool::Result<()> {
        RbdBackend::create(rbd_spec(spec)?, config)
    }

    fn open(
        &self,
        spec: &vmvol_pool::BackendSpec,
    ) -> vmvol_pool::Result<Arc<dyn vmvol_pool::backend::PoolBackend>> {
        Ok(Arc::new(RbdBackend::open(rbd_spec(spec)?, self.options)?))
    }
}

/// Registers the RBD backend (default options) with vmvol-pool, so that
/// registries define and open `rbd` pools in this process.
pub fn register() {
    vmvol_pool::register_backend(Arc::new(RbdProvider::default()));
}
