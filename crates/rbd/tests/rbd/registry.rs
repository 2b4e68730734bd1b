//! A registry defines, lists, opens and undefines pools on RBD through the
//! provider vmvol-rbd registers.

use std::sync::Arc;

use vmvol_pool::*;
use vmvol_rbd::{RbdOptions, RbdProvider};

use crate::cluster::{ceph, cluster, namespace};
use crate::conformance::LEASE;
use crate::suite::{make, raw};

#[test]
fn registry_defines_opens_and_undefines_rbd_pools() {
    let Some(c) = cluster() else { return };
    register_backend(Arc::new(RbdProvider {
        options: RbdOptions {
            lease: LEASE,
            ..RbdOptions::default()
        },
    }));
    let spec = namespace(c);
    let backend = BackendSpec::Rbd(spec.clone());
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::open(root.path()).unwrap();
    let cfg = reg
        .define_on(
            "ceph",
            &backend,
            CapacityPolicy::Quota { bytes: 1 << 30 },
            2.0,
        )
        .unwrap();
    assert_eq!(cfg.backend, backend);
    assert!(matches!(
        reg.define_on("ceph", &backend, CapacityPolicy::Filesystem, 1.0),
        Err(Error::AlreadyDefined { .. })
    ));
    // A second pool on the same namespace is refused by the cluster.
    assert!(reg
        .define_on("again", &backend, CapacityPolicy::Filesystem, 1.0)
        .is_err());
    let listed = reg.list().unwrap();
    assert!(
        matches!(&listed[..], [PoolListing::Ok(c)] if c.name == "ceph" && c.backend == backend),
        "{listed:?}"
    );
    reg.activate("ceph", Wait::Block).unwrap();
    let pool = reg.open_pool("ceph", Wait::Block).unwrap();
    make(&pool, "v", raw(1 << 20), b"hello");
    let d = reg.info("ceph", Wait::Block).unwrap();
    assert_eq!((d.volumes, d.allocation, d.capacity), (1, 1 << 20, 1 << 30));
    assert!(matches!(
        reg.undefine("ceph", Wait::Block),
        Err(Error::NotEmpty { .. })
    ));
    pool.remove(EntryKind::Volume, "v").unwrap();
    drop(pool);
    reg.undefine("ceph", Wait::Block).unwrap();
    assert!(reg.list().unwrap().is_empty());
    // The layout is gone from the cluster: neither image nor pool object.
    let ls = ceph(c, "rados", &["-p", &spec.pool, "-N", &spec.namespace, "ls"]);
    let ls = String::from_utf8_lossy(&ls);
    // RBD's own bookkeeping objects (rbd_directory, rbd_trash) stay.
    assert!(
        ls.lines()
            .all(|l| !l.starts_with("vmvol.") && !l.starts_with("rbd_header.")),
        "{ls}"
    );
}
