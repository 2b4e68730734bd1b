//! Security: socket mode, bearer token on TCP, body limits, names, import roots.

use std::future::IntoFuture;
use std::os::unix::fs::PermissionsExt;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use serde_json::json;
use vmvol_api::{require_token, router, ApiConfig};
use vmvol_pool::Registry;
use vmvol_volume::Volumes;

use crate::{kind, parse, send_tcp, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_is_owner_only() {
    let s = Server::start().await;
    let mode = std::fs::metadata(&s.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Nothing of the private directory it was made in is left.
    let left: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vmvol-sock"))
        .collect();
    assert!(left.is_empty());
    // A regular file in the way is not replaced.
    let f = s.dir.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    assert!(vmvol_api::bind_unix(&f).is_err());
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
}

fn get(path: &str, auth: Option<&str>) -> Request<Full<Bytes>> {
    let mut r = Request::get(path).header("host", "vmvol");
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let vols = Volumes::new(Registry::open(dir.path()).unwrap());
    let app = require_token(router(vols, ApiConfig::default()), "s3cret-token".into());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(axum::serve(l, app).into_future());

    let (st, b) = send_tcp(addr, get("/api/jobs/x", None)).await;
    assert_eq!((st, kind(&parse(&b))), (401, "unauthorized"));
    let (st, _) = send_tcp(addr, get("/volumes", Some("Bearer wrong-token!"))).await;
    assert_eq!(st, 401);
    let (st, _) = send_tcp(addr, get("/volumes", Some("Bearer s3cret-toke"))).await;
    assert_eq!(st, 401);
    let (st, _) = send_tcp(addr, get("/volumes", Some("Basic s3cret-token"))).await;
    assert_eq!(st, 401);
    let (st, _) = send_tcp(addr, get("/openapi.json", Some("Bearer s3cret-token"))).await;
    assert_eq!(st, 200);
    // The token passes; the pool is missing: 404, not 401.
    let (st, b) = send_tcp(addr, get("/volumes", Some("Bearer s3cret-token"))).await;
    assert_eq!(st, 404, "{}", String::from_utf8_lossy(&b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limits_names_and_import_roots() {
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let roots = vec![allowed.path().to_path_buf()];
    let s = Server::start_with(|c| c.import_roots = roots).await;
    s.pool("p").await;

    // 2 MiB of JSON: 413.
    let big = "x".repeat(2 << 20);
    let body = json!({"pool": "p", "name": big}).to_string();
    let (st, e) = post_early_answer(&s.sock, "/api/list-volumes", body).await;
    assert_eq!((st, kind(&e)), (413, "payload_too_large"), "{e}");
    let body = json!({"name": big, "size_gb": 1}).to_string();
    let (st, e) = post_early_answer(&s.sock, "/volumes", body).await;
    assert_eq!((st, kind(&e)), (413, "payload_too_large"), "{e}");

    // Traversal and absolute names.
    for name in ["../p", "/etc", "a/b", "..", ".", ""] {
        let (st, e) = s
            .api(
                "create-volume",
                json!({"pool": "p", "name": name, "size": "1M"}),
            )
            .await;
        assert_eq!(st, 400, "{name:?}: {e}");
        let (st, e) = s.api("define-pool", json!({"name": name})).await;
        assert_eq!(st, 400, "pool {name:?}: {e}");
    }

    // An image to import: a raw file, inside and outside the allowed root.
    let inside = allowed.path().join("disk.raw");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    let out = outside.path().join("disk.raw");
    std::fs::write(&out, vec![0u8; 1 << 20]).unwrap();
    // A symlink under the root pointing outside is outside too.
    let link = allowed.path().join("link.raw");
    std::os::unix::fs::symlink(&out, &link).unwrap();
    for (p, want) in [
        (out.to_str().unwrap().to_string(), 403),
        (link.to_str().unwrap().to_string(), 403),
        (
            format!(
                "{}/../{}/disk.raw",
                allowed.path().display(),
                outside.path().file_name().unwrap().to_string_lossy()
            ),
            403,
        ),
        ("relative/disk.raw".to_string(), 400),
        (inside.to_str().unwrap().to_string(), 201),
    ] {
        let (st, e) = s
            .api(
                "create-template",
                json!({"pool": "p", "name": "t", "image": p}),
            )
            .await;
        assert_eq!(st, want, "{p}: {e}");
        if want == 403 {
            let m = e["error"]["message"].as_str().unwrap();
            assert!(!m.contains(s.root.to_str().unwrap()), "{m}");
        }
    }
    let (st, e) = s
        .api(
            "create-volume",
            json!({"pool": "p", "name": "v", "archive": out.to_str().unwrap()}),
        )
        .await;
    assert_eq!(st, 403, "{e}");
}

/// POSTs `body` and reads the answer even when the server answers (and
/// closes) before the body is all sent, as it does past a body limit.
async fn post_early_answer(
    sock: &std::path::Path,
    path: &str,
    body: String,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let st = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (mut rd, mut wr) = st.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: vmvol\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let writer = tokio::spawn(async move {
        // The server may stop reading: a failed write is expected.
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(body.as_bytes()).await;
    });
    let mut answer = Vec::new();
    let _ = rd.read_to_end(&mut answer).await;
    writer.abort();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    // The body may be chunked: take the JSON object inside it.
    let start = json.find('{').unwrap_or(0);
    let end = json.rfind('}').map(|e| e + 1).unwrap_or(json.len());
    (status, parse(json.get(start..end).unwrap_or("").as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let boom = axum::Router::new().route(
        "/boom",
        axum::routing::get(|| async {
            if std::hint::black_box(true) {
                panic!("handler bug");
            }
            "unreachable"
        }),
    );
    let vols = Volumes::new(Registry::open(dir.path().join("reg")).unwrap());
    let app = vmvol_api::harden(boom, 1 << 20).merge(router(vols, ApiConfig::default()));
    let sock = dir.path().join("s.sock");
    let l = vmvol_api::bind_unix(&sock).unwrap();
    tokio::spawn(axum::serve(l, app).into_future());
    let req = || {
        Request::get("/boom")
            .header("host", "vmvol")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    for _ in 0..3 {
        let (st, b) = crate::send_unix(&sock, req()).await;
        assert_eq!((st, kind(&parse(&b))), (500, "internal"));
    }
    let ok = Request::get("/openapi.json")
        .header("host", "vmvol")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (st, _) = crate::send_unix(&sock, ok).await;
    assert_eq!(st, 200);
}
