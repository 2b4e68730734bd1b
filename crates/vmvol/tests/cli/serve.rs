//! `vmvol serve`: the HTTP API on an owner-only Unix socket; what it
//! answers is what the CLI prints.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{ok, vmvol};

/// One HTTP/1.1 request over the socket; the status and the body.
fn http(sock: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: vmvol\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn serve_answers_what_the_cli_prints() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("reg");
    let sock = dir.path().join("api.sock");
    let bin = vmvol();
    let mut child = Command::new(bin)
        .args(["serve", "--socket"])
        .arg(&sock)
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no socket");
        assert!(child.try_wait().unwrap().is_none(), "serve exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let (st, b) = http(
        &sock,
        "POST",
        "/api/define-pool",
        r#"{"name": "default", "quota": "1G", "activate": true}"#,
    );
    assert_eq!(st, 201, "{b}");
    let (st, b) = http(
        &sock,
        "POST",
        "/volumes",
        r#"{"name": "web", "size_gb": 0}"#,
    );
    assert_eq!(st, 400, "{b}");
    let (st, b) = http(
        &sock,
        "POST",
        "/api/create-volume",
        r#"{"pool": "default", "name": "web", "size": "64M", "ext4": true}"#,
    );
    assert_eq!(st, 201, "{b}");
    let (st, api) = http(
        &sock,
        "POST",
        "/api/describe-volume",
        r#"{"pool": "default", "name": "web"}"#,
    );
    assert_eq!(st, 200, "{api}");
    let root_s = root.to_str().unwrap();
    let cli = ok(
        bin,
        &[
            "volume", "describe", "web", "--root", root_s, "--output", "json",
        ],
    );
    let api: serde_json::Value = serde_json::from_str(&api).unwrap();
    let cli: serde_json::Value = serde_json::from_str(&cli).unwrap();
    assert_eq!(api, cli);

    // SIGTERM: stops, removes its socket, exits 0.
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("serving on unix:"), "{err}");
    assert!(!sock.exists());
}
