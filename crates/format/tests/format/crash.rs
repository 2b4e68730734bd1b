//! Crash safety of qcow2 images written through `Qcow2Image` (issue 9).
//!
//! Kill campaign: a child process (this test binary, re-run with
//! `VMVOL_CRASH_CHILD` set, entering only `crash::crash_child`) runs a random sequence
//! of writes, overwrites, write-zeroes, discards, grows and flushes and
//! reports every completed operation and flush on its stdout; the parent
//! SIGKILLs it at a random point. Then: a read-write open (which repairs),
//! `qemu-img check` must find no errors and no leaks, and every range not
//! touched since the last reported flush must read back as the model says.
//! The parent regenerates the child's operations from the same seed.
//!
//! Interop: an image we left dirty is repaired by QEMU (`qemu-io` opens it
//! read-write), and one QEMU left dirty (lazy refcounts, `qemu-io` killed)
//! is repaired by our open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{qemu_check, require_tool};
use vmvol_format::{
    check, BackingPolicy, BlockIo, Format, OpenOptions, Qcow2CreateOptions, Qcow2Image, RepairMode,
};

/// `qemu-img check` verdict: (errors + check errors, leaks, full JSON text).
fn qemu_verdict(path: &Path) -> (u64, u64, String) {
    let v = qemu_check(path);
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (
        n("corruptions") + n("check-errors"),
        n("leaks"),
        v.to_string(),
    )
}

fn opts(dir: &Path) -> OpenOptions {
    OpenOptions::new().policy(BackingPolicy::within([dir.to_path_buf()]))
}

// ---------------------------------------------------------------------------
// The operation sequence, generated identically by child and parent.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
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

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, tag: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Grow { to: u64 },
    Flush,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => {
                Some((off, len))
            }
            _ => None,
        }
    }
}

const MAX_SIZE: u64 = 40 << 20;

/// Operation `i` of the sequence `seed` on an image of `size` bytes.
fn gen_op(rng: &mut Rng, i: u64, size: u64, cs: u64) -> Op {
    let sectors = size / 512;
    let range = |rng: &mut Rng| {
        // Mostly small (allocating or overwriting single clusters), some
        // spanning several clusters, sometimes cluster-aligned.
        let len_sect = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => (cs / 512) * (1 + rng.below(3)),
            _ => 1 + rng.below(2 * cs / 512),
        };
        let mut off = rng.below(sectors);
        if rng.below(2) == 0 {
            off -= off % (cs / 512);
        }
        let len = len_sect.min(sectors - off);
        (off * 512, len * 512)
    };
    match rng.below(100) {
        0..=59 => {
            let (off, len) = range(rng);
            Op::Write { off, len, tag: i }
        }
        60..=71 => {
            let (off, len) = range(rng);
            Op::Zero { off, len }
        }
        72..=83 => {
            let (off, len) = range(rng);
            Op::Discard { off, len }
        }
        84..=87 if size < MAX_SIZE => Op::Grow {
            to: (size + (1 + rng.below(4)) * (1 << 20)).min(MAX_SIZE),
        },
        _ => Op::Flush,
    }
}

/// The bytes op `tag` writes at guest offset `off`: every 8-byte word names
/// the op and its own offset, so misplaced data is recognisable.
fn data(tag: u64, off: u64, len: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|w| ((tag << 40) ^ (off / 8 + w) ^ 0x5a5a_0000_0000_0000).to_le_bytes())
        .collect()
}

fn apply(img: &Qcow2Image, op: &Op) {
    match *op {
        Op::Write { off, len, tag } => img.write_at(&data(tag, off, len), off).unwrap(),
        Op::Zero { off, len } => img.write_zeroes(off, len).unwrap(),
        Op::Discard { off, len } => img.discard(off, len).unwrap(),
        Op::Grow { to } => img.grow(to).unwrap(),
        Op::Flush => img.flush().unwrap(),
    }
}

/// The child: open the image, run ops until killed, report each.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var("VMVOL_CRASH_CHILD") else {
        return; // only a child process runs this
    };
    let path = PathBuf::from(path);
    let seed: u64 = std::env::var("VMVOL_CRASH_SEED").unwrap().parse().unwrap();
    let dir = path.parent().unwrap().to_path_buf();
    let img = Qcow2Image::open(&path, &opts(&dir)).unwrap();
    let cs = img.cluster_size();
    let mut rng = Rng(seed);
    let out = std::io::stdout();
    let mut out = out.lock();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    for i in 0.. {
        let op = gen_op(&mut rng, i, img.size(), cs);
        apply(&img, &op);
        let kind = if matches!(op, Op::Flush) { 'f' } else { 'o' };
        writeln!(out, "{kind} {i}").unwrap();
        out.flush().unwrap();
    }
}

