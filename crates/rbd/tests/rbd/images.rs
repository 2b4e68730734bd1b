//! Images as RBD images, seen with the rbd tool: a linked image is an RBD
//! clone of a per-link protected snapshot; the base cannot be removed while
//! the clone exists (RBD refuses, we say why and remove nothing); removing
//! the clone removes its snapshot; grow is a resize and shrink is refused.

use vmvol_format::{Control, Format};
use vmvol_pool::*;
use vmvol_rbd::RbdBackend;

use crate::cluster::{ceph, cluster, export, namespace};
use crate::conformance::{define, open};
use crate::suite::{raw, Vol};

const MIB: u64 = 1 << 20;

fn commit(pool: &Pool, st: Staging, kind: EntryKind, id: &str) {
    let v = Vol {
        name: id.into(),
        tag: 0,
    };
    pool.commit(st, kind, id, &v).unwrap();
}

#[test]
fn links_are_clones_and_bases_are_kept() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 30 }, 4.0);
    let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
    pool.activate().unwrap();
    let st = pool.stage().unwrap();
    let b = st
        .create_image(DATA_IMAGE, &raw(8 * MIB), &Control::new())
        .unwrap();
    let io = st.open_image(&b, true).unwrap();
    io.write_at(&[0x11; 8192], 4 * MIB).unwrap();
    io.flush().unwrap();
    drop(io);
    commit(&pool, st, EntryKind::Template, "base");
    let base = b.committed(EntryKind::Template, "base");
    let st = pool.stage().unwrap();
    let l = st.create_linked(DATA_IMAGE, &base, None).unwrap();
    commit(&pool, st, EntryKind::Volume, "child");
    let child = l.committed(EntryKind::Volume, "child");
    let (bn, cn) = (
        RbdBackend::image_name(&base),
        RbdBackend::image_name(&child),
    );
    let full = |n: &str| format!("{}/{}/{n}", spec.pool, spec.namespace);
    // The clone's parent, as RBD records it, is a snapshot of the base.
    let info: serde_json::Value =
        serde_json::from_slice(&ceph(c, "rbd", &["info", "--format", "json", &full(&cn)])).unwrap();
    assert_eq!(info["parent"]["image"].as_str(), Some(bn.as_str()));
    let snap = info["parent"]["snapshot"].as_str().unwrap().to_string();
    assert!(snap.starts_with("vmvol-link-"), "{snap}");
    // What the clone shows is the base's data (rbd export through librbd's
    // own parent reads).
    let t = tempfile::tempdir().unwrap();
    let bytes = export(c, &spec, &cn, &t.path().join("c.raw"));
    assert_eq!(
        &bytes[4 * MIB as usize..4 * MIB as usize + 8192],
        &[0x11; 8192][..]
    );
    // The base cannot go while the clone exists: refused, nothing removed.
    let e = pool.remove_image(&base).unwrap_err().to_string();
    assert!(e.contains("linked images depend on it"), "{e}");
    assert!(pool.remove(EntryKind::Template, "base").is_err());
    let ls = String::from_utf8(ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    ))
    .unwrap();
    assert!(ls.contains(&bn) && ls.contains(&cn), "{ls}");
    assert!(pool.contains(EntryKind::Template, "base").unwrap());
    // Grow is a resize; shrink is refused.
    pool.grow_image(&child, 16 * MIB).unwrap();
    let info: serde_json::Value =
        serde_json::from_slice(&ceph(c, "rbd", &["info", "--format", "json", &full(&cn)])).unwrap();
    assert_eq!(info["size"].as_u64(), Some(16 * MIB));
    assert!(matches!(
        pool.grow_image(&child, 4 * MIB),
        Err(Error::Image {
            source: vmvol_format::Error::Shrink { .. },
            ..
        })
    ));
    // Removing the clone removes its link snapshot; then the base goes.
    pool.remove(EntryKind::Volume, "child").unwrap();
    let snaps = String::from_utf8(ceph(c, "rbd", &["snap", "ls", &full(&bn)])).unwrap();
    assert!(!snaps.contains("vmvol-link-"), "{snaps}");
    pool.remove(EntryKind::Template, "base").unwrap();
    let ls = ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    );
    assert!(ls.is_empty(), "{}", String::from_utf8_lossy(&ls));
    // Formats are part of the name: the same image under another format
    // is not found.
    let other = ImageRef {
        format: Format::Qcow2,
        ..base
    };
    assert!(matches!(
        pool.image_summary(&other),
        Err(Error::ImageNotFound { .. })
    ));
}
