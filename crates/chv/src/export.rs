//! vhost-user-blk exports of images that have no host file (RBD): one
//! `qemu-storage-daemon` per exported disk, started daemonized so it
//! outlives the process that attached the instance, watched through its
//! pidfile and `/proc`, stopped by pid.
//!
//! Cloud Hypervisor has no RBD driver and these hosts have no `rbd`/`nbd`
//! kernel modules, so the guest reaches an RBD image through a Unix socket
//! on which the daemon serves vhost-user-blk (the VMM then needs shared
//! guest memory: Cloud Hypervisor's `--memory shared=on`). One daemon per
//! disk keeps failures apart: a crashed daemon takes one disk, a read-only
//! export can never be written through a writable sibling, and stopping an
//! instance's exports is killing its daemons.
//!
//! A daemon is "ours" only if `/proc/PID/cmdline` is a qemu-storage-daemon
//! whose `--export` names our socket: a pidfile left by a daemon that died
//! (a host reboot) and whose pid was reused never gets a signal.
//!
//! Each daemon also has a QMP monitor on a Unix socket beside the export's
//! (`vhost-<device>.qmp`), through which [`Export::resize`] grows the image
//! while the guest runs: the daemon's own librbd (which holds the image's
//! exclusive lock) resizes it. Whether the running guest sees the new
//! capacity depends on two programs vmvol does not control: the daemon
//! must send the vhost-user config-change message (QEMU 7.2, Debian 12's,
//! does not; newer QEMU's export does) and the VMM must pass it on (QEMU's
//! vhost-user-blk device does; Cloud Hypervisor v53 does not). Otherwise
//! the guest sees it once the VMM reconnects the disk. A daemon started by an older
//! vmvol has no monitor; it keeps serving (replacing it would cut the disk
//! from under a running guest), but cannot be resized online until its
//! export is started again (the instance detached and attached).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmvol_volume::RbdTarget;

use crate::{Error, Result};

/// The daemon's program, looked up on `PATH` (Debian: `qemu-system-common`;
/// its `rbd` driver: `qemu-block-extra`).
pub const DAEMON: &str = "qemu-storage-daemon";

/// How long [`Export::stop`] waits after `SIGTERM` before `SIGKILL`.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Export::start`] waits for the daemon to finish starting
/// (connecting to the cluster; the client's own timeouts come first).
pub const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How long [`Export::resize`] waits for each answer of the daemon's QMP
/// monitor (growing an RBD image is one metadata update).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The block node and export ids inside each daemon (one of each).
const NODE: &str = "vmvol0";
const EXPORT_ID: &str = "vmvol-export0";
/// The chardev id of the daemon's QMP monitor.
const MONITOR_ID: &str = "vmvol-qmp";

/// Longest socket path `bind(2)` takes (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// File name prefix of export files in an instance's files directory.
const PREFIX: &str = "vhost-";

/// One vhost-user-blk export of an RBD image by its own daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// What it exports, for messages (e.g. `volume web (vdd)`).
    pub what: String,
    /// The image.
    pub source: RbdTarget,
    /// Whether the guest may write (`writable=on`); a read-only export
    /// also opens the image read-only.
    pub writable: bool,
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// The daemon's pidfile (written by the daemon once it is up).
    pub pidfile: PathBuf,
    /// The daemon's start-up messages (kept for the error report).
    pub log: PathBuf,
}

/// Where an export stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ExportState {
    /// Its daemon is alive and listening on the socket.
    Running {
        /// The daemon's pid.
        pid: u32,
    },
    /// Neither daemon nor pidfile: never started or cleanly stopped.
    Stopped,
    /// Files left behind but no working daemon (it died, the host
    /// rebooted, or the pid now belongs to another process).
    Dead {
        /// What was found.
        reason: String,
    },
}

/// An export and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    /// What it exports.
    pub what: String,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Whether the guest may write.
    pub writable: bool,
    /// Its state.
    #[serde(flatten)]
    pub state: ExportState,
}

impl ExportStatus {
    /// Whether the daemon is alive and listening.
    pub fn is_running(&self) -> bool {
        matches!(self.state, ExportState::Running { .. })
    }
}