/// The expected content of the image, 512-byte sector by sector: `known`
/// sectors must read back as `bytes`.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, tag } => {
                self.bytes[off as usize..(off + len) as usize]
                    .copy_from_slice(&data(tag, off, len));
            }
            // Without a backing file discard reads as zeros; over one, ours
            // also zeroes (discard_to_zero), so both are zeros.
            Op::Zero { off, len } | Op::Discard { off, len } => {
                self.bytes[off as usize..(off + len) as usize].fill(0);
            }
            Op::Grow { to } => self.bytes.resize(to as usize, 0),
            Op::Flush => {}
        }
    }
}

struct Campaign {
    cs: u64,
    backing: bool,
    kills: usize,
    /// Kills per image before a fresh one is created.
    per_image: usize,
}

fn child(path: &Path, seed: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "crash::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VMVOL_CRASH_CHILD", path)
        .env("VMVOL_CRASH_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn new_image(dir: &Path, c: &Campaign, n: usize) -> (PathBuf, Model) {
    let size = 8u64 << 20;
    let path = dir.join(format!("img{n}.qcow2"));
    let mut o = Qcow2CreateOptions::new(size).cluster_size(c.cs);
    let mut bytes = vec![0u8; size as usize];
    if c.backing {
        let b = dir.join(format!("base{n}.raw"));
        // Backing data in every other MiB, so some clusters copy-on-write
        // from it and some allocate over zeros.
        for mib in (0..size >> 20).step_by(2) {
            let d = data(0xbac, mib << 20, 1 << 20);
            bytes[(mib << 20) as usize..((mib + 1) << 20) as usize].copy_from_slice(&d);
        }
        std::fs::write(&b, &bytes).unwrap();
        o = o.backing(format!("base{n}.raw"), Format::Raw);
    }
    Qcow2Image::create(&path, &o).unwrap();
    (path, Model { bytes })
}

