//! The change journal on RADOS: ordered reads after a cursor, compaction
//! into a new generation (readers behind it are told to rescan), and pool
//! handles that keep seeing each other's changes across compactions.

use std::sync::Arc;

use vmvol_pool::backend::{Change, ChangeJournal, JournalCursor, JournalRead, PoolLock};
use vmvol_pool::*;
use vmvol_rbd::{RbdBackend, RbdOptions};

use crate::cluster::{cluster, namespace};
use crate::conformance::{define, LEASE};
use crate::suite::{make, raw, Vol};

fn small(spec: &RbdSpec) -> Arc<RbdBackend> {
    let opts = RbdOptions {
        lease: LEASE,
        journal_max: 3,
    };
    Arc::new(RbdBackend::open(spec, opts).unwrap())
}

#[test]
fn journal_orders_compacts_and_resets() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 30 }, 1.0);
    let b = small(&spec);
    let g = b.lock_exclusive(Wait::Block, "test").unwrap();
    let start = match b.journal_read(JournalCursor::default()).unwrap() {
        JournalRead::Reset(cur) => cur,
        other => panic!("{other:?}"),
    };
    let ch = |i: usize| Change::Entry(EntryKind::Volume, format!("v{i}"));
    let mut cur = start;
    for i in 0..3 {
        cur = b.journal_append(&g, &ch(i)).unwrap();
    }
    assert_eq!(
        b.journal_read(start).unwrap(),
        JournalRead::Changes(vec![ch(0), ch(1), ch(2)], cur)
    );
    let mid = JournalCursor {
        offset: start.offset + 1,
        ..start
    };
    assert_eq!(
        b.journal_read(mid).unwrap(),
        JournalRead::Changes(vec![ch(1), ch(2)], cur)
    );
    // The fourth append starts a new generation.
    let next = b.journal_append(&g, &ch(3)).unwrap();
    assert_ne!(next.epoch, cur.epoch);
    assert!(matches!(b.journal_read(cur).unwrap(), JournalRead::Reset(c) if c == next));
    let fresh = JournalCursor {
        epoch: next.epoch,
        offset: 0,
    };
    assert_eq!(
        b.journal_read(fresh).unwrap(),
        JournalRead::Changes(vec![ch(3)], next)
    );
    // A cursor past the end is a reset too.
    let ahead = JournalCursor {
        offset: next.offset + 5,
        ..next
    };
    assert!(matches!(
        b.journal_read(ahead).unwrap(),
        JournalRead::Reset(_)
    ));
    drop(g);
    // Two pool handles (two clients) across many compactions.
    let p1 = Pool::with_backend(small(&spec), Wait::Block).unwrap();
    p1.activate().unwrap();
    let p2 = Pool::with_backend(small(&spec), Wait::Block).unwrap();
    make(&p1, "v", raw(1 << 20), b"");
    for tag in 1..=10u64 {
        let vol = Vol {
            name: "v".into(),
            tag,
        };
        p1.write_record(EntryKind::Volume, "v", &vol).unwrap();
        assert_eq!(
            p2.get::<Vol>(EntryKind::Volume, "v")
                .unwrap()
                .record
                .data
                .tag,
            tag
        );
    }
    make(&p2, "w", raw(1 << 20), b"");
    assert!(p1.contains(EntryKind::Volume, "w").unwrap());
}
