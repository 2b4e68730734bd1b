//! SIGKILL during instance attach and detach: a child process attaches and
//! detaches instances (several volumes, both pools, both overlay kinds, a
//! hook writing into the instance's files directory) in a loop and is
//! killed at random points; after each kill a new handle recovers and
//! all-or-nothing must hold, with pool figures equal to a rescan.
//!
//! `VMVOL_ATTACH_KILLS` sets the number of kills (default 1000).

use std::path::Path;
use std::time::{Duration, Instant};

use vmvol_pool::{Registry, Wait};
use vmvol_volume::{Format, InstanceRecord, InstanceState, Volumes};

use crate::crash::Rng;
use crate::instances::*;
use crate::support::*;

/// (pool, name, format) of the campaign's volumes.
const VOLS: [(&str, &str, Format); 4] = [
    ("default", "a0", Format::Qcow2),
    ("default", "a1", Format::Raw),
    ("other", "b0", Format::Qcow2),
    ("other", "b1", Format::Raw),
];

/// The child: detach and attach instances `c0`–`c2` forever.
pub fn worker(root: &Path, seed: &str) {
    let vols = Volumes::new(Registry::open(root).unwrap());
    let mut r = Rng(seed.parse::<u64>().unwrap_or(1) | 1);
    loop {
        let id = format!("c{}", r.below(3));
        let _ = vols.detach_instance(&id);
        // 2–3 distinct volumes, mostly shareable uses so that attaches
        // succeed often; pools mixed.
        let n = 2 + r.below(2) as usize;
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < n {
            let v = r.below(VOLS.len() as u64) as usize;
            if !picked.contains(&v) {
                picked.push(v);
            }
        }
        let entries = picked
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                let u = match r.below(10) {
                    0 => Use::Rw,
                    1 | 2 => Use::Ro,
                    3..=6 => Use::Fs,
                    _ => Use::Block,
                };
                entry(VOLS[v].0, VOLS[v].1, &format!("/v{j}"), u)
            })
            .collect();
        let _ = attach_with_files(&vols, &request(&id, entries));
    }
}

/// One campaign on a fresh registry; returns (kills, seen attaching,
/// seen detaching, seen attached).
fn campaign(seed: u64, kills: usize, deadline: Instant) -> [usize; 4] {
    let env = Env::with_quota(1 << 30);
    for (p, n, f) in VOLS {
        env.blank(p, n, 16 * MIB, f);
    }
    let mut rng = Rng(seed);
    let mut seen = [0usize; 4];
    let mut round = 0u64;
    while seen[0] < kills && Instant::now() < deadline {
        round += 1;
        // Two workers on the same registry and the same instance ids: one
        // is killed first and the other keeps going for a while, finding
        // (and recovering) what the first left while it runs itself.
        let mut kids: Vec<_> = (0..2u64)
            .map(|k| {
                spawn(
                    "attach-loop",
                    &env.root(),
                    &(seed ^ (2 * round + k).wrapping_mul(0x9e37_79b9)).to_string(),
                )
            })
            .collect();
        for child in &mut kids {
            std::thread::sleep(Duration::from_millis(10 + rng.below(120)));
            let running = child.try_wait().unwrap().is_none();
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            child.wait().unwrap();
            assert!(running, "the worker exited by itself");
            seen[0] += 1;
        }
        // What the kill interrupted, as the records say before recovery.
        let store = Registry::open(env.root())
            .unwrap()
            .host_records("instances", Wait::Block)
            .unwrap();
        for id in store.list().unwrap() {
            if let Ok(Some(r)) = store.read::<InstanceRecord>(&id) {
                match r.state {
                    InstanceState::Attaching => seen[1] += 1,
                    InstanceState::Detaching => seen[2] += 1,
                    InstanceState::Attached => seen[3] += 1,
                }
            }
        }
        // Recovery by a new handle opening a pool (or asked for directly).
        let vols = Volumes::new(Registry::open(env.root()).unwrap());
        if round.is_multiple_of(2) {
            vols.pool("other").unwrap();
        } else {
            vols.recover_instances().unwrap();
        }
        assert_all_or_nothing(&env.root(), &vols);
        let check = round.is_multiple_of(25);
        assert_consistent(&env.root(), "default", check);
        assert_consistent(&env.root(), "other", check);
    }
    // The survivors detach cleanly.
    let vols = Volumes::new(Registry::open(env.root()).unwrap());
    for i in 0..3 {
        vols.detach_instance(&format!("c{i}")).unwrap();
    }
    assert_eq!(assert_all_or_nothing(&env.root(), &vols), 0);
    assert!(dir_names(&env.root().join("instances")).is_empty());
    assert_consistent(&env.root(), "default", true);
    assert_consistent(&env.root(), "other", true);
    seen
}

#[test]
fn sigkill_during_attach_and_detach_all_or_nothing() {
    require_tool("qemu-img");
    let kills: usize = std::env::var("VMVOL_ATTACH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(240);
    let threads = 4;
    let per = kills.div_ceil(threads);
    let handles: Vec<_> = (0..threads as u64)
        .map(|i| std::thread::spawn(move || campaign(0xa77a_c400 + i * 7919, per, deadline)))
        .collect();
    let mut seen = [0usize; 4];
    for h in handles {
        let s = h.join().unwrap();
        for k in 0..4 {
            seen[k] += s[k];
        }
    }
    eprintln!(
        "attach sigkill campaign: {} kills in {:?}; records found attaching {}, detaching {}, attached {}",
        seen[0],
        start.elapsed(),
        seen[1],
        seen[2],
        seen[3]
    );
    assert!(
        seen[0] >= kills,
        "only {} kills before the deadline",
        seen[0]
    );
    assert!(seen[1] > 0, "no kill landed inside an attach");
    assert!(seen[2] > 0, "no kill landed inside a detach");
}