/// `v` as a value of qemu's `key=value,…` options (a comma is doubled).
pub fn qemu_escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// Splits qemu's `key=value,…` options (`,,` is a comma inside a value).
fn qemu_split(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut push = |cur: &mut String| {
        let item = std::mem::take(cur);
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
        out.push((k.to_string(), v.to_string()));
    };
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                push(&mut cur);
            }
        } else {
            cur.push(c);
        }
    }
    push(&mut cur);
    out
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn path_str<'a>(p: &'a Path, what: &str, field: &str) -> Result<&'a str> {
    p.to_str()
        .ok_or_else(|| Error::invalid(what, format!("{field} {} is not UTF-8", p.display())))
}

impl Export {
    /// The export of `source` for the disk `device` (e.g. `vdd`) of an
    /// instance whose files live in `dir`: socket `vhost-<device>.sock`,
    /// pidfile `vhost-<device>.pid`, log `vhost-<device>.log` there.
    pub fn new(
        what: impl Into<String>,
        source: RbdTarget,
        writable: bool,
        dir: &Path,
        device: &str,
    ) -> Export {
        let (socket, pidfile, log) = files(dir, device);
        Export {
            what: what.into(),
            source,
            writable,
            socket,
            pidfile,
            log,
        }
    }

    /// The daemon's QMP monitor socket (`vhost-<device>.qmp`, beside the
    /// export's socket).
    pub fn monitor_path(&self) -> PathBuf {
        self.socket.with_extension("qmp")
    }

    /// The daemon's arguments (without `--daemonize --pidfile`):
    /// `--blockdev driver=rbd,…`, `--export type=vhost-user-blk,…`, and its
    /// QMP monitor `--chardev socket,…` `--monitor chardev=…`.
    pub fn args(&self) -> Result<Vec<String>> {
        let s = &self.source;
        let what = self.what.as_str();
        for (field, v) in [("pool", &s.pool), ("image", &s.image)] {
            if v.is_empty() {
                return Err(Error::invalid(what, format!("empty RBD {field}")));
            }
        }
        // A snapshot is read-only whatever the attachment says.
        let read_only = !self.writable || s.snapshot.is_some();
        if self.writable && read_only {
            return Err(Error::invalid(
                what,
                "a writable export of an RBD snapshot (snapshots are read-only)",
            ));
        }
        let mut dev = format!("driver=rbd,node-name={NODE},pool={}", qemu_escape(&s.pool));
        if !s.namespace.is_empty() {
            dev.push_str(&format!(",namespace={}", qemu_escape(&s.namespace)));
        }
        dev.push_str(&format!(",image={}", qemu_escape(&s.image)));
        if let Some(snap) = &s.snapshot {
            dev.push_str(&format!(",snapshot={}", qemu_escape(snap)));
        }
        dev.push_str(&format!(
            ",conf={}",
            qemu_escape(path_str(&s.conf, what, "ceph conf")?)
        ));
        if let Some(user) = &s.user {
            dev.push_str(&format!(",user={}", qemu_escape(user)));
        }
        // Guest discards reach RBD, so deleted files give space back.
        dev.push_str(&format!(",read-only={},discard=unmap", on(read_only)));
        let export = format!(
            "type=vhost-user-blk,id={EXPORT_ID},node-name={NODE},addr.type=unix,addr.path={},writable={}",
            qemu_escape(path_str(&self.socket, what, "socket")?),
            on(self.writable)
        );
        let monitor = self.monitor_path();
        let chardev = format!(
            "socket,id={MONITOR_ID},path={},server=on,wait=off",
            qemu_escape(path_str(&monitor, what, "monitor socket")?)
        );
        Ok(vec![
            "--blockdev".into(),
            dev,
            "--export".into(),
            export,
            "--chardev".into(),
            chardev,
            "--monitor".into(),
            format!("chardev={MONITOR_ID}"),
        ])
    }

    fn err(&self, op: &'static str, reason: impl Into<String>) -> Error {
        Error::Export {
            what: self.what.clone(),
            op,
            reason: reason.into(),
        }
    }

