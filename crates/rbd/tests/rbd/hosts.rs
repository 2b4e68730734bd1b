//! Two processes as two hosts on one cluster: the lease of a host that
//! stalls (SIGSTOP) past it passes to the other, and the stalled host's
//! write after it resumes is refused by the cluster.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use vmvol_format::Control;
use vmvol_pool::*;

use crate::cluster::{cluster, namespace};
use crate::conformance::{define, open, LEASE};
use crate::suite::{raw, Vol};

/// SIGKILLs a process (by pid) when dropped.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

const HOST_A: &str = "VMVOL_RBD_TEST_HOST_A";
const HOST_B: &str = "VMVOL_RBD_TEST_HOST_B";

fn child_spec(var: &str) -> Option<RbdSpec> {
    let s = std::env::var_os(var)?;
    Some(serde_json::from_slice(s.as_encoded_bytes()).unwrap())
}

fn spawn_host(test: &str, var: &str, spec: &RbdSpec) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(var, serde_json::to_string(spec).unwrap());
    c
}

/// Host A (a child of `sigstop_fencing`): takes the pool exclusively, says
/// so, waits for a line on stdin, then writes a record and prints the result.
#[test]
fn host_a() {
    let Some(spec) = child_spec(HOST_A) else {
        return; // only meaningful as a child of sigstop_fencing
    };
    let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
    let r = pool.transaction("slow update", |t| {
        println!("locked");
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        t.write_record(
            EntryKind::Volume,
            "v",
            &Vol {
                name: "from A".into(),
                tag: 1,
            },
        )
    });
    match r {
        Ok(()) => println!("result: written"),
        Err(e) => println!("result: {e}"),
    }
}

/// Host B (a child of `sigstop_fencing`): opens the pool (waiting for the
/// lock), writes a record, prints how long it waited.
#[test]
fn host_b() {
    let Some(spec) = child_spec(HOST_B) else {
        return;
    };
    let b = open(&spec);
    let t0 = Instant::now();
    let pool = Pool::with_backend(b, Wait::Timeout(LEASE * 4)).unwrap();
    let waited = t0.elapsed();
    pool.write_record(
        EntryKind::Volume,
        "v",
        &Vol {
            name: "from B".into(),
            tag: 2,
        },
    )
    .unwrap();
    println!("waited ms: {}", waited.as_millis());
}

#[test]
fn sigstop_fencing() {
    let Some(c) = cluster() else { return };
    let spec = namespace(c);
    define(&spec, CapacityPolicy::Quota { bytes: 1 << 30 }, 1.0);
    {
        let pool = Pool::with_backend(open(&spec), Wait::Block).unwrap();
        pool.activate().unwrap();
        let g = pool.reserve(1 << 20, "v").unwrap();
        let st = pool.stage().unwrap();
        st.create_image(DATA_IMAGE, &raw(1 << 20), &Control::new())
            .unwrap();
        let vol = Vol {
            name: "initial".into(),
            tag: 0,
        };
        pool.commit(st, EntryKind::Volume, "v", &vol).unwrap();
        drop(g);
    }
    let mut a = spawn_host("hosts::host_a", HOST_A, &spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Whatever happens below, host A does not outlive the test.
    let _reaper = Reaper(a.id());
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "host A ended early");
    }
    let pid = a.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // Host B waits for A's lease to lapse, then takes the pool and writes.
    let b = spawn_host("hosts::host_b", HOST_B, &spec).output().unwrap();
    let b_out = String::from_utf8_lossy(&b.stdout);
    assert!(b.status.success(), "host B failed: {b_out}");
    let waited: u64 = b_out
        .lines()
        .find_map(|l| l.split_once("waited ms: ").map(|x| x.1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wait from host B: {b_out}"));
    assert!(
        u128::from(waited) >= LEASE.as_millis() / 2,
        "B got the pool after {waited} ms, before A's lease could lapse"
    );
    // A resumes and tries its write: the cluster refuses it.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    writeln!(a.stdin.take().unwrap()).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(a.wait().unwrap().success(), "host A failed: {rest}");
    let result = rest
        .lines()
        .find_map(|l| l.split_once("result: ").map(|x| x.1))
        .unwrap_or_else(|| panic!("no result from host A: {rest}"));
    assert!(
        result.contains("refused") && result.contains("lease"),
        "A's stale write was not refused: {result}"
    );
    // The records show only B's state.
    let p = Pool::with_backend(open(&spec), Wait::Block).unwrap();
    let e = p.get::<Vol>(EntryKind::Volume, "v").unwrap();
    assert_eq!(
        (e.record.data.name.as_str(), e.record.data.tag),
        ("from B", 2)
    );
}
