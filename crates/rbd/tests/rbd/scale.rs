//! Opening an RBD pool is O(N) in its images: each entry's scan reads its
//! own images from librbd's directory (by name prefix) and their figures
//! from header and object map — no listing of every image per entry (that
//! was O(N²)) and no image opens. Checked by counting calls at 50 and at
//! 200 entries; the open times are printed for docs/performance.md.

use std::time::Instant;

use vmvol_format::Control;
use vmvol_pool::*;

use crate::cluster::{cluster, namespace};
use crate::conformance::{define, open};
use crate::suite::{raw, Vol};

fn add(pool: &Pool, from: usize, to: usize) {
    for i in from..to {
        let st = pool.stage().unwrap();
        st.create_image(DATA_IMAGE, &raw(1 << 20), &Control::new())
            .unwrap();
        let id = format!("v{i:04}");
        let v = Vol {
            name: id.clone(),
            tag: 0,
        };
        pool.commit(st, EntryKind::Volume, &id, &v).unwrap();
    }
}

#[test]
fn open_is_linear_in_images() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 40 }, 4.0);
    let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
    pool.activate().unwrap();
    let mut figures = Vec::new();
    let mut have = 0;
    for n in [50, 200] {
        add(&pool, have, n);
        have = n;
        let b = open(&spec);
        let before = b.connection().op_counts();
        let t0 = Instant::now();
        let p = Pool::with_backend(b.clone(), Wait::Block).unwrap();
        let took = t0.elapsed();
        let used = b.connection().op_counts() - before;
        assert_eq!(p.describe().unwrap().volumes, n);
        // One listing of every image (recovery's look for strays), none
        // per entry; no image opened.
        assert_eq!(used.image_lists, 1, "{n} entries: {used:?}");
        assert_eq!(used.image_opens, 0, "{n} entries: {used:?}");
        figures.push((n, used.rados_ops, took));
    }
    let (n0, ops0, t0) = figures[0];
    let (n1, ops1, t1) = figures[1];
    let per_entry = (ops1 - ops0) as f64 / (n1 - n0) as f64;
    eprintln!(
        "rbd pool open (load {}): {n0} entries {ops0} RADOS ops {t0:?}; \
         {n1} entries {ops1} RADOS ops {t1:?}; {per_entry:.1} ops per added entry",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // A scan is a handful of round trips per entry (entry key and record
    // in one read, the entry's directory keys, header and object map per
    // image: 4) plus a few renewals meanwhile: a constant, not a share of N.
    assert!(per_entry <= 8.0, "{per_entry} RADOS ops per added entry");
    assert!(ops0 as f64 <= 8.0 * n0 as f64 + 60.0, "{ops0} ops for {n0}");
}