    /// Starts the daemon unless it is already running (idempotent); a
    /// dead one's files are cleaned up first. Returns once the socket
    /// listens; fails naming the export and quoting the daemon's stderr.
    pub fn start(&self) -> Result<ExportStatus> {
        const OP: &str = "start export";
        let args = self.args()?;
        let sock = path_str(&self.socket, &self.what, "socket")?;
        if !self.socket.is_absolute() {
            return Err(Error::invalid(
                &self.what,
                format!("socket {sock} is not an absolute path"),
            ));
        }
        if sock.len() > MAX_SOCKET_PATH {
            return Err(Error::invalid(
                &self.what,
                format!(
                    "socket path {sock} is {} bytes, at most {MAX_SOCKET_PATH} (use a shorter registry root)",
                    sock.len()
                ),
            ));
        }
        if let Err(e) = std::fs::metadata(&self.source.conf) {
            return Err(self.err(OP, format!("ceph conf {}: {e}", self.source.conf.display())));
        }
        let st = self.status();
        match &st.state {
            // A daemon already serving this socket is kept only if it
            // exports what is asked now (same image, same writability).
            ExportState::Running { pid }
                if daemon_args(*pid).is_some_and(|have| serves(&have, &args)) =>
            {
                return Ok(st);
            }
            _ => self.stop()?,
        }
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                op: "create export directory",
                source,
            })?;
        }
        let log = std::fs::File::create(&self.log).map_err(|source| Error::Io {
            path: self.log.clone(),
            op: "create export log",
            source,
        })?;
        let mut child = Command::new(DAEMON)
            .args(&args)
            .arg("--daemonize")
            .arg("--pidfile")
            .arg(&self.pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::NotFound {
                    " (install qemu-system-common and qemu-block-extra)"
                } else {
                    ""
                };
                self.err(OP, format!("run {DAEMON}: {e}{hint}"))
            })?;
        // With --daemonize the first process exits once start-up is done
        // (socket bound, pidfile written) or failed.
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if t0.elapsed() > START_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = self.stop();
                    return Err(self.err(
                        OP,
                        format!(
                            "{DAEMON} did not finish starting within {START_TIMEOUT:?}: {}",
                            self.log_text()
                        ),
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(self.err(OP, format!("wait for {DAEMON}: {e}"))),
            }
        };
        if !status.success() {
            let why = self.log_text();
            let _ = self.stop();
            return Err(self.err(OP, format!("{DAEMON} failed ({status}): {why}")));
        }
        let st = self.status();
        match &st.state {
            ExportState::Running { .. } => Ok(st),
            other => {
                let why = format!("{other:?} after start; daemon said: {}", self.log_text());
                let _ = self.stop();
                Err(self.err(OP, why))
            }
        }
    }

    /// The daemon's start-up messages, trimmed, or a note that there are none.
    fn log_text(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let s = s.trim();
        if s.is_empty() {
            "(no output)".into()
        } else {
            s.to_string()
        }
    }

    /// Where the export stands: running only if the pidfile's process is
    /// a qemu-storage-daemon exporting on our socket and the socket listens.
    pub fn status(&self) -> ExportStatus {
        ExportStatus {
            what: self.what.clone(),
            socket: self.socket.clone(),
            writable: self.writable,
            state: state_of(&self.socket, &self.pidfile),
        }
    }

    /// Starts the export again if its daemon is not running (after a
    /// crash or a host reboot); a running one is left alone.
    pub fn restart_if_dead(&self) -> Result<ExportStatus> {
        self.start()
    }

    /// Stops the daemon (`SIGTERM`, then `SIGKILL` after
    /// [`STOP_TIMEOUT`]) and removes the socket, monitor socket, pidfile
    /// and log. Idempotent; a pid that is no longer our daemon gets no
    /// signal.
    pub fn stop(&self) -> Result<()> {
        stop_files(
            &self.what,
            &self.socket,
            &self.pidfile,
            &[&self.monitor_path(), &self.log],
        )
    }

    /// Grows the exported image to `new_size` bytes while the guest runs,
    /// through the daemon's QMP monitor (`block_resize`): the daemon's
    /// librbd resizes the image, and a daemon that implements it tells the
    /// front end (vhost-user config change; see the module docs).
    /// Returns the size before. Refuses to shrink, a read-only export, a
    /// stopped or dead daemon, and one started without a monitor (by an
    /// older vmvol: it must be started again first). The same size is a
    /// no-op.
    pub fn resize(&self, new_size: u64) -> Result<u64> {
        const OP: &str = "resize export";
        if !self.writable {
            return Err(self.err(OP, "a read-only export cannot be resized"));
        }
        if new_size == 0 || !new_size.is_multiple_of(512) {
            return Err(Error::invalid(
                &self.what,
                format!("size {new_size} is not a positive multiple of 512 bytes"),
            ));
        }
        let pid = match self.status().state {
            ExportState::Running { pid } => pid,
            ExportState::Stopped => {
                return Err(self.err(OP, "its daemon is not running (the export is stopped)"))
            }
            ExportState::Dead { reason } => {
                return Err(self.err(OP, format!("its daemon is not running: {reason}")))
            }
        };
        let monitor = self.monitor_path();
        let has_monitor = daemon_args(pid).is_some_and(|a| a.iter().any(|x| x == "--monitor"))
            && is_listening(&monitor);
        if !has_monitor {
            return Err(self.err(
                OP,
                format!(
                    "its {DAEMON} (pid {pid}) has no QMP monitor on {} (started by an older \
                     vmvol): it cannot be resized online until its export is started again \
                     (detach and attach the instance)",
                    monitor.display()
                ),
            ));
        }
        let mut qmp = Qmp::connect(&monitor).map_err(|e| self.err(OP, e))?;
        let current = qmp.node_size(NODE).map_err(|e| self.err(OP, e))?;
        if new_size < current {
            return Err(self.err(
                OP,
                format!("shrinking from {current} to {new_size} bytes is refused"),
            ));
        }
        if new_size > current {
            qmp.execute(
                "block_resize",
                serde_json::json!({"node-name": NODE, "size": new_size}),
            )
            .map_err(|e| self.err(OP, e))?;
            let now = qmp.node_size(NODE).map_err(|e| self.err(OP, e))?;
            if now != new_size {
                return Err(self.err(
                    OP,
                    format!("block_resize to {new_size} bytes left the image at {now} bytes"),
                ));
            }
        }
        Ok(current)
    }
}

