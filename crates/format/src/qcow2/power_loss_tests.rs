//! Power-loss tests: every write and flush below the engine is recorded;
//! for many crash points the file is rebuilt from the writes before the
//! last completed flush plus a random subset, in random order, of the writes
//! after it. A read-write open must repair it so that `qemu-img check` is
//! clean, and data flushed by the guest must read back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use super::ordering::Event;
use crate::{BackingPolicy, BlockIo, OpenOptions, Qcow2CreateOptions, Qcow2Image};

fn require_tool(name: &str) -> bool {
    let ok = Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("VMVOL_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{name} is required (VMVOL_REQUIRE_TOOLS=1) but not installed"
        );
        eprintln!("SKIP: {name} not installed");
    }
    ok
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn data(tag: u64, off: u64, len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|w| ((tag << 40) ^ (off / 8 + w) ^ 0xa5a5_0000_0000_0000).to_le_bytes())
        .collect()
}

/// One guest operation as recorded: the range it touched (None for flush
/// and grow) and the log positions around it.
struct Done {
    range: Option<(u64, u64)>,
    start: usize,
    end: usize,
    flush: bool,
}

fn qemu_check_clean(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())?;
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    if n("corruptions") + n("check-errors") + n("leaks") == 0 {
        Ok(())
    } else {
        Err(v.to_string())
    }
}

