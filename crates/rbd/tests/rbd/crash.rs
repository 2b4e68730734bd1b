//! SIGKILL of a host process at random points of create / link / snapshot
//! (move + overlay) / delete: after its lease lapses, the recovery another
//! host runs leaves no image of no entry and no link snapshot without a
//! clone, and every entry reads.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use vmvol_format::{Control, Format};
use vmvol_pool::*;
use vmvol_rbd::{RbdBackend, RbdOptions};

use crate::cluster::{ceph, cluster, namespace};
use crate::conformance::{define, open};
use crate::suite::{raw, Vol};

const WORKER: &str = "VMVOL_RBD_TEST_CRASH_WORKER";
const WORKER_LEASE: Duration = Duration::from_secs(1);

fn vol(id: &str) -> Vol {
    Vol {
        name: id.into(),
        tag: 0,
    }
}

/// The killed host: creates, links, snapshots and deletes until killed.
#[test]
fn crash_worker() {
    let Some(s) = std::env::var_os(WORKER) else {
        return; // only meaningful as a child of sigkill_recovery
    };
    let (spec, seed): (RbdSpec, u64) = serde_json::from_slice(s.as_encoded_bytes()).unwrap();
    let opts = RbdOptions {
        lease: WORKER_LEASE,
        ..RbdOptions::default()
    };
    let pool = Pool::with_backend(
        Arc::new(RbdBackend::open(&spec, opts).unwrap()),
        Wait::Block,
    )
    .unwrap();
    let base = ImageRef::entry(EntryKind::Template, "base", DATA_IMAGE, Format::Raw);
    println!("ready");
    for i in 0u64.. {
        let id = format!("w{seed}-{i}");
        let (l, s) = (format!("{id}-l"), format!("{id}-s"));
        let _ = (|| -> Result<()> {
            let st = pool.stage()?;
            st.create_image(DATA_IMAGE, &raw(4 << 20), &Control::new())?;
            pool.commit(st, EntryKind::Volume, &id, &vol(&id))?;
            let st = pool.stage()?;
            let img = st.create_linked(DATA_IMAGE, &base, None)?;
            pool.commit(st, EntryKind::Volume, &l, &vol(&l))?;
            let img = img.committed(EntryKind::Volume, &l);
            // An external snapshot: the top moves into a snapshot entry and
            // a new overlay on it takes its place.
            pool.commit(pool.stage()?, EntryKind::Snapshot, &s, &vol(&s))?;
            let frozen = pool.move_image(&img, EntryKind::Snapshot, &s, DATA_IMAGE)?;
            let st = pool.stage()?;
            let top = st.create_linked(DATA_IMAGE, &frozen, None)?;
            pool.move_image(&top, EntryKind::Volume, &l, DATA_IMAGE)?;
            drop(st);
            pool.remove(EntryKind::Volume, &id)?;
            if i % 2 == 0 {
                pool.remove(EntryKind::Volume, &l)?;
                pool.remove(EntryKind::Snapshot, &s)?;
            }
            Ok(())
        })();
    }
}

fn rbd_json(c: &crate::cluster::Cluster, args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ceph(c, "rbd", args)).unwrap()
}

#[test]
#[ignore = "known to fail intermittently (issue 13 open): after some kills the next host's \
            open or a Ceph CLI check fails; run with `cargo test -p vmvol-rbd -- --ignored`"]
fn sigkill_recovery() {
    let Some(c) = cluster() else { return };
    let iters: u64 = std::env::var("VMVOL_RBD_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 16 << 30 }, 100.0);
    {
        let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
        pool.activate().unwrap();
        let st = pool.stage().unwrap();
        let b = st
            .create_image(DATA_IMAGE, &raw(4 << 20), &Control::new())
            .unwrap();
        st.open_image(&b, true)
            .unwrap()
            .write_at(&[7u8; 4096], 0)
            .unwrap();
        pool.commit(st, EntryKind::Template, "base", &vol("base"))
            .unwrap();
    }
    let full = |n: &str| format!("{}/{}/{n}", spec.pool, spec.namespace);
    let mut rng = 0x9e3779b97f4a7c15u64;
    for seed in 0..iters {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash::crash_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER, serde_json::to_string(&(&spec, seed)).unwrap())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("ready") {
            line.clear();
            if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
                break;
            }
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(20 + rng % 700));
        child.kill().unwrap();
        child.wait().unwrap();
        // Another host, after the dead one's leases lapsed.
        std::thread::sleep(WORKER_LEASE + Duration::from_millis(300));
        let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
        let d = pool.describe().unwrap();
        assert_eq!(d.damaged, 0, "iteration {seed}: {d:?}");
        assert_eq!(pool.backend().live_staging().unwrap(), 0);
        // Every image belongs to an entry; every link snapshot has a clone.
        let images = rbd_json(
            c,
            &[
                "ls",
                "--format",
                "json",
                "--pool",
                &spec.pool,
                "--namespace",
                &spec.namespace,
            ],
        );
        for n in images.as_array().unwrap() {
            let n = n.as_str().unwrap();
            let parts: Vec<&str> = n.split('+').collect();
            assert_eq!(parts[0], "v", "iteration {seed}: staged image left: {n}");
            let kind = EntryKind::ALL
                .into_iter()
                .find(|k| k.dir_name() == parts[1])
                .unwrap();
            assert!(
                pool.contains(kind, parts[2]).unwrap(),
                "iteration {seed}: image of no entry left: {n}"
            );
            let snaps = rbd_json(c, &["snap", "ls", "--format", "json", &full(n)]);
            for s in snaps.as_array().unwrap() {
                let sn = s["name"].as_str().unwrap();
                let kids = ceph(c, "rbd", &["children", &format!("{}@{sn}", full(n))]);
                assert!(
                    !kids.is_empty(),
                    "iteration {seed}: snapshot {n}@{sn} has no clone"
                );
            }
        }
        // Every committed entry's images read.
        for kind in EntryKind::ALL {
            for l in pool.list::<Vol>(kind, |_, _| true).unwrap() {
                let Listed::Ok(e) = l else {
                    panic!("iteration {seed}: damaged entry")
                };
                for i in &e.images {
                    let io = pool.open_image(&i.image, false).unwrap();
                    let mut b = [0u8; 512];
                    io.read_at(&mut b, 0).unwrap();
                }
            }
        }
    }
}
