//! SIGKILL of a host process at random points of create / linked create
//! (clone) / snapshot (native: an RBD snapshot; or external: move +
//! overlay) / delete on an RBD pool: after its leases lapse, another host
//! opens the pool, and its recovery must leave no RBD image of no entry, no
//! RBD snapshot that is neither a clone's parent nor an entry's native
//! snapshot, no held image no snapshot needs, no damaged record, no live
//! staging area, and every entry readable.
//!
//! Several namespaces are worked at once (each its own killed worker process
//! and its own checking host, all in one cluster), so that the 200+
//! kills fit in CI. The worker prints a phase marker before each step; the
//! parent records the last one seen at each kill, and every phase group
//! (create, clone, snapshot, delete) must have been hit.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use vmvol_format::{Control, Format};
use vmvol_pool::backend::Liveness;
use vmvol_pool::*;
use vmvol_rbd::{RbdBackend, RbdOptions};

use crate::cluster::{cluster, namespace, Cluster};
use crate::conformance::{define, open};
use crate::suite::{raw, Vol};

const WORKER: &str = "VMVOL_RBD_TEST_CRASH_WORKER";
/// The killed host's lease: the checking host waits this long after a kill.
const WORKER_LEASE: Duration = Duration::from_millis(1000);
/// Namespaces worked in parallel.
const NAMESPACES: usize = 4;
/// Kills of a run (`VMVOL_RBD_CRASH_ITERS` overrides).
const DEFAULT_KILLS: usize = 200;
/// A kill lands this long (uniformly at random) after the worker is ready.
const KILL_WINDOW_MS: u64 = 1200;

fn vol(id: &str) -> Vol {
    Vol {
        name: id.into(),
        tag: 0,
    }
}

/// The killed host: deletes some leftovers of earlier workers, then
/// creates, links, snapshots and deletes until killed, printing
/// `phase <group>:<step>` before each step.
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
    let b = Arc::new(RbdBackend::open(&spec, opts).unwrap());
    println!("client {}", b.client_address());
    let pool = Pool::with_backend(b, Wait::Block).unwrap();
    let base = ImageRef::entry(EntryKind::Template, "base", DATA_IMAGE, Format::Raw);
    // What earlier workers left (volumes first: a snapshot entry's image
    // is the base of a linked volume's): a few entries go first, which
    // keeps the pool small and deletes clones whose parents have
    // snapshots.
    let ids = |kind| -> Vec<String> {
        let listed = pool.list::<Vol>(kind, |id, _| id.starts_with('w')).unwrap();
        listed
            .into_iter()
            .map(|l| match l {
                Listed::Ok(e) => e.id,
                Listed::Damaged(d) => d.id,
            })
            .collect()
    };
    let (old_volumes, old_snapshots) = (ids(EntryKind::Volume), ids(EntryKind::Snapshot));
    println!("ready");
    let phase = |p: &str| println!("phase {p}");
    for v in old_volumes.iter().take(3) {
        phase("delete:old-volume");
        let _ = pool.remove(EntryKind::Volume, v);
    }
    for s in old_snapshots.iter().take(2) {
        phase("delete:old-snapshot");
        let _ = pool.remove(EntryKind::Snapshot, s);
    }
    for i in 0u64.. {
        let id = format!("w{seed}-{i}");
        let (l, s) = (format!("{id}-l"), format!("{id}-s"));
        let _ = (|| -> Result<()> {
            phase("create:image");
            let st = pool.stage()?;
            st.create_image(DATA_IMAGE, &raw(4 << 20), &Control::new())?;
            phase("create:commit");
            pool.commit(st, EntryKind::Volume, &id, &vol(&id))?;
            phase("clone:link");
            let st = pool.stage()?;
            let img = st.create_linked(DATA_IMAGE, &base, None)?;
            phase("clone:commit");
            pool.commit(st, EntryKind::Volume, &l, &vol(&l))?;
            let img = img.committed(EntryKind::Volume, &l);
            let native = i % 3 != 2;
            let from = format!("{id}-c");
            if native {
                // What the volume layer does on RBD: an RBD snapshot of the
                // volume's image, staged and committed as the entry, and a
                // volume linked to it.
                phase("snapshot:native");
                let st = pool.stage()?;
                st.snapshot_image(DATA_IMAGE, &img)?;
                phase("snapshot:commit-native");
                pool.commit(st, EntryKind::Snapshot, &s, &vol(&s))?;
                let snap = ImageRef::entry(EntryKind::Snapshot, &s, DATA_IMAGE, Format::Raw);
                phase("clone:from-snapshot");
                let st = pool.stage()?;
                st.create_linked(DATA_IMAGE, &snap, None)?;
                phase("clone:commit-from-snapshot");
                pool.commit(st, EntryKind::Volume, &from, &vol(&from))?;
            } else {
                // An external snapshot (records of earlier versions): the
                // top moves into a snapshot entry and a new overlay on it
                // takes its place.
                phase("snapshot:entry");
                pool.commit(pool.stage()?, EntryKind::Snapshot, &s, &vol(&s))?;
                phase("snapshot:move");
                let frozen = pool.move_image(&img, EntryKind::Snapshot, &s, DATA_IMAGE)?;
                phase("snapshot:overlay");
                let st = pool.stage()?;
                let top = st.create_linked(DATA_IMAGE, &frozen, None)?;
                phase("snapshot:move-overlay");
                pool.move_image(&top, EntryKind::Volume, &l, DATA_IMAGE)?;
                drop(st);
            }
            phase("delete:volume");
            pool.remove(EntryKind::Volume, &id)?;
            if i % 2 == 0 {
                // Native: the linked volume's image is held for the
                // snapshot, and goes with it.
                phase("delete:linked");
                pool.remove(EntryKind::Volume, &l)?;
                if native {
                    phase("delete:from-snapshot");
                    pool.remove(EntryKind::Volume, &from)?;
                }
                phase("delete:snapshot");
                pool.remove(EntryKind::Snapshot, &s)?;
            }
            Ok(())
        })();
    }
}