/// A minimal QMP client over the daemon's monitor socket: one JSON object
/// a line each way; asynchronous events (`{"event": …}`) are skipped.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
    path: PathBuf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation
    /// mode (`qmp_capabilities`). Errors are sentences for [`Error::Export`].
    fn connect(path: &Path) -> std::result::Result<Qmp, String> {
        use std::os::unix::net::UnixStream;
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("connect to QMP monitor {}: {e}", path.display()))?;
        let timeouts = stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(QMP_TIMEOUT)));
        let writer = stream.try_clone().and_then(|w| timeouts.map(|()| w));
        let writer = writer.map_err(|e| format!("set up QMP monitor {}: {e}", path.display()))?;
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream),
            writer,
            path: path.to_path_buf(),
        };
        let greeting = q.read_message("the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(format!(
                "QMP monitor {} greeted with {greeting} (not QMP)",
                path.display()
            ));
        }
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    /// Reads the next message that is not an event.
    fn read_message(
        &mut self,
        waiting_for: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(|e| {
                let why = if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    format!("no answer within {QMP_TIMEOUT:?}")
                } else {
                    e.to_string()
                };
                format!("QMP monitor {}: {waiting_for}: {why}", self.path.display())
            })?;
            if n == 0 {
                return Err(format!(
                    "QMP monitor {} closed the connection before {waiting_for}",
                    self.path.display()
                ));
            }
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
                format!(
                    "QMP monitor {}: {waiting_for}: not JSON ({e}): {}",
                    self.path.display(),
                    line.trim()
                )
            })?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs `command` with `arguments`; its `return` value, or QMP's
    /// error description quoted.
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        use std::io::Write;
        let mut msg = serde_json::json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP monitor {}: send {command}: {e}", self.path.display()))?;
        let answer = self.read_message(&format!("the answer to {command}"))?;
        if let Some(r) = answer.get("return") {
            return Ok(r.clone());
        }
        let desc = answer
            .get("error")
            .and_then(|e| e.get("desc"))
            .and_then(|d| d.as_str());
        Err(match desc {
            Some(d) => format!("QMP {command} failed: \"{d}\""),
            None => format!("QMP {command}: unexpected answer {answer}"),
        })
    }

    /// The virtual size in bytes of block node `node`.
    fn node_size(&mut self, node: &str) -> std::result::Result<u64, String> {
        let nodes = self.execute("query-named-block-nodes", serde_json::json!({"flat": true}))?;
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n.get("node-name").and_then(|x| x.as_str()) == Some(node))
            .and_then(|n| n.get("image")?.get("virtual-size")?.as_u64())
            .ok_or_else(|| format!("QMP query-named-block-nodes: no size of node {node}"))
    }
}