fn run_campaign(c: Campaign) {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut rng = Rng(0x1234 ^ c.cs ^ u64::from(c.backing));
    let mut kills = 0;
    let mut rebuilt = 0;
    let (mut path, mut model) = new_image(dir.path(), &c, 0);
    while kills < c.kills {
        if kills > 0 && kills % c.per_image == 0 {
            std::fs::remove_file(&path).unwrap();
            (path, model) = new_image(dir.path(), &c, kills);
        }
        let seed = rng.next();
        let mut ch = child(&path, seed);
        let mut lines = BufReader::new(ch.stdout.take().unwrap()).lines();
        // The test harness prints its own lines first.
        let first = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.ends_with("ready") || l.starts_with("test result"));
        if !first.as_deref().is_some_and(|l| l.ends_with("ready")) {
            let _ = ch.kill();
            let mut err = String::new();
            ch.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("child did not start: {first:?} {err}");
        }
        // Kill after a random number of reported ops, a random moment into
        // the next one.
        let target = rng.below(60);
        let mut seen = 0;
        let mut last_op: Option<u64> = None;
        let mut last_flush: Option<u64> = None;
        let note = |l: &str, last_op: &mut Option<u64>, last_flush: &mut Option<u64>| {
            let Some((k, i)) = l.split_once(' ') else {
                return;
            };
            let Ok(i) = i.parse::<u64>() else { return };
            if k != "o" && k != "f" {
                return;
            }
            *last_op = Some(i);
            if k == "f" {
                *last_flush = Some(i);
            }
        };
        while seen < target {
            match lines.next() {
                Some(Ok(l)) => {
                    note(&l, &mut last_op, &mut last_flush);
                    seen += 1;
                }
                _ => break,
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(1500)));
        ch.kill().unwrap();
        for l in lines.by_ref() {
            match l {
                Ok(l) => note(&l, &mut last_op, &mut last_flush),
                Err(_) => break,
            }
        }
        let status = ch.wait().unwrap();
        if status.code().is_some() {
            let mut err = String::new();
            ch.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("child exited by itself ({status}): {err}");
        }
        kills += 1;

        // Replay: ops up to the last flush are durable; ops after it up to
        // the one that was running may or may not have reached the image.
        let mut gen = Rng(seed);
        let mut size = model.bytes.len() as u64;
        let mut loose: Vec<(u64, u64)> = Vec::new();
        let upto = last_op.map_or(0, |i| i + 1); // op `upto` may have started
        let mut flushed_size = size;
        for i in 0..=upto {
            let op = gen_op(&mut gen, i, size, c.cs);
            if let Op::Grow { to } = op {
                size = to;
            }
            if last_flush.is_some_and(|f| i <= f) {
                model.apply(&op);
                flushed_size = size;
            } else if let Some(r) = op.range() {
                loose.push(r);
            }
        }

        // A read-write open repairs; then QEMU must find nothing wrong.
        let img = Qcow2Image::open(&path, &opts(dir.path()))
            .unwrap_or_else(|e| panic!("kill {kills}: open after kill failed: {e}"));
        rebuilt += usize::from(img.was_dirty());
        drop(img);
        let (errors, leaks, text) = qemu_verdict(&path);
        assert!(
            errors == 0 && leaks == 0,
            "kill {kills} (seed {seed}, cs {}, backing {}): qemu-img check after repair: {text}",
            c.cs,
            c.backing
        );

        // Flushed data reads back; loose ranges take what the image holds.
        let img = Qcow2Image::open(&path, &opts(dir.path()).read_only(true)).unwrap();
        let now = img.size();
        assert!(
            now >= flushed_size && now <= size.max(flushed_size),
            "kill {kills}: size {now} outside [{flushed_size}, {size}]"
        );
        model.bytes.resize(now as usize, 0);
        let mut got = vec![0u8; now as usize];
        for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
            img.read_at(chunk, (i as u64) << 20).unwrap();
        }
        let mut free = vec![false; (now / 512) as usize];
        for (off, len) in &loose {
            for s in off / 512..(off + len).div_ceil(512) {
                if let Some(f) = free.get_mut(s as usize) {
                    *f = true;
                }
            }
        }
        for (s, f) in free.iter().enumerate() {
            let r = s * 512..(s + 1) * 512;
            if *f {
                model.bytes[r.clone()].copy_from_slice(&got[r]);
            } else if model.bytes[r.clone()] != got[r.clone()] {
                panic!(
                    "kill {kills} (seed {seed}, cs {}, backing {}): flushed sector at {:#x} differs (last flush op {last_flush:?}, last op {last_op:?})",
                    c.cs,
                    c.backing,
                    r.start
                );
            }
        }
    }
    eprintln!(
        "{} kills (cs {}, backing {}), {rebuilt} dirty images rebuilt on open, {:?}",
        kills,
        c.cs,
        c.backing,
        started.elapsed()
    );
}

/// A campaign at cluster size `cs`, over a raw backing file or not;
/// `VMVOL_CRASH_KILLS` sets the kills (default 260: 1040 over the four).
fn campaign(cs: u64, backing: bool) {
    run_campaign(Campaign {
        cs,
        backing,
        kills: std::env::var("VMVOL_CRASH_KILLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(260),
        per_image: 40,
    });
}

#[test]
fn kill_campaign_4k() {
    campaign(4096, false);
}

#[test]
fn kill_campaign_64k() {
    campaign(65536, false);
}

#[test]
fn kill_campaign_4k_backing() {
    campaign(4096, true);
}

#[test]
fn kill_campaign_64k_backing() {
    campaign(65536, true);
}

/// Leave `path` dirty: a child writes through `Qcow2Image` and is killed
/// after `ops` reported operations.
fn kill_child_after(path: &Path, seed: u64, ops: usize) {
    let mut ch = child(path, seed);
    let mut lines = BufReader::new(ch.stdout.take().unwrap()).lines();
    let mut seen = 0;
    for l in lines.by_ref() {
        let l = l.unwrap();
        if l.starts_with("o ") || l.starts_with("f ") {
            seen += 1;
            if seen >= ops {
                break;
            }
        }
    }
    ch.kill().unwrap();
    ch.wait().unwrap();
}

fn is_dirty(path: &Path) -> bool {
    vmvol_format::info(path, &OpenOptions::new().read_only(true))
        .unwrap()
        .dirty
}

/// An image we left dirty opens read-only (and says so), and QEMU repairs
/// it when it opens it read-write, as it does its own lazy-refcount images.
#[test]
fn our_dirty_image_is_repaired_by_qemu() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.qcow2");
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(8 << 20).cluster_size(4096)).unwrap();
    kill_child_after(&p, 77, 200);
    assert!(is_dirty(&p), "a killed writer leaves the dirty bit");
    let ro = Qcow2Image::open(&p, &opts(dir.path()).read_only(true)).unwrap();
    assert!(ro.was_dirty());
    let mut buf = vec![0u8; 4096];
    ro.read_at(&mut buf, 0).unwrap();
    drop(ro);
    assert!(is_dirty(&p), "a read-only open changes nothing");

    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4k"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_dirty(&p), "QEMU clears the dirty bit after its repair");
    let (errors, leaks, text) = qemu_verdict(&p);
    assert!(errors == 0 && leaks == 0, "{text}");
    let rep = check(&p, RepairMode::None).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}