/// Runs `rbd ARGS` and parses its JSON output. A tool that dies of a
/// signal is run once more: Pacific's CLI now and then aborts in a
/// librados thread (`std::system_error` from its io_context pool) after
/// thousands of runs, which says nothing about the pool under test.
fn rbd_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    for attempt in 0..2 {
        let out = Command::new("rbd")
            .env("CEPH_CONF", &c.conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("rbd: {e}"));
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let signalled = std::os::unix::process::ExitStatusExt::signal(&out.status).is_some();
        assert!(
            signalled && attempt == 0,
            "rbd {args:?}: {}: {stderr}",
            out.status
        );
        eprintln!(
            "rbd {args:?} died ({}), once more; its last words: {}",
            out.status,
            stderr.lines().take(3).collect::<Vec<_>>().join(" | ")
        );
    }
    unreachable!()
}

/// Prints what the real tools say about an image recovery left.
fn diagnose(c: &Cluster, spec: &RbdSpec, image: &str) {
    let full = format!("{}/{}/{image}", spec.pool, spec.namespace);
    for args in [
        vec!["rbd", "status", full.as_str()],
        vec!["rbd", "lock", "ls", full.as_str()],
        vec!["rbd", "info", full.as_str()],
        vec!["rbd", "snap", "ls", full.as_str()],
        vec!["ceph", "osd", "blocklist", "ls"],
    ]
    .into_iter()
    .chain(["vmvol.pool", "rbd_directory"].map(|obj| {
        let (pool, ns) = (spec.pool.as_str(), spec.namespace.as_str());
        vec![
            "rados",
            "--pool",
            pool,
            "--namespace",
            ns,
            "listomapvals",
            obj,
        ]
    })) {
        let out = Command::new(args[0])
            .env("CEPH_CONF", &c.conf)
            .args(&args[1..])
            .output()
            .unwrap();
        eprintln!(
            "DIAG {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// What one namespace's campaign saw.
#[derive(Default)]
struct Tally {
    kills: usize,
    /// Kills by the last phase marker seen ("start": before the first).
    phases: BTreeMap<String, usize>,
    /// Time from spawn to "ready", and from the lease's end to checked.
    ready: Duration,
    checked: Duration,
    /// What the checking hosts' recoveries did, by kind.
    recovered: BTreeMap<String, usize>,
    /// Images a stranded watch of a dead worker kept (see `check`).
    stuck: BTreeSet<String>,
}

/// The checking host, after a kill and the lease: open (recovery), then
/// every invariant, in process and with one run of the real tool.
fn check(c: &Cluster, spec: &RbdSpec, b: &Arc<RbdBackend>, round: &str, tally: &mut Tally) {
    // The dead host's leases (its session, its staging area) lapse within
    // a lease of the kill, give or take how late the OSD ran its last
    // renewal on a loaded machine: wait for exactly that, not a guess.
    let until = Instant::now() + WORKER_LEASE * 10;
    while b.live_clients().unwrap() > 1 || b.live_staging().unwrap() > 0 {
        assert!(
            Instant::now() < until,
            "{round}: the dead worker's leases did not lapse in {:?}",
            WORKER_LEASE * 10
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut pool = Pool::with_backend(b.clone(), Wait::Block)
        .unwrap_or_else(|e| panic!("{round}: the next host's open (recovery) failed: {e}"));
    // An OSD may keep the watch of a client killed while registering it,
    // blocklisted or not: until its watch timeout (30 s) for the usual
    // kind, until the OSD reloads the object for the kind recorded after
    // the connection was gone (decisions.md, fencing). RBD refuses to
    // remove an image with a watcher, so recovery reports it and leaves it
    // for the next one: later opens retry for a while, and what is still
    // watched by nobody but blocklisted dead workers is counted as stuck
    // and left out of the checks below (a bounded number per campaign).
    let deadline = Instant::now() + Duration::from_secs(35);
    let left = |p: &Pool| {
        p.recovered()
            .iter()
            .any(|r| r.what.contains("left for the next"))
    };
    if left(&pool) {
        eprintln!(
            "{round}: recovery left work for the next: {:?}",
            pool.recovered()
        );
        *tally
            .recovered
            .entry("(a second recovery needed)".into())
            .or_default() += 1;
    }
    while left(&pool) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        pool = Pool::with_backend(b.clone(), Wait::Block)
            .unwrap_or_else(|e| panic!("{round}: a later open (recovery) failed: {e}"));
    }
    let rec = pool.recovered();
    let stuck: BTreeSet<String> = rec
        .iter()
        .filter(|r| r.what.starts_with("still watched by a blocklisted client"))
        .filter_map(|r| Some(r.path.to_str()?.rsplit('/').next()?.to_string()))
        .collect();
    for n in &stuck {
        eprintln!("{round}: stuck watch on {n}: {rec:?}");
        diagnose(c, spec, n);
        tally.stuck.insert(n.clone());
    }
    for r in &rec {
        if r.what.contains("left for the next") || r.what.contains("more ") {
            eprintln!("{round}: recovery: {}: {}", r.path.display(), r.what);
        }
        let what = r.what.split(':').next().unwrap_or_default().to_string();
        *tally.recovered.entry(what).or_default() += 1;
    }
    let d = pool.describe().unwrap();
    assert_eq!(d.damaged, 0, "{round}: damaged entries: {d:?}; {rec:?}");
    assert_eq!(
        pool.backend().live_staging().unwrap(),
        0,
        "{round}: live staging after recovery; {rec:?}"
    );
    // In process: every image belongs to an entry.
    let names: BTreeSet<String> = b.connection().list_images().unwrap().into_iter().collect();
    let mut entries = BTreeSet::new();
    // Every committed entry's images read.
    for kind in EntryKind::ALL {
        for l in pool.list::<Vol>(kind, |_, _| true).unwrap() {
            let Listed::Ok(e) = l else {
                panic!("{round}: damaged entry")
            };
            entries.insert((kind.dir_name(), e.id.clone()));
            for i in &e.images {
                let io = pool
                    .open_image(&i.image, false)
                    .unwrap_or_else(|err| panic!("{round}: {} does not open: {err}", i.image));
                let mut buf = [0u8; 512];
                io.read_at(&mut buf, 0)
                    .unwrap_or_else(|err| panic!("{round}: {} does not read: {err}", i.image));
            }
        }
    }
    // Native snapshots: each of an entry, its image there (held images
    // only for them).
    let mut native_snaps = BTreeSet::new();
    let mut held_needed = BTreeSet::new();
    for n in b.native_snapshots_of_pool().unwrap() {
        let ImageOwner::Entry { kind, id } = &n.image.owner else {
            panic!("{round}: staged native snapshot {n:?}")
        };
        assert!(
            entries.contains(&(kind.dir_name(), id.clone())),
            "{round}: native snapshot of no entry: {n:?}; {rec:?}"
        );
        let img = n
            .rbd_image
            .clone()
            .unwrap_or_else(|| panic!("{round}: native snapshot of no image: {n:?}"));
        if img.starts_with("h+") {
            held_needed.insert(img.clone());
        }
        native_snaps.insert((img, n.rbd_snapshot.clone()));
    }
    for n in names.iter().filter(|n| !stuck.contains(*n)) {
        if n.starts_with("h+") {
            if !held_needed.contains(n) {
                diagnose(c, spec, n);
            }
            assert!(
                held_needed.contains(n),
                "{round}: held image no snapshot needs: {n}; {rec:?}"
            );
            continue;
        }
        let parts: Vec<&str> = n.split('+').collect();
        let ok = parts[0] == "v" && entries.contains(&(parts[1], parts[2].to_string()));
        if !ok {
            diagnose(c, spec, n);
        }
        assert_eq!(parts[0], "v", "{round}: staged image left: {n}; {rec:?}");
        assert!(ok, "{round}: image of no entry left: {n}; {rec:?}");
    }
    // The real tool: `rbd ls -l` opens every image and lists its snapshots
    // (one row each) and its parent. It must show the same images, and
    // every snapshot must be some image's parent or a native snapshot, and
    // every native snapshot must be there.
    let rows = rbd_json(
        c,
        &[
            "ls",
            "-l",
            "--format",
            "json",
            "--pool",
            &spec.pool,
            "--namespace",
            &spec.namespace,
        ],
    );
    let rows = rows.as_array().unwrap();
    let str_of = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_string);
    let listed: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.get("snapshot").is_none())
        .filter_map(|r| str_of(r, "image"))
        .collect();
    assert_eq!(
        listed, names,
        "{round}: `rbd ls -l` (which opens each image) and librbd's list differ; {rec:?}"
    );
    let parents: BTreeSet<(String, String)> = rows
        .iter()
        .filter_map(|r| {
            let p = r.get("parent")?;
            assert_eq!(p["pool_namespace"].as_str(), Some(spec.namespace.as_str()));
            Some((str_of(p, "image")?, str_of(p, "snapshot")?))
        })
        .collect();
    let mut listed_snaps = BTreeSet::new();
    for r in rows.iter().filter(|r| r.get("snapshot").is_some()) {
        let (img, snap) = (str_of(r, "image").unwrap(), str_of(r, "snapshot").unwrap());
        if stuck.contains(&img) {
            continue;
        }
        let key = (img.clone(), snap.clone());
        assert!(
            parents.contains(&key) || native_snaps.contains(&key),
            "{round}: snapshot {img}@{snap} has no clone and is no entry's; {rec:?}"
        );
        listed_snaps.insert(key);
    }
    for n in &native_snaps {
        assert!(
            listed_snaps.contains(n),
            "{round}: native snapshot {n:?} not listed by `rbd ls -l`; {rec:?}"
        );
    }
}

/// One namespace: `kills` rounds of spawn, random wait, SIGKILL, lease,
/// check. Stops early once `stop` is set (another namespace failed).
fn campaign(c: &'static Cluster, n: usize, kills: usize, stop: &AtomicBool) -> Tally {
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 16 << 30 }, 100.0);
    // The checking host: one client for the whole campaign, a host that
    // outlives the killed ones and opens the pool (recovery) after each
    // kill. (A client per check would also mean a librados shutdown per
    // kill: Pacific's librados now and then aborts the process in one,
    // `std::system_error` thrown in an io_context_pool thread.)
    let host = open(&spec);
    {
        let pool = Pool::with_backend(host.clone(), Wait::Block).unwrap();
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
    let mut tally = Tally::default();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
    for k in 0..kills {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let round = format!("namespace {} kill {k}", spec.namespace);
        let spawned = Instant::now();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash::crash_worker",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER, serde_json::to_string(&(&spec, k)).unwrap())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // A reader keeps the last phase marker; "ready" is signalled.
        let last = Arc::new(Mutex::new(String::from("start")));
        let (tx, rx) = mpsc::channel();
        let reader = {
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let last = Arc::clone(&last);
            let round = round.clone();
            std::thread::spawn(move || {
                for line in out.lines() {
                    let Ok(line) = line else { break };
                    if let Some(a) = line.split("client ").nth(1) {
                        eprintln!("{round}: worker client {a}");
                    }
                    if let Some(p) = line.split("phase ").nth(1) {
                        *last.lock().unwrap() = p.trim().to_string();
                    } else if line.contains("ready") {
                        let _ = tx.send(());
                    }
                }
            })
        };
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("{round}: the worker never got ready (its pool open failed?): {st}");
        }
        tally.ready += spawned.elapsed();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % KILL_WINDOW_MS));
        assert!(
            child.try_wait().unwrap().is_none(),
            "{round}: the worker ended by itself"
        );
        child.kill().unwrap();
        let killed = Instant::now();
        child.wait().unwrap();
        reader.join().unwrap();
        tally.kills += 1;
        let p = last.lock().unwrap().clone();
        *tally.phases.entry(p).or_default() += 1;
        // Another host, once the dead one's leases lapsed.
        std::thread::sleep((killed + WORKER_LEASE).saturating_duration_since(Instant::now()));
        let t = Instant::now();
        check(c, &spec, &host, &round, &mut tally);
        tally.checked += t.elapsed();
    }
    // No marker of a dead operation is left behind (the pool object's keys:
    // l.* link snapshots, s.* staging areas, v.* reservations).
    let keys = crate::cluster::ceph(
        c,
        "rados",
        &[
            "--pool",
            &spec.pool,
            "--namespace",
            &spec.namespace,
            "listomapkeys",
            "vmvol.pool",
        ],
    );
    let keys = String::from_utf8_lossy(&keys);
    let left: Vec<&str> = keys
        .lines()
        .filter(|k| k.starts_with("l.") || k.starts_with("s.") || k.starts_with("v."))
        .collect();
    assert!(
        left.is_empty() || stop.load(Ordering::SeqCst),
        "namespace {}: markers left: {left:?}",
        spec.namespace
    );
    tally
}

