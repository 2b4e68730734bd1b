//! vhost-user-blk exports against a real `qemu-storage-daemon` serving RBD
//! images of a throwaway Ceph cluster: start, status, stop (idempotent),
//! restart after the daemon died, a pidfile whose pid now belongs to
//! another process, bad input; online resize through the daemon's QMP
//! monitor (grow, shrink refused, a stopped export, a daemon of an older
//! vmvol without a monitor). (Guests reading and writing through the
//! exports: the facade's CLI tests, feature `rbd`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmvol_chv::export::{stop_all_in, Export, ExportState};
use vmvol_chv::Error;
use vmvol_pool::{RbdSpec, RbdTarget};

use crate::cluster::{self, Cluster};

fn required() -> bool {
    std::env::var("VMVOL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// qemu-storage-daemon with its rbd driver, and the cluster; `None` (after
/// saying why) when missing, a panic under `VMVOL_REQUIRE_TOOLS=1`.
fn setup() -> Option<&'static Cluster> {
    let have_daemon = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let have_driver = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .any(|e| e.path().join("qemu/block-rbd.so").exists());
    let why = if !have_daemon {
        Some("qemu-storage-daemon is missing (apt-get install qemu-system-common)")
    } else if !have_driver {
        Some("qemu's rbd block driver is missing (apt-get install qemu-block-extra)")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(!required(), "{why} (VMVOL_REQUIRE_TOOLS=1)");
        eprintln!("skipping: {why}");
        return None;
    }
    cluster::cluster()
}

/// A fresh namespace with one 32 MiB image `img` holding a pattern.
fn image(c: &Cluster) -> (RbdSpec, RbdTarget) {
    let spec = cluster::namespace(c);
    let name = format!("{}/{}/img", spec.pool, spec.namespace);
    cluster::ceph(c, "rbd", &["create", "--size", "32M", &name]);
    let t = RbdTarget {
        pool: spec.pool.clone(),
        namespace: spec.namespace.clone(),
        image: "img".into(),
        snapshot: None,
        conf: spec.conf.clone(),
        user: Some(spec.id.clone()),
    };
    (spec, t)
}

fn pid_of(e: &Export) -> u32 {
    match e.status().state {
        ExportState::Running { pid } => pid,
        other => panic!("{}: not running: {other:?}", e.what),
    }
}

fn alive(pid: u32) -> bool {
    // A zombie (not reaped where pid 1 does not reap) has no cmdline.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn kill9(pid: u32) {
    let ok = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    for _ in 0..250 {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pid {pid} survived SIGKILL");
}

fn files_gone(e: &Export) {
    for p in [&e.socket, &e.pidfile, &e.log, &e.monitor_path()] {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn start_status_stop_restart() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (_, t) = image(c);
    let rw = Export::new("volume w (vdd)", t.clone(), true, d.path(), "vdd");
    let ro = Export::new("volume w (vde)", t, false, d.path(), "vde");
    assert_eq!(rw.status().state, ExportState::Stopped);

    // Start: the socket listens, the daemon runs detached from us.
    let st = rw.start().unwrap();
    assert!(st.is_running() && st.writable, "{st:?}");
    let pid = pid_of(&rw);
    assert!(rw.socket.exists() && rw.pidfile.exists() && rw.monitor_path().exists());
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("read-only=off") && cmdline.contains("writable=on"));
    // Starting again is a no-op: same daemon.
    rw.start().unwrap();
    assert_eq!(pid_of(&rw), pid);
    // A read-only export of the same image runs beside it.
    ro.start().unwrap();
    let ro_pid = pid_of(&ro);
    let cmdline = std::fs::read_to_string(format!("/proc/{ro_pid}/cmdline")).unwrap();
    assert!(cmdline.contains("read-only=on") && cmdline.contains("writable=off"));

    // The daemon dies (a crash, a reboot): status says so, restart brings
    // it back with a new daemon, and leaves a running one alone.
    kill9(pid);
    match rw.status().state {
        ExportState::Dead { reason } => assert!(reason.contains(&pid.to_string()), "{reason}"),
        other => panic!("after SIGKILL: {other:?}"),
    }
    assert!(rw.restart_if_dead().unwrap().is_running());
    let pid2 = pid_of(&rw);
    assert_ne!(pid2, pid);
    ro.restart_if_dead().unwrap();
    assert_eq!(pid_of(&ro), ro_pid);
    // The same disk asked read-only now: the writable daemon is replaced,
    // never reused, and the new one exports read-only.
    let rw_as_ro = Export::new("volume w (vdd)", rw.source.clone(), false, d.path(), "vdd");
    assert!(rw_as_ro.start().unwrap().is_running());
    let pid3 = pid_of(&rw_as_ro);
    assert!(pid3 != pid2 && !alive(pid2));
    let cmdline = std::fs::read_to_string(format!("/proc/{pid3}/cmdline")).unwrap();
    assert!(cmdline.contains("read-only=on") && cmdline.contains("writable=off"));
    // And back: writable again, a new daemon.
    assert!(rw.start().unwrap().is_running());
    let pid2 = pid_of(&rw);
    assert!(pid2 != pid3 && !alive(pid3));

    // Stop: the daemon is gone and so are its files; stopping again is fine.
    rw.stop().unwrap();
    assert!(!alive(pid2));
    files_gone(&rw);
    assert_eq!(rw.status().state, ExportState::Stopped);
    rw.stop().unwrap();
    // Whatever is left in the directory is stopped by a sweep.
    assert_eq!(stop_all_in(d.path()).unwrap(), 1);
    assert!(!alive(ro_pid));
    files_gone(&ro);
    assert_eq!(stop_all_in(d.path()).unwrap(), 0);
    assert_eq!(stop_all_in(&d.path().join("missing")).unwrap(), 0);
}

#[test]
fn a_reused_pid_is_never_signalled() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (_, t) = image(c);
    let e = Export::new("volume r (vdd)", t, true, d.path(), "vdd");
    e.start().unwrap();
    let pid = pid_of(&e);
    kill9(pid);
    // The daemon's pid now names another process (as after a reboot).
    let mut other = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(&e.pidfile, other.id().to_string()).unwrap();
    match e.status().state {
        ExportState::Dead { reason } => {
            assert!(reason.contains("not a qemu-storage-daemon"), "{reason}")
        }
        s => panic!("{s:?}"),
    }
    e.stop().unwrap();
    assert!(
        other.try_wait().unwrap().is_none(),
        "stop signalled a process that is not its daemon"
    );
    files_gone(&e);
    // Restart over the stale files works too.
    std::fs::write(&e.pidfile, other.id().to_string()).unwrap();
    assert!(e.restart_if_dead().unwrap().is_running());
    assert!(other.try_wait().unwrap().is_none());
    e.stop().unwrap();
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn a_daemon_without_its_pidfile_is_still_found_and_stopped() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (_, t) = image(c);
    let e = Export::new("volume p (vdd)", t, false, d.path(), "vdd");
    e.start().unwrap();
    let pid = pid_of(&e);
    // The pidfile lost (its directory cleaned by someone else).
    std::fs::remove_file(&e.pidfile).unwrap();
    assert!(matches!(e.status().state, ExportState::Dead { .. }));
    e.stop().unwrap();
    assert!(!alive(pid), "the daemon was not found by its socket");
    files_gone(&e);
}

fn export_err(r: vmvol_chv::Result<vmvol_chv::export::ExportStatus>) -> String {
    match r {
        Err(e @ (Error::Export { .. } | Error::Invalid { .. })) => e.to_string(),
        other => panic!("expected an export error, got {other:?}"),
    }
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (_, t) = image(c);

    // A missing ceph conf: named, with the volume.
    let mut bad = t.clone();
    bad.conf = PathBuf::from("/nonexistent/ceph.conf");
    let e = Export::new("volume a (vdd)", bad, true, d.path(), "vdd");
    let msg = export_err(e.start());
    assert!(
        msg.contains("volume a (vdd)") && msg.contains("/nonexistent/ceph.conf"),
        "{msg}"
    );
    files_gone(&e);

    // A missing image: the daemon's own words are in the error.
    let mut bad = t.clone();
    bad.image = "nope".into();
    let e = Export::new("volume b (vde)", bad, true, d.path(), "vde");
    let msg = export_err(e.start());
    assert!(
        msg.contains("volume b (vde)") && msg.contains("nope") && msg.contains("No such file"),
        "{msg}"
    );
    files_gone(&e);

    // A writable export of a snapshot, a socket path bind(2) cannot take.
    let mut snap = t.clone();
    snap.snapshot = Some("s1".into());
    let e = Export::new("volume c (vdf)", snap, true, d.path(), "vdf");
    assert!(export_err(e.start()).contains("snapshot"));
    let long: PathBuf = d.path().join("x".repeat(120));
    let e = Export::new("volume d (vdg)", t, true, &long, "vdg");
    assert!(export_err(e.start()).contains("at most 107"));
    assert!(!Path::new(&long).exists());
    assert_eq!(stop_all_in(d.path()).unwrap(), 0);
}

/// The image's size as `rbd info` reports it.
fn rbd_size(c: &Cluster, spec: &RbdSpec, image: &str) -> u64 {
    let name = format!("{}/{}/{image}", spec.pool, spec.namespace);
    let info = cluster::ceph(c, "rbd", &["info", "--format", "json", &name]);
    let v: serde_json::Value = serde_json::from_slice(&info).unwrap();
    v["size"].as_u64().unwrap()
}

fn resize_err(r: vmvol_chv::Result<u64>) -> String {
    match r {
        Err(e @ (Error::Export { .. } | Error::Invalid { .. })) => e.to_string(),
        other => panic!("expected an export error, got {other:?}"),
    }
}

#[test]
fn resize_grows_the_image_through_the_daemon() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (spec, t) = image(c);
    let mib = 1u64 << 20;
    let e = Export::new("volume g (vdd)", t.clone(), true, d.path(), "vdd");
    // Not running: said so, nothing touched.
    let msg = resize_err(e.resize(48 * mib));
    assert!(
        msg.contains("volume g (vdd)") && msg.contains("not running"),
        "{msg}"
    );
    assert_eq!(rbd_size(c, &spec, "img"), 32 * mib);

    e.start().unwrap();
    let pid = pid_of(&e);
    // Grow: the daemon's librbd resizes the image it holds open.
    assert_eq!(e.resize(48 * mib).unwrap(), 32 * mib);
    assert_eq!(rbd_size(c, &spec, "img"), 48 * mib);
    // The same size again is a no-op; the daemon is still the same one.
    assert_eq!(e.resize(48 * mib).unwrap(), 48 * mib);
    assert_eq!(pid_of(&e), pid);
    // Shrinking is refused, naming the sizes; the image keeps its size.
    let msg = resize_err(e.resize(16 * mib));
    assert!(
        msg.contains("volume g (vdd)") && msg.contains("shrinking") && msg.contains("50331648"),
        "{msg}"
    );
    assert_eq!(rbd_size(c, &spec, "img"), 48 * mib);
    // Not a whole number of sectors.
    assert!(resize_err(e.resize(48 * mib + 1)).contains("multiple of 512"));
    // A read-only export is never resized.
    let ro = Export::new("volume g (vde)", t, false, d.path(), "vde");
    ro.start().unwrap();
    assert!(resize_err(ro.resize(64 * mib)).contains("read-only"));
    ro.stop().unwrap();

    // Stopped: a clear error again, and the monitor socket went with it.
    e.stop().unwrap();
    files_gone(&e);
    let msg = resize_err(e.resize(64 * mib));
    assert!(msg.contains("not running"), "{msg}");
    assert_eq!(rbd_size(c, &spec, "img"), 48 * mib);
}

#[test]
fn a_daemon_without_a_monitor_is_kept_but_not_resized() {
    let Some(c) = setup() else { return };
    let d = tempfile::tempdir().unwrap();
    let (spec, t) = image(c);
    let e = Export::new("volume o (vdd)", t, true, d.path(), "vdd");
    // A daemon as an older vmvol started it: the same export, no monitor.
    let args = e.args().unwrap();
    let ok = Command::new("qemu-storage-daemon")
        .args(&args[..4])
        .arg("--daemonize")
        .arg("--pidfile")
        .arg(&e.pidfile)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let pid = pid_of(&e);
    // Starting keeps it (a guest may be running on it)...
    assert!(e.start().unwrap().is_running());
    assert_eq!(pid_of(&e), pid);
    // ...but it cannot be resized online, and says what to do.
    let msg = resize_err(e.resize(64 << 20));
    assert!(
        msg.contains("volume o (vdd)")
            && msg.contains("no QMP monitor")
            && msg.contains("started again"),
        "{msg}"
    );
    assert_eq!(rbd_size(c, &spec, "img"), 32 << 20);
    e.stop().unwrap();
    assert!(!alive(pid));
    files_gone(&e);
}
