//! SIGKILL campaign: a child process runs random mutating operations and is
//! killed at random points; after each kill the pools are reopened
//! (recovery) and must be consistent. Also the child-process entry the race
//! tests use.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmvol_pool::Registry;
use vmvol_volume::Volumes;

use crate::model::{apply, Op};
use crate::support::*;

/// Small, fast xorshift (tests only).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Spawns this test binary as a child running `role`.
pub fn spawn_child(role: &str, root: &Path, arg: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash::child_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMVOL_TEST_CHILD", role)
        .env("VMVOL_TEST_ROOT", root)
        .env("VMVOL_TEST_ARG", arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn random_op(r: &mut Rng, archive: &Path) -> Op {
    let n = |r: &mut Rng| r.below(5) as u8;
    match r.below(13) {
        0 => Op::Blank(n(r), r.below(2) == 0),
        1 => Op::Ext4(n(r)),
        2 => Op::Archive(n(r), archive.to_path_buf()),
        3 => Op::FromTemplate(n(r), r.below(2) as u8, r.below(2) == 0),
        4 => Op::FromSnapshot(n(r), r.below(3) as u8, r.below(2) == 0),
        5 => Op::Delete(n(r)),
        6 => Op::Template(r.below(2) as u8, n(r)),
        7 => Op::DeleteTemplate(r.below(2) as u8),
        8 => Op::Snapshot(r.below(3) as u8, n(r)),
        9 => Op::DeleteSnapshot(r.below(3) as u8, r.below(2) == 0),
        10 => Op::Clone(n(r), n(r), r.below(2) == 0),
        11 => Op::Resize(n(r)),
        _ => Op::Compress(n(r)),
    }
}

/// The child side (run only as a spawned child; ignored otherwise).
#[test]
#[ignore = "child-process entry of the race and crash tests"]
fn child_entry() {
    let role = std::env::var("VMVOL_TEST_CHILD").unwrap_or_default();
    let root = PathBuf::from(std::env::var("VMVOL_TEST_ROOT").unwrap_or_default());
    let arg = std::env::var("VMVOL_TEST_ARG").unwrap_or_default();
    match role.as_str() {
        "create-same" => {
            let vols = Volumes::new(Registry::open(&root).unwrap());
            vols.pool("default").unwrap();
            let go = root.join("go");
            while !go.exists() {
                std::thread::yield_now();
            }
            let r = vols.create_volume(
                "default",
                &vmvol_volume::CreateVolume {
                    name: arg,
                    size: Some(MIB),
                    source: vmvol_volume::VolumeSource::Blank {
                        format: vmvol_volume::Format::Qcow2,
                        prealloc: vmvol_volume::Prealloc::Off,
                        ext4: false,
                    },
                },
                &vmvol_volume::Control::new(),
            );
            let mut out = std::io::stdout();
            match r {
                Ok(_) => writeln!(out, "RESULT WON").unwrap(),
                Err(e) => writeln!(out, "RESULT LOST {:?}", e.kind()).unwrap(),
            }
        }
        "crash-worker" => {
            let vols = Volumes::new(Registry::open(&root).unwrap());
            let archive = root.parent().unwrap().join("archive.tar");
            let mut r = Rng(arg.parse::<u64>().unwrap_or(1) | 1);
            loop {
                let op = random_op(&mut r, &archive);
                let _ = apply(&vols, &op);
            }
        }
        _ => {}
    }
}

fn make_archive(path: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "data.bin", &data[..]).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

/// One campaign: `kills` SIGKILLs of workers on a fresh registry.
fn campaign(seed: u64, kills: usize, deadline: Instant) -> usize {
    let env = Env::with_quota(4 << 30);
    make_archive(&env.dir.path().join("archive.tar"));
    let mut rng = Rng(seed);
    let mut done = 0;
    let mut round = 0u64;
    while done < kills && Instant::now() < deadline {
        round += 1;
        let mut child = spawn_child(
            "crash-worker",
            &env.root(),
            &(seed ^ round.wrapping_mul(0x9e37_79b9)).to_string(),
        );
        std::thread::sleep(Duration::from_millis(15 + rng.below(120)));
        let running = child.try_wait().unwrap().is_none();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        if running {
            done += 1;
        }
        // Reopen: volume-level recovery, then the invariants.
        let vols = Volumes::new(Registry::open(env.root()).unwrap());
        vols.pool("default").unwrap();
        vols.pool("other").unwrap();
        for s in vols.list_snapshots("default", None).unwrap() {
            let vmvol_volume::Row::Ok(s) = s else {
                panic!("damaged snapshot")
            };
            assert!(!s.record.pending, "pending snapshot after recovery");
        }
        let check = done % 10 == 0;
        assert_consistent(&env.root(), "default", check);
        assert_consistent(&env.root(), "other", check);
    }
    done
}

#[test]
fn sigkill_campaign() {
    require_tool("qemu-img");
    let start = Instant::now();
    let deadline = start + Duration::from_secs(150);
    let threads: Vec<_> = (0..4u64)
        .map(|i| std::thread::spawn(move || campaign(0x5eed_0000 + i * 7919, 250, deadline)))
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    eprintln!("sigkill campaign: {total} kills in {:?}", start.elapsed());
    assert!(total >= 1000, "only {total} kills before the deadline");
}
