#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! vmvol-api over a real socket with a real HTTP client (hyper): seed 004's
//! flow, the `/volumes` API, jobs, security, the OpenAPI document, load.

mod compat;
mod flow;
mod instances;
mod jobs;
mod load;
mod openapi;
mod security;

use std::future::IntoFuture;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use vmvol_api::{bind_unix, router, ApiConfig};
use vmvol_pool::{AttachTarget, Registry};
use vmvol_volume::Volumes;

/// A running service on a Unix socket in a fresh registry.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub root: PathBuf,
    /// A second handle on the same registry, for checks behind the API.
    pub vols: Volumes,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ApiConfig)) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("registry");
        let mut cfg = ApiConfig {
            upload_dir: dir.path().join("uploads"),
            ..ApiConfig::default()
        };
        std::fs::create_dir_all(&cfg.upload_dir).unwrap();
        tweak(&mut cfg);
        let vols = Volumes::new(Registry::open(&root).unwrap());
        let sock = dir.path().join("vmvol.sock");
        let listener = bind_unix(&sock).unwrap();
        tokio::spawn(axum::serve(listener, router(vols, cfg)).into_future());
        Server {
            vols: Volumes::new(Registry::open(&root).unwrap()),
            dir,
            sock,
            root,
        }
    }

    /// `method path` with a JSON body; the status and the JSON answer
    /// (`null` when empty).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vmvol");
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(b.to_string()))),
            None => req.body(Full::new(Bytes::new())),
        }
        .unwrap();
        let (status, bytes) = send_unix(&self.sock, req).await;
        (status, parse(&bytes))
    }

    /// `POST /api/<op>` with `body`.
    pub async fn api(&self, op: &str, body: Value) -> (u16, Value) {
        self.call("POST", &format!("/api/{op}"), Some(body)).await
    }

    /// `POST /api/<op>` that must answer `want`.
    pub async fn ok(&self, op: &str, body: Value, want: u16) -> Value {
        let (s, v) = self.api(op, body.clone()).await;
        assert_eq!(s, want, "{op} {body} answered {s} {v}");
        v
    }

    /// Defines and activates pool `name` through the API.
    pub async fn pool(&self, name: &str) {
        self.ok("define-pool", json!({"name": name, "activate": true}), 201)
            .await;
    }

    /// Attaches volume `name` read-write at `/data` to new instance
    /// `instance` through `POST /api/attach-instance`, or (`None`) detaches
    /// every instance it is attached to through `POST /api/detach-instance`.
    pub async fn set_attached(&self, pool: &str, name: &str, instance: Option<&str>) {
        match instance {
            Some(i) => {
                let v = self
                    .ok(
                        "attach-instance",
                        json!({
                            "instance": i,
                            "rootfs": "/images/rootfs.raw", "rootfs_image_type": "raw",
                            "instance_overlay": format!("/guests/{i}/overlay.raw"),
                            "instance_overlay_image_type": "raw",
                            "volumes": [{"pool": pool, "volume_id": name, "mount_path": "/data"}],
                        }),
                        201,
                    )
                    .await;
                assert_eq!(v["disks"][3]["id"], "vdd", "{v}");
            }
            None => {
                let d = self.vols.describe_volume(pool, name).unwrap();
                for a in d.attachments {
                    self.ok("detach-instance", json!({"instance": a.instance}), 200)
                        .await;
                }
            }
        }
    }

    /// The image file of volume `name`.
    pub fn image_path(&self, pool: &str, name: &str) -> PathBuf {
        match self.vols.describe_volume(pool, name).unwrap().path {
            AttachTarget::File { path, .. } => path,
            other => panic!("not a file: {other:?}"),
        }
    }

    /// Entries in the pool's staging area (in-flight work).
    pub fn staged(&self, pool: &str) -> usize {
        let p = self.vols.pool(pool).unwrap();
        std::fs::read_dir(p.location().join("staging"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

pub fn parse(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
    }
}

/// One request on a fresh Unix-socket connection.
pub async fn send_unix(sock: &Path, req: Request<Full<Bytes>>) -> (u16, Bytes) {
    let s = tokio::net::UnixStream::connect(sock).await.unwrap();
    send(TokioIo::new(s), req).await
}

/// One request on a fresh TCP connection.
pub async fn send_tcp(addr: std::net::SocketAddr, req: Request<Full<Bytes>>) -> (u16, Bytes) {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    send(TokioIo::new(s), req).await
}

async fn send<T>(io: T, req: Request<Full<Bytes>>) -> (u16, Bytes)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// The `kind` of an error answer.
pub fn kind(v: &Value) -> &str {
    v["error"]["kind"].as_str().unwrap_or("")
}