/// Whether a daemon running with (block/export/monitor) arguments `have`
/// serves what `want` asks: the same, or the same without the QMP monitor
/// (a daemon of an older vmvol: kept rather than cut from under a running
/// guest; [`Export::resize`] says it must be started again).
fn serves(have: &[String], want: &[String]) -> bool {
    let data = |a: &[String]| -> Vec<String> {
        a.chunks(2)
            .filter(|p| {
                p.first()
                    .is_some_and(|o| o == "--blockdev" || o == "--export")
            })
            .flatten()
            .cloned()
            .collect()
    };
    have == want || have == data(want).as_slice()
}

/// Socket, pidfile and log of the export of disk `device` in `dir`.
fn files(dir: &Path, device: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let f = |ext: &str| dir.join(format!("{PREFIX}{device}.{ext}"));
    (f("sock"), f("pid"), f("log"))
}

/// The vhost-user socket of disk `device` of an instance whose files live
/// in `dir` (what its `DiskConfig` names).
pub fn socket_path(dir: &Path, device: &str) -> PathBuf {
    files(dir, device).0
}

fn read_pid(pidfile: &Path) -> std::io::Result<Option<u32>> {
    match std::fs::read_to_string(pidfile) {
        Ok(s) => Ok(s.trim().parse::<u32>().ok().filter(|p| *p > 0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether process `pid` is a qemu-storage-daemon exporting on `socket`
/// (its `/proc/PID/cmdline`; a zombie's is empty, so it is not).
fn is_our_daemon(pid: u32, socket: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = raw.split(|b| *b == 0).map(String::from_utf8_lossy);
    let Some(arg0) = args.next() else {
        return false;
    };
    if Path::new(arg0.as_ref()).file_name() != Some(std::ffi::OsStr::new(DAEMON)) {
        return false;
    }
    let Some(sock) = socket.to_str() else {
        return false;
    };
    let mut prev_export = false;
    for a in args {
        if prev_export
            && qemu_split(&a)
                .iter()
                .any(|(k, v)| k == "addr.path" && v == sock)
        {
            return true;
        }
        prev_export = a == "--export";
    }
    false
}

/// The `--blockdev`/`--export`/`--chardev`/`--monitor` arguments process
/// `pid` runs with (what [`Export::args`] gives), or `None` if it cannot be
/// read.
fn daemon_args(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let all: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut out = Vec::new();
    let mut it = all.iter().skip(1);
    while let Some(a) = it.next() {
        if matches!(
            a.as_str(),
            "--blockdev" | "--export" | "--chardev" | "--monitor"
        ) {
            out.push(a.clone());
            out.push(it.next()?.clone());
        }
    }
    Some(out)
}

/// Whether a Unix socket bound to `socket` is listening (`/proc/net/unix`:
/// flag `__SO_ACCEPTCON`), checked without connecting to it.
fn is_listening(socket: &Path) -> bool {
    const ACCEPTCON: u32 = 0x10000;
    let Some(sock) = socket.to_str() else {
        return false;
    };
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    table.lines().skip(1).any(|l| {
        // Num RefCount Protocol Flags Type St Inode Path
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = f.get(3).and_then(|x| u32::from_str_radix(x, 16).ok());
        let path = f.get(7..).map(|p| p.join(" "));
        flags.is_some_and(|x| x & ACCEPTCON != 0) && path.as_deref() == Some(sock)
    })
}

fn state_of(socket: &Path, pidfile: &Path) -> ExportState {
    let pid = match read_pid(pidfile) {
        Ok(p) => p,
        Err(e) => {
            return ExportState::Dead {
                reason: format!("pidfile {}: {e}", pidfile.display()),
            }
        }
    };
    match pid {
        None if pidfile.exists() => ExportState::Dead {
            reason: format!("pidfile {} holds no pid", pidfile.display()),
        },
        None if socket.exists() => ExportState::Dead {
            reason: format!("socket {} left without a daemon", socket.display()),
        },
        None => ExportState::Stopped,
        Some(pid) if !is_our_daemon(pid, socket) => ExportState::Dead {
            reason: format!("pid {pid} is not a {DAEMON} exporting on this socket (it died)"),
        },
        Some(pid) if !is_listening(socket) => ExportState::Dead {
            reason: format!("{DAEMON} pid {pid} does not listen on {}", socket.display()),
        },
        Some(pid) => ExportState::Running { pid },
    }
}

/// A qemu-storage-daemon exporting on `socket` found by scanning `/proc`
/// (when its pidfile is gone, e.g. removed with its directory).
fn find_daemon(socket: &Path) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_our_daemon(*pid, socket))
}

fn wait_gone(pid: u32, socket: &Path, within: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if !is_our_daemon(pid, socket) {
            return true;
        }
        if t0.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_if_there(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            path: p.to_path_buf(),
            op: "remove export file",
            source,
        }),
    }
}