/// Run random operations on `img0` (already created at `path`) while
/// recording, then replay `points` crash points.
fn power_loss(path: &Path, seed: u64, ops: usize, points: usize, max_len: u64) {
    let dir = path.parent().unwrap();
    let initial = std::fs::read(path).unwrap();
    let opts = OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]));
    let img = Qcow2Image::open(path, &opts).unwrap();
    let log = Arc::new(Mutex::new(Vec::<Event>::new()));
    img.crash_order().unwrap().log.set(log.clone()).unwrap();
    let cs = img.cluster_size();
    let pos = || log.lock().unwrap().len();
    let mut rng = Rng(seed);
    let mut model = vec![0u8; img.size() as usize];
    // Model snapshots at each completed guest flush: (log position, bytes).
    // Model snapshots at each completed guest flush: (log position, index
    // of the next op, bytes).
    let mut flushed: Vec<(usize, usize, Vec<u8>)> = vec![(0, 0, model.clone())];
    let mut done = Vec::new();
    for i in 0..ops as u64 {
        let size = img.size();
        let sectors = size / 512;
        let mut off = rng.below(sectors);
        if rng.below(2) == 0 {
            off -= off % (cs / 512);
        }
        let len = (1 + rng.below(max_len / 512)).min(sectors - off) * 512;
        let off = off * 512;
        let start = pos();
        let (range, flush) = match rng.below(100) {
            0..=59 => {
                let d = data(i, off, len);
                img.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                (Some((off, len)), false)
            }
            60..=71 => {
                img.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                (Some((off, len)), false)
            }
            72..=83 => {
                img.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
                (Some((off, len)), false)
            }
            84..=86 if size < (12 << 20) => {
                let to = size + (1 + rng.below(3)) * (1 << 20);
                img.grow(to).unwrap();
                model.resize(to as usize, 0);
                (None, false)
            }
            _ => {
                img.flush().unwrap();
                (None, true)
            }
        };
        let end = pos();
        if flush {
            flushed.push((end, i as usize + 1, model.clone()));
        }
        done.push(Done {
            range,
            start,
            end,
            flush,
        });
    }
    drop(img); // a clean close, recorded too
    let events = log.lock().unwrap().clone();
    let syncs = events.iter().filter(|e| matches!(e, Event::Sync)).count();
    let flushes = done.iter().filter(|d| d.flush).count();
    assert!(
        flushes > 3 && syncs > flushes,
        "{flushes} flushes, {syncs} syncs"
    );

    let work = dir.join("crashed.qcow2");
    for p in 0..points {
        // Crash after `c` events; everything before the last sync is on disk.
        let c = if p == points - 1 {
            events.len()
        } else {
            rng.below(events.len() as u64 + 1) as usize
        };
        let s = events[..c]
            .iter()
            .rposition(|e| matches!(e, Event::Sync))
            .map_or(0, |i| i + 1);
        let mut file = initial.clone();
        let mut put = |off: u64, b: &[u8]| {
            let end = off as usize + b.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[off as usize..end].copy_from_slice(b);
        };
        for e in &events[..s] {
            if let Event::Write(off, b) = e {
                put(*off, b);
            }
        }
        let mut tail: Vec<&Event> = events[s..c].iter().filter(|_| rng.below(2) == 0).collect();
        for i in (1..tail.len()).rev() {
            tail.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for e in tail {
            if let Event::Write(off, b) = e {
                put(*off, b);
            }
        }
        std::fs::write(&work, &file).unwrap();

        let what = format!(
            "seed {seed} cs {cs} crash point {c}/{} (durable {s})",
            events.len()
        );
        let img = Qcow2Image::open(&work, &opts)
            .unwrap_or_else(|e| panic!("{what}: open after power loss failed: {e}"));
        drop(img);
        if let Err(e) = qemu_check_clean(&work) {
            panic!("{what}: qemu-img check after repair: {e}");
        }
        let rep = crate::check(&work, crate::RepairMode::None).unwrap();
        assert!(rep.is_clean(), "{what}: our check after repair: {rep:?}");

        // Data of the last guest flush completed before the crash, except
        // what later operations (that may have begun) touched.
        let (fpos, fop, expect) = flushed.iter().rev().find(|(at, _, _)| *at <= c).unwrap();
        let img = Qcow2Image::open(&work, &opts.clone().read_only(true)).unwrap();
        let size = img.size() as usize;
        assert!(
            size >= expect.len(),
            "{what}: size {size} < flushed {}",
            expect.len()
        );
        let mut got = vec![0u8; expect.len()];
        img.read_at(&mut got, 0).unwrap();
        let mut loose = vec![false; expect.len() / 512];
        for d in done.iter().skip(*fop).filter(|d| d.start <= c) {
            if let Some((off, len)) = d.range {
                for s in off / 512..(off + len) / 512 {
                    if let Some(l) = loose.get_mut(s as usize) {
                        *l = true;
                    }
                }
            }
        }
        for (i, l) in loose.iter().enumerate() {
            let r = i * 512..(i + 1) * 512;
            if !*l && got[r.clone()] != expect[r.clone()] {
                let evs: Vec<String> = events[..c.min(events.len())]
                    .iter()
                    .enumerate()
                    .skip(fpos.saturating_sub(30))
                    .map(|(i, e)| match e {
                        Event::Write(o, b) => format!("{i}:W{o:#x}+{:#x}", b.len()),
                        Event::Sync => format!("{i}:S"),
                    })
                    .collect();
                let ops: Vec<String> = done
                    .iter()
                    .filter(|d| d.end + 30 > *fpos && d.start <= c)
                    .map(|d| format!("[{}..{}) {:x?} flush={}", d.start, d.end, d.range, d.flush))
                    .collect();
                let word = u64::from_le_bytes(got[r.start..r.start + 8].try_into().unwrap());
                panic!(
                    "{what}: flushed sector {:#x} differs (got word {word:#x}); flush at {fpos}\nops: {ops:#?}\nevents: {evs:?}",
                    r.start
                );
            }
        }
    }
}

#[test]
fn power_loss_4k() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(4 << 20).cluster_size(4096)).unwrap();
    power_loss(&p, 1, 400, 150, 8192);
}

#[test]
fn power_loss_64k() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(4 << 20).cluster_size(65536)).unwrap();
    power_loss(&p, 2, 300, 100, 128 << 10);
}

/// 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB
/// and the refcount table 2 MiB, so the run grows the refcount table (and
/// the L1 table) several times.
#[test]
fn power_loss_reftable_growth() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg("cluster_size=512,refcount_bits=64")
        .arg(&p)
        .arg("2M")
        .status()
        .unwrap();
    assert!(st.success());
    let before = super::Qcow2Meta::open(&p, false).unwrap().header().clone();
    power_loss(&p, 3, 300, 100, 64 << 10);
    let after = super::Qcow2Meta::open(&p, false).unwrap().header().clone();
    assert_ne!(
        before.refcount_table_offset, after.refcount_table_offset,
        "the refcount table should have moved"
    );
}
