//! Races between processes and threads.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmvol_pool::{Registry, Wait};
use vmvol_volume::{ListFilter, VolumeRow, Volumes};

use crate::crash::{spawn_child, Rng};
use crate::model::{apply, Op};
use crate::support::*;

#[test]
fn two_processes_same_name_exactly_one_wins() {
    let env = Env::new();
    for round in 0..4 {
        let name = format!("same{round}");
        let _ = std::fs::remove_file(env.root().join("go"));
        let kids: Vec<_> = (0..2)
            .map(|_| spawn_child("create-same", &env.root(), &name))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(env.root().join("go"), b"").unwrap();
        let outs: Vec<String> = kids
            .into_iter()
            .map(|k| String::from_utf8(k.wait_with_output().unwrap().stdout).unwrap())
            .collect();
        let won = outs.iter().filter(|o| o.contains("RESULT WON")).count();
        let lost = outs
            .iter()
            .filter(|o| o.contains("RESULT LOST AlreadyExists"))
            .count();
        assert_eq!((won, lost), (1, 1), "{outs:?}");
        let rows = env
            .reopen()
            .list_volumes(&ListFilter {
                name: Some(name.clone()),
                ..ListFilter::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
    }
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn eight_threads_never_overcommit_or_lose_records() {
    // A small quota so that reservations collide with the limit.
    let env = Env::with_quota(24 * MIB);
    let stop = Arc::new(AtomicBool::new(false));
    let root = env.root();
    let watcher = {
        let stop = Arc::clone(&stop);
        let root = root.clone();
        std::thread::spawn(move || {
            let p = Registry::open(&root)
                .unwrap()
                .open_pool("default", Wait::Block)
                .unwrap();
            let mut samples = 0;
            while !stop.load(Ordering::Relaxed) {
                let d = p.describe().unwrap();
                assert!(
                    d.allocation <= d.limit,
                    "overcommitted: {} > {}",
                    d.allocation,
                    d.limit
                );
                samples += 1;
            }
            samples
        })
    };
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let root = root.clone();
            std::thread::spawn(move || {
                // Each thread its own handle, like a separate process.
                let vols = Volumes::new(Registry::open(&root).unwrap());
                let mut r = Rng(0xabcd + w * 31);
                for _ in 0..40 {
                    let n = r.below(4) as u8;
                    let op = match r.below(6) {
                        0 | 1 => Op::Blank(n, r.below(2) == 0),
                        2 => Op::Delete(n),
                        3 => Op::Snapshot(r.below(3) as u8, n),
                        4 => Op::DeleteSnapshot(r.below(3) as u8, true),
                        _ => Op::Resize(n),
                    };
                    let _ = apply(&vols, &op);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(watcher.join().unwrap() > 0);
    // Every entry readable, figures equal a rescan, names unique.
    assert_consistent(&root, "default", true);
    let rows = Volumes::new(Registry::open(&root).unwrap())
        .list_volumes(&ListFilter::default())
        .unwrap();
    let mut names = BTreeSet::new();
    for r in rows {
        let VolumeRow::Ok { name, .. } = r else {
            panic!("damaged")
        };
        assert!(names.insert(name), "duplicate name");
    }
}
