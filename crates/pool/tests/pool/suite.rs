//! The pool's conformance suite: every behaviour a backend must give the
//! pool, as one function per behaviour taking a [`Harness`] (a backend
//! factory). `conformance` runs it on the local and in-memory backends;
//! a new backend (RBD) adds a harness and runs the same functions.
//! Behaviours that need several processes or the on-disk layout are in
//! `local.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::any::Any;
use std::sync::{Arc, Barrier};

use serde::{Deserialize, Serialize};
use vmvol_format::{ByteRange, CompactOptions, Control, Format, Prealloc};
use vmvol_pool::*;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vol {
    pub name: String,
    pub tag: u64,
}
impl RecordType for Vol {
    const SCHEMA_VERSION: u32 = 2;
}

/// Stores raw record bytes (or none) for an entry behind the API's back.
pub type Damage = dyn Fn(EntryKind, &str, Option<&[u8]>);

/// One active pool made by a harness, with the hooks the behaviours need.
pub struct Fixture {
    /// A handle on the pool.
    pub pool: Pool,
    /// Opens another, independent handle on the same pool (as another
    /// process would).
    pub reopen: Box<dyn Fn() -> Pool + Send + Sync>,
    /// Stores raw record bytes for entry `kind/id` (None: no record)
    /// behind the API's back, as damage would.
    pub damage: Box<Damage>,
    /// Lets the current exclusive lease lapse (test clock), if the
    /// backend's lock is a lease.
    pub lapse_lease: Option<Box<dyn Fn()>>,
    /// Keeps temp dirs, mounts, ... alive.
    pub keep: Box<dyn Any>,
}

/// A backend factory.
pub trait Harness {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;
    /// A fresh, active pool with this policy.
    fn pool(&self, capacity: CapacityPolicy, ratio: f64) -> Fixture;
    /// A fresh, active pool on storage with `space` bytes in all, nearly all
    /// free; `None` (after saying why) if this environment cannot make one.
    fn pool_on_space(&self, space: u64, capacity: Option<u64>, ratio: f64) -> Option<Fixture>;
}

fn quota(bytes: u64) -> CapacityPolicy {
    CapacityPolicy::Quota { bytes }
}

pub fn raw(size: u64) -> ImageSpec {
    ImageSpec {
        size,
        format: Format::Raw,
        prealloc: Prealloc::Off,
    }
}

/// Commits volume `id` with a fresh image per `spec`, `data` written at 0;
/// returns the committed image.
pub fn make(pool: &Pool, id: &str, spec: ImageSpec, data: &[u8]) -> ImageRef {
    let g = if spec.is_physical() {
        pool.reserve_physical(spec.size, "test").unwrap()
    } else {
        pool.reserve(spec.size, "test").unwrap()
    };
    let st = pool.stage().unwrap();
    let img = st.create_image(DATA_IMAGE, &spec, &Control::new()).unwrap();
    if !data.is_empty() {
        let io = st.open_image(&img, true).unwrap();
        io.write_at(data, 0).unwrap();
        io.flush().unwrap();
    }
    let vol = Vol {
        name: id.into(),
        tag: 0,
    };
    pool.commit(st, EntryKind::Volume, id, &vol).unwrap();
    drop(g);
    img.committed(EntryKind::Volume, id)
}

fn read(pool: &Pool, img: &ImageRef, off: u64, len: usize) -> Vec<u8> {
    let io = pool.open_image(img, false).unwrap();
    let mut buf = vec![0u8; len];
    io.read_at(&mut buf, off).unwrap();
    buf
}