/// Stops the daemon exporting on `socket` and removes `socket`, `pidfile`
/// and the `others` (monitor socket, log).
fn stop_files(what: &str, socket: &Path, pidfile: &Path, others: &[&Path]) -> Result<()> {
    const OP: &str = "stop export";
    let err = |reason: String| Error::Export {
        what: what.to_string(),
        op: OP,
        reason,
    };
    let pid = read_pid(pidfile)
        .map_err(|e| err(format!("read pidfile {}: {e}", pidfile.display())))?
        .filter(|p| is_our_daemon(*p, socket))
        .or_else(|| find_daemon(socket));
    if let Some(pid) = pid {
        match crate::sys::kill(pid, crate::sys::SIGTERM) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(err(format!("SIGTERM to {DAEMON} pid {pid}: {e}"))),
        }
        if !wait_gone(pid, socket, STOP_TIMEOUT) {
            match crate::sys::kill(pid, crate::sys::SIGKILL) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(err(format!("SIGKILL to {DAEMON} pid {pid}: {e}"))),
            }
            if !wait_gone(pid, socket, Duration::from_secs(5)) {
                return Err(err(format!(
                    "{DAEMON} pid {pid} still runs after SIGTERM and SIGKILL"
                )));
            }
        }
    }
    for p in [socket, pidfile].iter().chain(others) {
        remove_if_there(p)?;
    }
    Ok(())
}

/// Stops every export whose files are in `dir` (an instance's files
/// directory), e.g. those a crashed attach left. Idempotent; a missing
/// directory has none.
pub fn stop_all_in(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                op: "list export files",
                source,
            })
        }
    };
    let mut devices: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_prefix(PREFIX)?;
            let (dev, ext) = stem.rsplit_once('.')?;
            matches!(ext, "sock" | "pid" | "log" | "qmp").then(|| dev.to_string())
        })
        .collect();
    devices.sort();
    devices.dedup();
    for dev in &devices {
        let (socket, pidfile, log) = files(dir, dev);
        stop_files(
            &format!("export {dev} in {}", dir.display()),
            &socket,
            &pidfile,
            &[&socket.with_extension("qmp"), &log],
        )?;
    }
    Ok(devices.len())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target() -> RbdTarget {
        RbdTarget {
            pool: "p,1".into(),
            namespace: String::new(),
            image: "v+volumes+a+data+raw".into(),
            snapshot: None,
            conf: "/etc/ceph/ceph.conf".into(),
            user: Some("admin".into()),
        }
    }

    #[test]
    fn args_escape_commas_and_follow_the_mode() {
        let e = Export::new("volume a (vdd)", target(), false, Path::new("/x,y"), "vdd");
        let a = e.args().unwrap();
        assert_eq!(
            a[1],
            "driver=rbd,node-name=vmvol0,pool=p,,1,image=v+volumes+a+data+raw,\
             conf=/etc/ceph/ceph.conf,user=admin,read-only=on,discard=unmap"
        );
        assert_eq!(
            a[3],
            "type=vhost-user-blk,id=vmvol-export0,node-name=vmvol0,addr.type=unix,\
             addr.path=/x,,y/vhost-vdd.sock,writable=off"
        );
        let split = qemu_split(&a[3]);
        assert!(split.contains(&("addr.path".into(), "/x,y/vhost-vdd.sock".into())));
        assert_eq!(
            a[4..],
            [
                "--chardev",
                "socket,id=vmvol-qmp,path=/x,,y/vhost-vdd.qmp,server=on,wait=off",
                "--monitor",
                "chardev=vmvol-qmp"
            ]
        );
        // A daemon of an older vmvol (no monitor) still serves these args;
        // one exporting something else does not.
        assert!(serves(&a, &a));
        assert!(serves(&a[..4], &a));
        let mut other = a.clone();
        other[1] = other[1].replace("read-only=on", "read-only=off");
        assert!(!serves(&other, &a) && !serves(&other[..4], &a));
        let mut snap = target();
        snap.snapshot = Some("s".into());
        let e = Export::new("v", snap, true, Path::new("/d"), "vdd");
        assert!(e.args().is_err(), "a writable snapshot export is refused");
    }
}
