//! One throwaway single-node Ceph cluster per test binary, started with the
//! repo's `scripts/ceph-cluster.sh` on first use and killed by pid when the
//! binary exits (a watcher process outlives it for that).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use vmvol_pool::RbdSpec;

/// The running cluster: its config file and the Ceph pool tests use.
pub struct Cluster {
    pub conf: PathBuf,
    pub pool: String,
    _dir: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster.sh")
}

fn required() -> bool {
    std::env::var_os("VMVOL_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a Ceph CLI tool against the cluster; panics with its output on failure.
pub fn ceph(c: &Cluster, tool: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(tool)
        .env("CEPH_CONF", &c.conf)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn start() -> Result<Cluster, String> {
    for t in ["ceph-mon", "ceph-osd", "ceph", "rbd"] {
        if !have(t) {
            return Err(format!(
                "{t} is missing (apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common)"
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("vmvol-ceph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", script().display()))?;
    if !out.status.success() {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&dir)
            .status();
        return Err(format!(
            "ceph-cluster.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Stop the daemons by pid when this process is gone, whatever its end.
    let _ = Command::new("setsid")
        .arg("bash")
        .arg("-c")
        .arg(format!(
            "while kill -0 {} 2>/dev/null; do sleep 0.5; done; bash {} stop {}",
            std::process::id(),
            script().display(),
            dir.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let c = Cluster {
        conf: dir.join("ceph.conf"),
        pool: "vmvol".into(),
        _dir: dir,
    };
    // Readiness: the pool create and `rbd pool init` block until the PGs
    // are active (never wait for HEALTH_OK: no mgr).
    ceph(&c, "ceph", &["osd", "pool", "create", "vmvol", "8"]);
    ceph(&c, "rbd", &["pool", "init", "vmvol"]);
    // Without a mgr the cluster reports no space figures: the pool quota
    // is what the backend's capacity comes from.
    ceph(
        &c,
        "ceph",
        &[
            "osd",
            "pool",
            "set-quota",
            "vmvol",
            "max_bytes",
            "17179869184",
        ],
    );
    Ok(c)
}

/// The cluster, or `None` (after saying why) when Ceph is not installed;
/// panics instead under `VMVOL_REQUIRE_TOOLS=1`.
pub fn cluster() -> Option<&'static Cluster> {
    static C: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match C.get_or_init(start) {
        Ok(c) => Some(c),
        Err(why) => {
            assert!(!required(), "{why}");
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A fresh RBD namespace of the test pool, as a spec.
pub fn namespace(c: &Cluster) -> RbdSpec {
    static N: AtomicU32 = AtomicU32::new(0);
    let ns = format!("t{}", N.fetch_add(1, Ordering::Relaxed));
    ceph(
        c,
        "rbd",
        &["namespace", "create", "--pool", &c.pool, "--namespace", &ns],
    );
    RbdSpec {
        conf: c.conf.clone(),
        id: "admin".into(),
        pool: c.pool.clone(),
        namespace: ns,
    }
}

/// `rbd export` of an image into a file; returns its bytes.
pub fn export(c: &Cluster, spec: &RbdSpec, image: &str, to: &Path) -> Vec<u8> {
    let name = format!("{}/{}/{}", spec.pool, spec.namespace, image);
    ceph(c, "rbd", &["export", &name, &to.to_string_lossy()]);
    std::fs::read(to).unwrap()
}
