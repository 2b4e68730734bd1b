//! The conformance suite (`suite/`) run on every backend of this crate: the
//! local directory backend and the in-memory one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::suite::{Fixture, Harness};
use vmvol_pool::memory::MemoryBackend;
use vmvol_pool::*;

/// Pools in directories of a temp dir, through the registry.
struct Local;

fn local_fixture(t: Box<dyn std::any::Any>, root: &Path, spec: PoolSpec) -> Fixture {
    let reg = Registry::open(root.join("root")).unwrap();
    let cfg = reg.define("p", &spec).unwrap();
    reg.activate("p", Wait::Block).unwrap();
    let pool = reg.open_pool("p", Wait::Block).unwrap();
    let dir = cfg.backend.local_path().unwrap().to_path_buf();
    let d2 = dir.clone();
    Fixture {
        pool,
        reopen: Box::new(move || Pool::open(&d2, Wait::Block).unwrap()),
        damage: Box::new(move |kind: EntryKind, id: &str, bytes: Option<&[u8]>| {
            // What a torn write or a hand edit leaves in the layout.
            let rec = dir.join(kind.dir_name()).join(id).join(kind.record_file());
            match bytes {
                Some(b) => std::fs::write(&rec, b).unwrap(),
                None => std::fs::remove_file(&rec).unwrap(),
            }
        }),
        lapse_lease: None,
        keep: t,
    }
}

/// A tmpfs mounted for one test; unmounted when dropped.
struct Mount {
    dir: tempfile::TempDir,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn mount_tmpfs(bytes: u64) -> Result<Mount, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
        .arg(dir.path())
        .output()
        .map_err(|e| format!("mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount -t tmpfs failed (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(Mount { dir })
}

impl Harness for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn pool(&self, capacity: CapacityPolicy, ratio: f64) -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let spec = PoolSpec {
            path: None,
            capacity,
            overcommit_ratio: ratio,
        };
        local_fixture(Box::new(t), &root, spec)
    }

    fn pool_on_space(&self, space: u64, capacity: Option<u64>, ratio: f64) -> Option<Fixture> {
        let m = match mount_tmpfs(space) {
            Ok(m) => m,
            Err(why) => {
                assert!(
                    std::env::var_os("VMVOL_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                    "{why}"
                );
                eprintln!("skipping the filesystem case: {why}");
                return None;
            }
        };
        let root: PathBuf = m.dir.path().to_path_buf();
        let spec = PoolSpec {
            path: None,
            capacity: match capacity {
                Some(bytes) => CapacityPolicy::Quota { bytes },
                None => CapacityPolicy::Filesystem,
            },
            overcommit_ratio: ratio,
        };
        Some(local_fixture(Box::new(m), &root, spec))
    }
}

/// Pools in memory.
struct Memory;

fn memory_fixture(b: MemoryBackend) -> Fixture {
    let pool = Pool::with_backend(Arc::new(b.clone()), Wait::Block).unwrap();
    pool.activate().unwrap();
    let (b1, b2, b3) = (b.clone(), b.clone(), b.clone());
    Fixture {
        pool,
        reopen: Box::new(move || Pool::with_backend(Arc::new(b1.clone()), Wait::Block).unwrap()),
        damage: Box::new(move |kind, id, bytes| b2.put_raw_record(kind, id, bytes)),
        lapse_lease: Some(Box::new(move || {
            b3.advance_clock(b3.lease_ttl() + Duration::from_secs(1))
        })),
        keep: Box::new(b),
    }
}

impl Harness for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn pool(&self, capacity: CapacityPolicy, ratio: f64) -> Fixture {
        memory_fixture(MemoryBackend::define("p", capacity, ratio).unwrap())
    }

    fn pool_on_space(&self, space: u64, capacity: Option<u64>, ratio: f64) -> Option<Fixture> {
        let capacity = match capacity {
            Some(bytes) => CapacityPolicy::Quota { bytes },
            None => CapacityPolicy::Filesystem,
        };
        let b = MemoryBackend::define("p", capacity, ratio).unwrap();
        b.set_space(space, space - space / 100);
        Some(memory_fixture(b))
    }
}

macro_rules! conformance {
    ($($behaviour:ident),* $(,)?) => {
        mod local_backend {
            $( #[test] fn $behaviour() { crate::suite::$behaviour(&super::Local) } )*
        }
        mod memory_backend {
            $( #[test] fn $behaviour() { crate::suite::$behaviour(&super::Memory) } )*
        }
    };
}

conformance!(
    capacity_figures,
    thin_ratio,
    eight_threads_race,
    damaged_records,
    bad_input,
    recovery,
    records_seen_by_other_handles,
    transactions,
    image_store,
    physical_space,
    fencing,
    compaction,
);