/// Figures follow the images and reservations; a quota is a hard limit
/// whose refusal names needed and available bytes.
pub fn capacity_figures(h: &dyn Harness) {
    let f = h.pool(quota(10 * GIB), 1.0);
    let pool = &f.pool;
    make(pool, "a", raw(100 * MIB), &[7u8; 300_000]);
    make(pool, "b", raw(2 * GIB), b"hello");
    let q = ImageSpec {
        size: 512 * MIB,
        format: Format::Qcow2,
        prealloc: Prealloc::Off,
    };
    make(pool, "q", q, b"");
    let virt = 100 * MIB + 2 * GIB + 512 * MIB;
    let d = pool.refresh().unwrap();
    assert_eq!(d.capacity, 10 * GIB, "{}", h.name());
    assert_eq!(d.limit, 10 * GIB);
    assert_eq!((d.virtual_size, d.allocation), (virt, virt));
    assert_eq!(d.reserved, 0);
    assert_eq!(d.available, 10 * GIB - virt);
    assert_eq!(d.volumes, 3);
    // Physical: at least the data written, far below the virtual sizes.
    assert!(
        d.physical >= 300_000 && d.physical < virt / 4,
        "{}",
        d.physical
    );
    let g = pool.reserve(GIB, "open").unwrap();
    let d2 = pool.describe().unwrap();
    assert_eq!((d2.reserved, d2.reservations), (GIB, 1));
    assert_eq!(d2.allocation, virt + GIB);
    match pool.reserve(10 * GIB, "too big") {
        Err(Error::InsufficientSpace {
            needed, available, ..
        }) => {
            assert_eq!(needed, 10 * GIB);
            assert_eq!(available, 10 * GIB - virt - GIB);
        }
        r => panic!("{}: {r:?}", h.name()),
    }
    drop(g);
    assert_eq!(pool.describe().unwrap().reserved, 0);
    let j = serde_json::to_string(&d).unwrap();
    let back: PoolDescription = serde_json::from_str(&j).unwrap();
    assert_eq!(back, d);
}