#[test]
fn sigkill_recovery() {
    let Some(c) = cluster() else { return };
    let kills: usize = std::env::var("VMVOL_RBD_CRASH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_KILLS);
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..NAMESPACES)
            .map(|n| {
                let share = kills / NAMESPACES + usize::from(n < kills % NAMESPACES);
                let stop = &stop;
                s.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        campaign(c, n, share, stop)
                    }));
                    if r.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    r
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = Tally::default();
    for r in results {
        let t = r.unwrap_or_else(|p| std::panic::resume_unwind(p));
        total.kills += t.kills;
        total.ready += t.ready;
        total.checked += t.checked;
        for (p, n) in t.phases {
            *total.phases.entry(p).or_default() += n;
        }
        for (p, n) in t.recovered {
            *total.recovered.entry(p).or_default() += n;
        }
        total.stuck.extend(t.stuck);
    }
    let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
    for (p, n) in &total.phases {
        *groups.entry(p.split(':').next().unwrap_or("")).or_default() += n;
    }
    let per = |d: Duration| d.as_millis() / total.kills.max(1) as u128;
    eprintln!(
        "sigkill_recovery: {} kills in {:.1} s over {NAMESPACES} namespaces (worker ready \
         after {} ms, recovery + checks {} ms, per kill); last phase at the kill: {:?}; \
         recovery did: {:?}; stranded watches kept: {:?}",
        total.kills,
        t0.elapsed().as_secs_f64(),
        per(total.ready),
        per(total.checked),
        total.phases,
        total.recovered,
        total.stuck
    );
    assert_eq!(total.kills, kills);
    // A stranded watch is Ceph's, and rare: a few per campaign at most.
    assert!(
        total.stuck.len() <= (kills / 50).max(1),
        "images kept by stranded watches: {:?}",
        total.stuck
    );
    // Every phase group was hit (a few times once there are enough kills).
    let least = (kills / 40).max(1);
    for g in ["create", "clone", "snapshot", "delete"] {
        let hit = groups.get(g).copied().unwrap_or(0);
        assert!(
            hit >= least,
            "kills in phase group {g}: {hit} < {least}; {:?}",
            total.phases
        );
    }
}
