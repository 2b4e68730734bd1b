//! Images as RBD images, seen with the rbd tool: a linked image is an RBD
//! clone of a protected link snapshot (per link on a volume, shared by the
//! links of a template); the base cannot be removed while the clone exists
//! (RBD refuses, we say why and remove nothing); removing the last clone
//! removes its snapshot; grow is a resize and shrink is refused; scans
//! report what librbd reports without opening images.

use vmvol_format::{BlockIo, Control, Format};
use vmvol_pool::RbdSpec;
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

/// The link snapshots on `image` (`rbd snap ls`).
fn link_snaps(c: &crate::cluster::Cluster, spec: &RbdSpec, image: &str) -> usize {
    let full = format!("{}/{}/{image}", spec.pool, spec.namespace);
    String::from_utf8(ceph(c, "rbd", &["snap", "ls", &full]))
        .unwrap()
        .matches("vmvol-link-")
        .count()
}

#[test]
fn links_to_a_template_share_one_snapshot_links_to_a_volume_do_not() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 30 }, 4.0);
    let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
    pool.activate().unwrap();
    for kind in [EntryKind::Template, EntryKind::Volume] {
        let st = pool.stage().unwrap();
        let b = st
            .create_image(DATA_IMAGE, &raw(8 * MIB), &Control::new())
            .unwrap();
        commit(&pool, st, kind, "base");
        let base = b.committed(kind, "base");
        let bn = RbdBackend::image_name(&base);
        let mut kids = Vec::new();
        for i in 0..3 {
            let st = pool.stage().unwrap();
            st.create_linked(DATA_IMAGE, &base, None).unwrap();
            let id = format!("kid{i}");
            commit(&pool, st, EntryKind::Snapshot, &id);
            kids.push(id);
        }
        // A template never changes: its links share one snapshot. A
        // volume does: each link has a snapshot of its own.
        let per_link = if kind == EntryKind::Template { 1 } else { 3 };
        assert_eq!(link_snaps(c, &spec, &bn), per_link, "{kind}");
        // The shared snapshot stays while a clone uses it, and goes with
        // the last one; then the base can go.
        for (i, k) in kids.iter().enumerate() {
            pool.remove(EntryKind::Snapshot, k).unwrap();
            let left = if kind == EntryKind::Template {
                usize::from(i < 2)
            } else {
                2 - i
            };
            assert_eq!(link_snaps(c, &spec, &bn), left, "{kind} after {k}");
        }
        pool.remove(kind, "base").unwrap();
    }
    let ls = ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    );
    assert!(ls.is_empty(), "{}", String::from_utf8_lossy(&ls));
}

#[test]
fn scanned_figures_are_librbds() {
    // Scans read size and allocation from the header and object map
    // without opening the image: they must say what librbd says.
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 30 }, 4.0);
    let b = open(&spec);
    let pool = Pool::with_backend(b.clone(), Wait::Block).unwrap();
    pool.activate().unwrap();
    let size = 40 * MIB + 512;
    let st = pool.stage().unwrap();
    let img = st
        .create_image(DATA_IMAGE, &raw(size), &Control::new())
        .unwrap();
    let io = st.open_image(&img, true).unwrap();
    // Objects 0, 2 and the last (partial) one.
    for off in [0, 9 * MIB, 40 * MIB] {
        io.write_at(&[7; 512], off).unwrap();
    }
    io.flush().unwrap();
    drop(io);
    commit(&pool, st, EntryKind::Template, "t");
    let base = img.committed(EntryKind::Template, "t");
    let st = pool.stage().unwrap();
    let l = st.create_linked(DATA_IMAGE, &base, None).unwrap();
    commit(&pool, st, EntryKind::Volume, "v");
    let child = l.committed(EntryKind::Volume, "v");
    let cio = pool.open_image(&child, true).unwrap();
    cio.write_at(&[9; 4096], 20 * MIB).unwrap();
    cio.flush().unwrap();
    drop(cio);
    pool.rescan_entry(EntryKind::Volume, "v").unwrap();
    // A fresh handle scans every entry.
    let before = b.connection().op_counts();
    let pool = Pool::with_backend(b.clone(), Wait::Block).unwrap();
    assert_eq!((b.connection().op_counts() - before).image_opens, 0);
    for (kind, id, image, held) in [
        (EntryKind::Template, "t", &base, 2 * 4 * MIB + 512),
        (EntryKind::Volume, "v", &child, 4 * MIB),
    ] {
        let e = pool.get::<Vol>(kind, id).unwrap();
        let s = &e.images[0];
        let lib = b
            .connection()
            .open_image(&RbdBackend::image_name(image), false)
            .unwrap();
        assert_eq!(s.virtual_size, Some(lib.size()), "{kind}");
        assert_eq!(s.host_bytes, lib.allocated().unwrap(), "{kind}");
        assert_eq!(s.host_bytes, held, "{kind}");
    }
}