/// An image QEMU left dirty (lazy refcounts, `qemu-io` killed mid-write) is
/// repaired by our read-write open.
#[test]
fn qemu_dirty_image_is_repaired_by_our_open() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let mut dirty = false;
    for attempt in 0..20u64 {
        let _ = std::fs::remove_file(&p);
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg("lazy_refcounts=on,cluster_size=4096")
            .arg(&p)
            .arg("256M")
            .status()
            .unwrap();
        assert!(st.success());
        // Many allocating writes, scattered so that L2 tables are allocated too.
        let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
        for i in 0..4000u64 {
            let off = (i * 2_654_435_761 % (256 << 8)) * 4096;
            args.push("-c".into());
            args.push(format!("write -q -P {} {off} 4k", i % 250 + 1));
        }
        let mut ch = Command::new("qemu-io")
            .args(&args)
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(50 + attempt * 20));
        let _ = ch.kill();
        ch.wait().unwrap();
        if is_dirty(&p) {
            dirty = true;
            break;
        }
    }
    assert!(dirty, "qemu-io was never killed while the image was dirty");
    let (errors, leaks, _) = qemu_verdict(&p);
    eprintln!("QEMU's dirty image before our repair: {errors} errors, {leaks} leaks");
    let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
    assert!(img.was_dirty());
    img.write_at(&[7u8; 4096], 0).unwrap();
    img.flush().unwrap();
    drop(img);
    assert!(!is_dirty(&p));
    let (errors, leaks, text) = qemu_verdict(&p);
    assert!(errors == 0 && leaks == 0, "{text}");
}

/// Refcounts too low without the dirty bit (damage from elsewhere): a
/// read-write open is refused and names the repair; read-only works; leak
/// repair does not help; `RepairMode::All` rebuilds and the data is intact.
#[test]
fn inconsistent_clean_image_is_refused_until_rebuilt() {
    if !require_tool("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(8 << 20).cluster_size(4096)).unwrap();
    let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
    for i in 0..64u64 {
        img.write_at(&data(i, i * 65536, 4096), i * 65536).unwrap();
    }
    drop(img);
    assert!(!is_dirty(&p));
    // Zero the refcount of the last cluster in the file (a data cluster).
    let raw = std::fs::read(&p).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().unwrap());
    let rt = be64(48) as usize;
    let rb = be64(rt) as usize;
    let last = raw.len() / 4096 - 1;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0, 0], (rb + last * 2) as u64).unwrap();
    drop(f);
    let (errors, _, _) = qemu_verdict(&p);
    assert!(errors > 0, "the damage must be visible to QEMU");

    let err = Qcow2Image::open(&p, &opts(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vmvol image check -r all") && err.contains("dirty bit is not set"),
        "{err}"
    );
    let ro = Qcow2Image::open(&p, &opts(dir.path()).read_only(true)).unwrap();
    assert!(!ro.was_dirty());
    drop(ro);
    let leaks = check(&p, RepairMode::Leaks).unwrap();
    assert!(
        leaks.corruptions > 0,
        "leak repair leaves corruptions alone"
    );
    let all = check(&p, RepairMode::All).unwrap();
    assert!(all.is_clean(), "{all:?}");
    assert!(all.corruptions_fixed > 0);
    let (errors, leaks, text) = qemu_verdict(&p);
    assert!(errors == 0 && leaks == 0, "{text}");
    let img = Qcow2Image::open(&p, &opts(dir.path())).unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..64u64 {
        img.read_at(&mut buf, i * 65536).unwrap();
        assert_eq!(buf, data(i, i * 65536, 4096));
    }
}