/// Thin provisioning: ratio 1 refuses what ratio 2 allows.
pub fn thin_ratio(h: &dyn Harness) {
    for (ratio, ok) in [(1.0, false), (2.0, true)] {
        let f = h.pool(quota(GIB), ratio);
        make(&f.pool, "big", raw(768 * MIB), b"");
        match f.pool.reserve(512 * MIB, "second") {
            Ok(g) => {
                assert!(ok, "{}: ratio {ratio} must refuse", h.name());
                assert_eq!(g.bytes(), 512 * MIB);
                assert_eq!(f.pool.describe().unwrap().available, 2 * GIB - 1280 * MIB);
            }
            Err(Error::InsufficientSpace {
                needed, available, ..
            }) => {
                assert!(!ok, "{}: ratio {ratio} must allow", h.name());
                assert_eq!((needed, available), (512 * MIB, 256 * MIB));
                let msg = f.pool.reserve(512 * MIB, "x").unwrap_err().to_string();
                assert!(
                    msg.contains("536870912") && msg.contains("268435456"),
                    "{msg}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn grab(pool: &Pool, chunk: u64, tries: usize) -> Vec<Reservation> {
    let mut held = Vec::new();
    let mut refused = 0;
    while refused < tries {
        match pool.reserve(chunk, "race") {
            Ok(g) => held.push(g),
            Err(Error::InsufficientSpace {
                needed, available, ..
            }) => {
                assert_eq!(needed, chunk);
                assert!(available < needed);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    held
}

/// Eight threads (half sharing a handle, half with their own) race to
/// reserve: never more than the limit, and the limit is nearly reached.
pub fn eight_threads_race(h: &dyn Harness) {
    let limit = 1000 * MIB;
    let f = h.pool(quota(limit), 1.0);
    let reopen = Arc::new(f.reopen);
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let b = Arc::clone(&barrier);
            let p = if i % 2 == 0 { f.pool.clone() } else { reopen() };
            let chunk = (7 + i as u64 * 3) * MIB;
            std::thread::spawn(move || {
                b.wait();
                let held = grab(&p, chunk, 3);
                let sum: u64 = held.iter().map(|g| g.bytes()).sum();
                (sum, held)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|t| t.join().unwrap()).collect();
    let total: u64 = results.iter().map(|r| r.0).sum();
    assert!(total <= limit, "{}: overcommitted {total}", h.name());
    // Everyone was refused 3 times: what is left is below the largest chunk.
    assert!(
        limit - total < 28 * MIB,
        "{}: only {total} granted",
        h.name()
    );
    assert_eq!(f.pool.describe().unwrap().reserved, total);
    drop(results);
    assert_eq!(f.pool.describe().unwrap().reserved, 0);
}

/// Damaged records are listed (never hidden) with where and why; `get`
/// refuses them; good ones are unaffected.
pub fn damaged_records(h: &dyn Harness) {
    let f = h.pool(quota(100 * GIB), 1.0);
    for id in ["good1", "trunc", "garbage", "newer", "norecord", "good2"] {
        make(&f.pool, id, raw(MIB), b"");
    }
    let full = serde_json::to_vec_pretty(&Record::new(Vol {
        name: "trunc".into(),
        tag: 0,
    }))
    .unwrap();
    (f.damage)(EntryKind::Volume, "trunc", Some(&full[..full.len() / 2]));
    (f.damage)(EntryKind::Volume, "garbage", Some(b"\x00\xffnot json"));
    (f.damage)(
        EntryKind::Volume,
        "newer",
        Some(br#"{"schema_version": 99, "data": {"name": "n", "tag": 1}}"#),
    );
    (f.damage)(EntryKind::Volume, "norecord", None);
    for p in [f.pool.clone(), (f.reopen)()] {
        p.refresh().unwrap();
        let l = p
            .list::<Vol>(EntryKind::Volume, |_, v| v.name.starts_with("good"))
            .unwrap();
        let ok: Vec<_> = l
            .iter()
            .filter_map(|x| match x {
                Listed::Ok(e) => Some(e.id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(ok, ["good1", "good2"], "{}", h.name());
        let find = |id: &str| {
            l.iter()
                .find_map(|x| match x {
                    Listed::Damaged(d) if d.id == id => Some(d.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{id} not listed as damaged"))
        };
        assert!(find("trunc").reason.contains("invalid JSON"));
        assert!(find("garbage").reason.contains("invalid JSON"));
        assert!(find("newer").reason.contains("newer than the supported 2"));
        assert!(find("norecord").reason.contains("missing"));
        let d = p.describe().unwrap();
        // `newer` is damaged only for readers of this record type (a newer
        // reader could use it), so the pool-wide count leaves it out.
        assert_eq!((d.volumes, d.damaged), (6, 3));
        match p.get::<Vol>(EntryKind::Volume, "garbage") {
            Err(Error::Damaged { reason, .. }) => assert!(reason.contains("invalid JSON")),
            r => panic!("{r:?}"),
        }
        // The damaged entry's image is still counted and removable.
        assert_eq!(d.virtual_size, 6 * MIB);
    }
    f.pool.remove(EntryKind::Volume, "garbage").unwrap();
    assert_eq!(f.pool.describe().unwrap().damaged, 2);
}

/// Bad input is refused with the rule or reason, and changes nothing.
pub fn bad_input(h: &dyn Harness) {
    let f = h.pool(quota(10 * GIB), 1.0);
    let pool = &f.pool;
    let img = make(pool, "v", raw(4 * MIB), b"x");
    for bad in ["", "Upper", "a/b", "..", ".x", "sp ace", &"a".repeat(64)] {
        let st = pool.stage().unwrap();
        assert!(
            matches!(
                pool.commit(
                    st,
                    EntryKind::Volume,
                    bad,
                    &Vol {
                        name: "x".into(),
                        tag: 0
                    }
                ),
                Err(Error::InvalidName { .. })
            ),
            "{}: id {bad:?}",
            h.name()
        );
        let st = pool.stage().unwrap();
        assert!(matches!(
            st.create_image(bad, &raw(MIB), &Control::new()),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            pool.move_image(&img, EntryKind::Volume, "v", bad),
            Err(Error::InvalidName { .. })
        ));
    }
    // Twice the same id.
    let st = pool.stage().unwrap();
    assert!(matches!(
        pool.commit(
            st,
            EntryKind::Volume,
            "v",
            &Vol {
                name: "x".into(),
                tag: 0
            }
        ),
        Err(Error::EntryExists { .. })
    ));
    // Entries and images that do not exist.
    assert!(matches!(
        pool.write_record(
            EntryKind::Volume,
            "nope",
            &Vol {
                name: "x".into(),
                tag: 0
            }
        ),
        Err(Error::EntryNotFound { .. })
    ));
    assert!(matches!(
        pool.remove(EntryKind::Template, "v"),
        Err(Error::EntryNotFound { .. })
    ));
    let ghost = ImageRef::entry(EntryKind::Volume, "v", "ghost", Format::Raw);
    assert!(matches!(
        pool.image_summary(&ghost),
        Err(Error::ImageNotFound { .. })
    ));
    assert!(pool.open_image(&ghost, false).is_err());
    // Images: shrinking, qcow2 with preallocation, a smaller overlay.
    assert!(pool.grow_image(&img, MIB).is_err());
    let st = pool.stage().unwrap();
    let q = ImageSpec {
        size: MIB,
        format: Format::Qcow2,
        prealloc: Prealloc::Full,
    };
    assert!(matches!(
        st.create_image("q", &q, &Control::new()),
        Err(Error::InvalidImage { .. })
    ));
    assert!(matches!(
        st.create_linked("o", &img, Some(MIB)),
        Err(Error::InvalidImage { .. })
    ));
    // Writes through a read-only handle and past the end.
    let ro = pool.open_image(&img, false).unwrap();
    assert!(ro.write_at(b"x", 0).is_err());
    let rw = pool.open_image(&img, true).unwrap();
    assert!(rw.write_at(b"xy", 4 * MIB - 1).is_err());
    // Policies.
    for (cap, ratio) in [
        (quota(0), 1.0),
        (quota(1), 0.0),
        (quota(1), f64::NAN),
        (quota(1), 1e9),
    ] {
        assert!(matches!(
            pool.set_capacity(cap, ratio),
            Err(Error::InvalidSpec { .. })
        ));
    }
    // An inactive pool refuses volume work, then works again.
    pool.deactivate().unwrap();
    assert!(matches!(pool.reserve(1, "x"), Err(Error::Inactive { .. })));
    assert!(matches!(pool.stage(), Err(Error::Inactive { .. })));
    assert!(matches!(
        pool.open_image(&img, false),
        Err(Error::Inactive { .. })
    ));
    pool.activate().unwrap();
    let d = pool.describe().unwrap();
    assert_eq!((d.volumes, d.virtual_size, d.reserved), (1, 4 * MIB, 0));
    assert_eq!(read(pool, &img, 0, 1), b"x");
}

/// Abandoned work is released: a dropped staging area with images, a
/// dropped reservation, a failed commit; refresh then finds nothing left.
pub fn recovery(h: &dyn Harness) {
    let f = h.pool(quota(GIB), 1.0);
    let pool = &f.pool;
    let g = pool.reserve(800 * MIB, "held").unwrap();
    let st = pool.stage().unwrap();
    st.create_image(DATA_IMAGE, &raw(4 * MIB), &Control::new())
        .unwrap();
    let other = (f.reopen)();
    assert_eq!(other.describe().unwrap().reserved, 800 * MIB);
    assert!(other.recovered().is_empty(), "{:?}", other.recovered());
    assert!(matches!(
        other.reserve(300 * MIB, "x"),
        Err(Error::InsufficientSpace { available, .. }) if available == 224 * MIB
    ));
    drop((g, st));
    assert_eq!(other.describe().unwrap().reserved, 0);
    // A commit onto an existing id fails and leaves no entry behind.
    make(pool, "v", raw(MIB), b"");
    let st = pool.stage().unwrap();
    st.create_image(DATA_IMAGE, &raw(MIB), &Control::new())
        .unwrap();
    assert!(pool
        .commit(
            st,
            EntryKind::Volume,
            "v",
            &Vol {
                name: "x".into(),
                tag: 0
            }
        )
        .is_err());
    let d = other.refresh().unwrap();
    assert!(d.recovered.is_empty(), "{:?}", d.recovered);
    assert_eq!((d.volumes, d.virtual_size, d.reserved), (1, MIB, 0));
    pool.reserve(GIB - MIB, "all of it").unwrap();
}

/// Records are replaced atomically and other handles see the new one.
pub fn records_seen_by_other_handles(h: &dyn Harness) {
    let f = h.pool(quota(GIB), 1.0);
    let other = (f.reopen)();
    let img = make(&f.pool, "v", raw(4 * MIB), b"");
    let v = Vol {
        name: "renamed".into(),
        tag: 42,
    };
    f.pool.write_record(EntryKind::Volume, "v", &v).unwrap();
    let e = other.get::<Vol>(EntryKind::Volume, "v").unwrap();
    assert_eq!(e.record.data, v);
    assert_eq!(e.record.schema_version, 2);
    assert_eq!(e.image().unwrap().image, img);
    assert_eq!(e.image().unwrap().virtual_size, Some(4 * MIB));
    f.pool.grow_image(&img, 8 * MIB).unwrap();
    assert_eq!(other.describe().unwrap().virtual_size, 8 * MIB);
    f.pool.set_capacity(quota(2 * GIB), 2.0).unwrap();
    assert_eq!(other.config().unwrap().overcommit_ratio, 2.0);
    assert_eq!(other.describe().unwrap().limit, 4 * GIB);
    f.pool.remove(EntryKind::Volume, "v").unwrap();
    assert!(!other.contains(EntryKind::Volume, "v").unwrap());
    assert_eq!(other.describe().unwrap().virtual_size, 0);
}

/// A transaction's check and change are atomic against other handles, and
/// pool methods called inside it are refused instead of deadlocking.
pub fn transactions(h: &dyn Harness) {
    let f = h.pool(quota(GIB), 1.0);
    make(&f.pool, "v", raw(MIB), b"");
    let reopen = Arc::new(f.reopen);
    let winners: Vec<bool> = (0..4)
        .map(|_| {
            let p = reopen();
            std::thread::spawn(move || {
                p.transaction("claim", |t| {
                    let mut e = t.get::<Vol>(EntryKind::Volume, "v")?;
                    if e.record.data.tag != 0 {
                        return Ok(false);
                    }
                    e.record.data.tag = 1;
                    t.write_record(EntryKind::Volume, "v", &e.record.data)?;
                    Ok(true)
                })
                .unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(winners.iter().filter(|w| **w).count(), 1, "{}", h.name());
    let r = f
        .pool
        .transaction("nested", |_| f.pool.describe().map(|_| ()));
    assert!(matches!(r, Err(Error::Reentrant { .. })), "{r:?}");
}

/// The image store: create, write, link, copy, summarise, grow, move,
/// remove, attach — all by `ImageRef`.
pub fn image_store(h: &dyn Harness) {
    let f = h.pool(quota(10 * GIB), 2.0);
    let pool = &f.pool;
    // A template with data.
    let g = pool.reserve(64 * MIB, "template").unwrap();
    let st = pool.stage().unwrap();
    let spec = ImageSpec {
        size: 64 * MIB,
        format: Format::Qcow2,
        prealloc: Prealloc::Off,
    };
    let t = st.create_image(DATA_IMAGE, &spec, &Control::new()).unwrap();
    let io = st.open_image(&t, true).unwrap();
    io.write_at(&[0x11; 4096], 0).unwrap();
    io.write_at(&[0x22; 4096], 32 * MIB).unwrap();
    io.flush().unwrap();
    drop(io);
    pool.commit(
        st,
        EntryKind::Template,
        "base",
        &Vol {
            name: "base".into(),
            tag: 0,
        },
    )
    .unwrap();
    drop(g);
    let base = t.committed(EntryKind::Template, "base");
    // A linked clone, bigger than its base.
    let st = pool.stage().unwrap();
    let c = st
        .create_linked(DATA_IMAGE, &base, Some(128 * MIB))
        .unwrap();
    assert_eq!(c.format, pool.linked_format(), "{}", h.name());
    pool.commit(
        st,
        EntryKind::Volume,
        "clone",
        &Vol {
            name: "clone".into(),
            tag: 0,
        },
    )
    .unwrap();
    let clone = c.committed(EntryKind::Volume, "clone");
    let s = pool.image_summary(&clone).unwrap();
    assert_eq!(s.virtual_size, Some(128 * MIB), "{}", h.name());
    assert_eq!(s.backing.as_ref(), Some(&base), "{}: {s:?}", h.name());
    assert_eq!(read(pool, &clone, 0, 4096), vec![0x11; 4096]);
    // Writes to the clone do not reach the base.
    pool.open_image(&clone, true)
        .unwrap()
        .write_at(&[0x33; 4096], 0)
        .unwrap();
    assert_eq!(read(pool, &clone, 0, 4096), vec![0x33; 4096]);
    assert_eq!(read(pool, &base, 0, 4096), vec![0x11; 4096]);
    // A full copy of the clone: independent, chain flattened.
    let g = pool.reserve_physical(128 * MIB, "copy").unwrap();
    let st = pool.stage().unwrap();
    let c2 = st
        .copy_full(DATA_IMAGE, &clone, Format::Raw, &Control::new())
        .unwrap();
    pool.commit(
        st,
        EntryKind::Volume,
        "copy",
        &Vol {
            name: "copy".into(),
            tag: 0,
        },
    )
    .unwrap();
    drop(g);
    let copy = c2.committed(EntryKind::Volume, "copy");
    let s = pool.image_summary(&copy).unwrap();
    assert_eq!((s.virtual_size, s.backing.clone()), (Some(128 * MIB), None));
    assert_eq!(read(pool, &copy, 0, 4096), vec![0x33; 4096]);
    assert_eq!(read(pool, &copy, 32 * MIB, 4096), vec![0x22; 4096]);
    pool.remove(EntryKind::Volume, "clone").unwrap();
    assert_eq!(read(pool, &copy, 32 * MIB, 4096), vec![0x22; 4096]);
    // Grow.
    pool.grow_image(&copy, 256 * MIB).unwrap();
    assert_eq!(pool.open_image(&copy, false).unwrap().size(), 256 * MIB);
    assert_eq!(
        pool.get::<Vol>(EntryKind::Volume, "copy")
            .unwrap()
            .image()
            .unwrap()
            .virtual_size,
        Some(256 * MIB)
    );
    // External snapshot: move the top into a snapshot entry, put an
    // overlay on it in its place.
    let st = pool.stage().unwrap();
    pool.commit(
        st,
        EntryKind::Snapshot,
        "s1",
        &Vol {
            name: "s1".into(),
            tag: 0,
        },
    )
    .unwrap();
    let frozen = pool
        .move_image(&copy, EntryKind::Snapshot, "s1", DATA_IMAGE)
        .unwrap();
    assert!(pool
        .get::<Vol>(EntryKind::Volume, "copy")
        .unwrap()
        .images
        .is_empty());
    let st = pool.stage().unwrap();
    let top = st.create_linked(DATA_IMAGE, &frozen, None).unwrap();
    let top = pool
        .move_image(&top, EntryKind::Volume, "copy", DATA_IMAGE)
        .unwrap();
    drop(st);
    assert_eq!(
        pool.image_summary(&top).unwrap().backing,
        Some(frozen.clone())
    );
    assert_eq!(read(pool, &top, 32 * MIB, 4096), vec![0x22; 4096]);
    let d = pool.describe().unwrap();
    // Base 64 + snapshot 256 + overlay 256.
    assert_eq!(d.virtual_size, 576 * MIB, "{}", h.name());
    // Attach target, and removing one image of an entry.
    match pool.attach_target(&top).unwrap() {
        AttachTarget::File { format, .. } => assert_eq!(format, Format::Qcow2),
        AttachTarget::BlockIo { image } => assert_eq!(image, top),
        // RBD: what qemu's rbd driver opens (the image's own RBD name).
        AttachTarget::Rbd(t) => {
            assert!(!t.pool.is_empty() && !t.image.is_empty(), "{t:?}");
            assert_eq!(t.snapshot, None);
        }
        other => panic!("{other:?}"),
    }
    let st = pool.stage().unwrap();
    let extra = st
        .create_image("scratch", &raw(MIB), &Control::new())
        .unwrap();
    let extra = pool
        .move_image(&extra, EntryKind::Volume, "copy", "scratch")
        .unwrap();
    drop(st);
    assert_eq!(
        pool.get::<Vol>(EntryKind::Volume, "copy")
            .unwrap()
            .images
            .len(),
        2
    );
    pool.remove_image(&extra).unwrap();
    assert_eq!(
        pool.get::<Vol>(EntryKind::Volume, "copy")
            .unwrap()
            .images
            .len(),
        1
    );
    assert_eq!(pool.describe().unwrap().virtual_size, 576 * MIB);
}

/// Physical space: bytes that will really be written must fit in the free
/// space as well as the policy; thin work only in the policy. Scaled: a
/// storage of 80 "GiB" (MiB here) refuses 300 preallocated and accepts 300
/// sparse when the policy allows, for a filesystem pool and a quota pool.
pub fn physical_space(h: &dyn Harness) {
    const U: u64 = MIB;
    for capacity in [None, Some(1000 * U)] {
        let Some(f) = h.pool_on_space(80 * U, capacity, 4.0) else {
            return;
        };
        let pool = &f.pool;
        let d = pool.describe().unwrap();
        assert!(
            d.available >= 300 * U,
            "{}: policy must allow 300: {d:?}",
            h.name()
        );
        assert!(d.physical_available <= 80 * U);
        let full = ImageSpec {
            size: 300 * U,
            format: Format::Raw,
            prealloc: Prealloc::Full,
        };
        assert!(full.is_physical());
        match pool.reserve_physical(full.size, "create volume big") {
            Err(e @ Error::InsufficientPhysicalSpace { .. }) => {
                let Error::InsufficientPhysicalSpace {
                    needed,
                    available,
                    free,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*needed, 300 * U);
                assert!(*available <= 80 * U && *free <= 80 * U);
                let msg = e.to_string();
                assert!(msg.contains(&(300 * U).to_string()), "{msg}");
                assert!(msg.contains(&available.to_string()), "{msg}");
            }
            r => panic!("{}: {capacity:?}: {r:?}", h.name()),
        }
        // A physical reservation that fits is granted and shown; two cannot
        // share the same free bytes.
        let g = pool.reserve_physical(10 * U, "small").unwrap();
        assert!(g.is_physical());
        let d2 = pool.describe().unwrap();
        assert_eq!(d2.physical_reserved, 10 * U);
        assert_eq!(
            d2.physical_available,
            d2.fs_available.saturating_sub(10 * U)
        );
        match pool.reserve_physical(d2.physical_available + 1, "second") {
            Err(Error::InsufficientPhysicalSpace { reserved, .. }) => assert_eq!(reserved, 10 * U),
            r => panic!("{}: {r:?}", h.name()),
        }
        // Build the preallocated image the reservation is for: its bytes
        // are really taken, with progress reported; a cancelled one leaves
        // nothing behind.
        let st = pool.stage().unwrap();
        let pre = ImageSpec {
            size: 10 * U,
            format: Format::Raw,
            prealloc: Prealloc::Full,
        };
        let last = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
        let l2 = Arc::clone(&last);
        let ctl =
            Control::new().with_progress(move |done, total| *l2.lock().unwrap() = (done, total));
        let img = st.create_image(DATA_IMAGE, &pre, &ctl).unwrap();
        assert_eq!(*last.lock().unwrap(), (10 * U, 10 * U), "{}", h.name());
        assert!(st.image_summary(&img).unwrap().host_bytes >= 10 * U);
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ctl = Control::new().with_cancel(cancel);
        assert!(st.create_image("cancelled", &pre, &ctl).is_err());
        let gone = ImageRef {
            name: "cancelled".into(),
            ..img.clone()
        };
        assert!(matches!(
            st.image_summary(&gone),
            Err(Error::ImageNotFound { .. })
        ));
        pool.commit(
            st,
            EntryKind::Volume,
            "pre",
            &Vol {
                name: "pre".into(),
                tag: 0,
            },
        )
        .unwrap();
        drop(g);
        let d3 = pool.describe().unwrap();
        assert!(d3.physical >= 10 * U && d3.physical_reserved == 0, "{d3:?}");
        // Sparse: the policy alone decides.
        let sparse = raw(300 * U);
        assert!(!sparse.is_physical());
        make(pool, "big", sparse, b"data");
        let d = pool.describe().unwrap();
        assert_eq!(d.virtual_size, 310 * U);
        assert!(
            d.fs_available > 60 * U,
            "sparse image took real space: {d:?}"
        );
    }
}

/// Fencing: a holder whose lease lapsed is refused, saying why, and cannot
/// overwrite what the next holder did.
pub fn fencing(h: &dyn Harness) {
    let f = h.pool(quota(GIB), 1.0);
    let Some(lapse) = f.lapse_lease.as_ref() else {
        eprintln!(
            "{}: the lock is not a lease (cannot lapse while held): nothing to fence",
            h.name()
        );
        return;
    };
    make(&f.pool, "v", raw(MIB), b"");
    let other = (f.reopen)();
    let r = f.pool.transaction("slow update", |t| {
        let mut e = t.get::<Vol>(EntryKind::Volume, "v")?;
        lapse();
        // Meanwhile another holder (another thread: this one holds the
        // pool) takes the pool and writes.
        std::thread::scope(|s| {
            s.spawn(|| {
                other
                    .write_record(
                        EntryKind::Volume,
                        "v",
                        &Vol {
                            name: "newer".into(),
                            tag: 2,
                        },
                    )
                    .unwrap()
            })
            .join()
            .unwrap()
        });
        e.record.data.tag = 1;
        t.write_record(EntryKind::Volume, "v", &e.record.data)
    });
    match r {
        Err(e @ Error::Fenced { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("refused") && msg.contains("lease"), "{msg}");
            assert!(msg.contains("lapsed") || msg.contains("expired"), "{msg}");
        }
        r => panic!("{}: stale write not refused: {r:?}", h.name()),
    }
    let e = other.get::<Vol>(EntryKind::Volume, "v").unwrap();
    assert_eq!(e.record.data.tag, 2, "the newer holder's write survived");
    // A lease that lapsed with nobody else around is refused too.
    let r = f.pool.transaction("reserve late", |t| {
        lapse();
        t.reserve(1, "late").map(|_| ())
    });
    assert!(matches!(r, Err(Error::Fenced { .. })), "{r:?}");
    f.pool.reserve(1, "fresh lease").unwrap();
}

/// Compaction through the image store: zero clusters and unused ranges are
/// dropped, the content stays (unused ranges read as zeros), an overlay
/// keeps hiding its base where it holds zeros, raw images are refused, and
/// the figures follow. Also `require_room`: a check without a record.
pub fn compaction(h: &dyn Harness) {
    let f = h.pool(quota(10 * GIB), 1.0);
    let pool = &f.pool;
    let q = |size| ImageSpec {
        size,
        format: Format::Qcow2,
        prealloc: Prealloc::Off,
    };
    let base = make(pool, "base", q(16 * MIB), &[0x44; 4 * MIB as usize]);
    let img = make(pool, "v", q(16 * MIB), &[0x55; 4 * MIB as usize]);
    {
        let io = pool.open_image(&img, true).unwrap();
        // A cluster of zeros, written as data.
        io.write_at(&vec![0u8; MIB as usize], MIB).unwrap();
        io.flush().unwrap();
    }
    let before = pool.image_summary(&img).unwrap().host_bytes;
    let opts = CompactOptions {
        compression: None,
        threads: 1,
        unused_ranges: vec![ByteRange::new(2 * MIB, MIB)],
    };
    let rep = pool.compact_image(&img, &opts, &Control::new()).unwrap();
    assert_eq!(rep.bytes_before, before, "{}", h.name());
    assert!(rep.bytes_after < rep.bytes_before, "{}: {rep:?}", h.name());
    assert!(
        rep.dropped_clusters >= 2 * MIB / (64 << 10),
        "{}: {rep:?}",
        h.name()
    );
    assert_eq!(read(pool, &img, 0, 4096), vec![0x55; 4096]);
    assert_eq!(read(pool, &img, MIB, 4096), vec![0; 4096]);
    assert_eq!(read(pool, &img, 2 * MIB + 4096, 4096), vec![0; 4096]);
    assert_eq!(read(pool, &img, 3 * MIB, 4096), vec![0x55; 4096]);
    let summary = pool.image_summary(&img).unwrap();
    assert_eq!(summary.host_bytes, rep.bytes_after, "{}", h.name());
    // An overlay whose zeros hide its base's data keeps hiding it.
    let st = pool.stage().unwrap();
    let o = st.create_linked(DATA_IMAGE, &base, None).unwrap();
    {
        let io = st.open_image(&o, true).unwrap();
        io.write_at(&vec![0u8; MIB as usize], 0).unwrap();
        io.flush().unwrap();
    }
    pool.commit(
        st,
        EntryKind::Volume,
        "o",
        &Vol {
            name: "o".into(),
            tag: 0,
        },
    )
    .unwrap();
    let o = o.committed(EntryKind::Volume, "o");
    pool.compact_image(&o, &CompactOptions::default(), &Control::new())
        .unwrap();
    assert_eq!(read(pool, &o, 4096, 4096), vec![0; 4096], "{}", h.name());
    assert_eq!(read(pool, &o, 2 * MIB, 4096), vec![0x44; 4096]);
    // Raw images have no cluster map to compact.
    let r = make(pool, "r", raw(MIB), b"x");
    let e = pool
        .compact_image(&r, &CompactOptions::default(), &Control::new())
        .unwrap_err();
    assert!(matches!(e, Error::InvalidImage { .. }), "{}: {e}", h.name());
    // require_room: refuses past the limit, records nothing.
    let e = pool
        .transaction("room", |t| t.require_room(100 * GIB))
        .unwrap_err();
    assert!(matches!(e, Error::InsufficientSpace { .. }), "{e}");
    pool.transaction("room", |t| t.require_room(MIB)).unwrap();
    assert_eq!(pool.describe().unwrap().reservations, 0);
}
