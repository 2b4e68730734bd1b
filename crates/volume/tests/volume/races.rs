//! Races between processes and threads.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmvol_pool::{Registry, Wait};
use vmvol_volume::{
    Control, CreateVolume, ErrorKind, Format, ListFilter, NewSize, Prealloc, VolumeRow,
    VolumeSource, Volumes,
};

use crate::crash::{spawn_child, Rng};
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
                // Committed virtual sizes never pass the limit. (`allocation`
                // adds live reservations, which overlap their entry for the
                // instant between commit and release.)
                assert!(
                    d.virtual_size <= d.limit,
                    "overcommitted: {} > {}",
                    d.virtual_size,
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
                // Each thread its own handle, like a separate process, and
                // its own names, so it knows which volumes must exist.
                let vols = Volumes::new(Registry::open(&root).unwrap());
                let mut r = Rng(0xabcd + w * 31);
                let mut mine = BTreeSet::new();
                let ctl = Control::new();
                for step in 0..40 {
                    let name = format!("w{w}-v{}", r.below(4));
                    match r.below(6) {
                        0 | 1 => {
                            let q = r.below(2) == 0;
                            let res = vols.create_volume(
                                "default",
                                &CreateVolume {
                                    name: name.clone(),
                                    size: Some(MIB * (1 + r.below(3))),
                                    source: VolumeSource::Blank {
                                        format: if q { Format::Qcow2 } else { Format::Raw },
                                        prealloc: if q { Prealloc::Off } else { Prealloc::Full },
                                        ext4: false,
                                    },
                                },
                                &ctl,
                            );
                            match res {
                                Ok(_) => assert!(mine.insert(name)),
                                Err(e) => assert!(
                                    matches!(
                                        e.kind(),
                                        ErrorKind::AlreadyExists | ErrorKind::InsufficientSpace
                                    ),
                                    "{e}"
                                ),
                            }
                        }
                        2 => match vols.delete_volume("default", &name) {
                            Ok(()) => assert!(mine.remove(&name)),
                            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{e}"),
                        },
                        3 => {
                            let _ = vols.create_snapshot(
                                "default",
                                &format!("w{w}-s{step}"),
                                &name,
                                &ctl,
                            );
                        }
                        4 => {
                            let _ = vols.delete_snapshot(
                                "default",
                                &format!("w{w}-s{}", r.below(40)),
                                true,
                            );
                        }
                        _ => {
                            let _ = vols.resize_volume("default", &name, NewSize::Grow(MIB));
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut expected = BTreeSet::new();
    for w in workers {
        expected.extend(w.join().unwrap());
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
    assert_eq!(names, expected, "a record was lost or appeared");
}
