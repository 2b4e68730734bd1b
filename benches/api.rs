//! Benchmark of vmvol-api over its Unix socket (numbers go to
//! docs/performance.md), with a real HTTP/1.1 client on keep-alive
//! connections:
//! - a pool of 10,000 volumes: describe and filtered list, 8 concurrent
//!   clients: requests per second and p50/p99 latency (target p99 < 10 ms);
//! - create + delete of a sparse qcow2 volume, one client: operations per
//!   second, beside the disk's floor (one bare crash-safe record write).
//!
//! `cargo bench -p vmvol-api --bench api` (`VMVOL_BENCH_DIR` picks the
//! disk; default /var/tmp).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use vmvol_api::{bind_unix, router, ApiConfig};
use vmvol_format::{Format, Prealloc};
use vmvol_pool::{write_atomic, CapacityPolicy, PoolSpec, Record, Registry, Wait};
use vmvol_volume::{Provenance, VolumeRecord, Volumes};

const GIB: u64 = 1 << 30;

async fn connect(sock: &std::path::Path) -> SendRequest<Full<Bytes>> {
    let s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn post(
    tx: &mut SendRequest<Full<Bytes>>,
    path: &str,
    body: &serde_json::Value,
) -> (u16, Bytes) {
    tx.ready().await.unwrap();
    let req = Request::post(path)
        .header("host", "vmvol")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let st = resp.status().as_u16();
    (st, resp.into_body().collect().await.unwrap().to_bytes())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `per_client` requests from each of 8 clients; prints req/s, p50, p99.
async fn load(
    sock: &std::path::Path,
    what: &str,
    per_client: usize,
    body: impl Fn(usize, usize) -> (String, serde_json::Value) + Send + Sync + 'static,
) {
    let body = Arc::new(body);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..8 {
        let sock = sock.to_path_buf();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = connect(&sock).await;
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let (path, b) = body(c, i);
                let t = Instant::now();
                let (st, _) = post(&mut tx, &path, &b).await;
                lat.push(t.elapsed());
                assert_eq!(st, 200);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = t0.elapsed();
    all.sort();
    println!(
        "| {what} | {:.0} req/s | p50 {:.2} ms | p99 {:.2} ms | {} requests |",
        all.len() as f64 / wall.as_secs_f64(),
        pct(&all, 0.50).as_secs_f64() * 1e3,
        pct(&all, 0.99).as_secs_f64() * 1e3,
        all.len()
    );
}

fn main() {
    let base = std::env::var_os("VMVOL_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let t = tempfile::tempdir_in(base).unwrap();
    let reg = Registry::open(t.path().join("reg")).unwrap();
    let spec = PoolSpec {
        capacity: CapacityPolicy::Quota { bytes: 1 << 60 },
        ..PoolSpec::default()
    };
    reg.define("default", &spec).unwrap();
    reg.activate("default", Wait::Block).unwrap();
    let dir = reg
        .get("default")
        .unwrap()
        .backend
        .local_path()
        .unwrap()
        .join("volumes");
    // Lay 10,000 entries down directly (what 10,000 creates leave behind,
    // without 10,000 fsyncs of setup time); opening the pool rescans them.
    for i in 0..10_000u32 {
        let id = format!("00000000-0000-4000-8000-{i:012}");
        let d = dir.join(&id);
        std::fs::create_dir(&d).unwrap();
        let r = VolumeRecord {
            name: format!("vol-{i:05}"),
            created: "2026-12-02T00:00:00Z".into(),
            format: Format::Raw,
            size: GIB,
            prealloc: Prealloc::Off,
            ext4: false,
            provenance: Provenance::Blank,
            base: None,
            attachments: Vec::new(),
        };
        std::fs::write(d.join("volume.json"), Record::new(r).to_bytes(&d).unwrap()).unwrap();
        std::fs::File::create(d.join("data.raw"))
            .unwrap()
            .set_len(GIB)
            .unwrap();
    }
    let vols = Volumes::new(reg);
    vols.pool("default").unwrap();
    let sock = t.path().join("api.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = bind_unix(&sock).unwrap();
        tokio::spawn(axum::serve(l, router(vols, ApiConfig::default())).into_future());
        println!("| case | throughput | p50 | p99 | n |");
        println!("|---|---|---|---|---|");
        // Warm-up: the name cache and the page cache.
        load(&sock, "warm-up describe", 50, |c, i| {
            ("/api/describe-volume".into(), json!({"pool": "default", "name": format!("vol-{:05}", (c * 1250 + i * 25) % 10_000)}))
        })
        .await;
        load(&sock, "describe, 10,000-volume pool, 8 clients", 1000, |c, i| {
            ("/api/describe-volume".into(), json!({"pool": "default", "name": format!("vol-{:05}", (c * 1250 + i * 25) % 10_000)}))
        })
        .await;
        load(&sock, "filtered list (10 of 10,000), 8 clients", 25, |c, i| {
            ("/api/list-volumes".into(), json!({"pool": "default", "name": format!("VOL-{:04}", (c * 25 + i) % 1000)}))
        })
        .await;

        // create + delete of a sparse qcow2 volume, one client.
        let mut tx = connect(&sock).await;
        let n = 200;
        let t0 = Instant::now();
        for i in 0..n {
            let (st, _) = post(&mut tx, "/api/create-volume", &json!({"pool": "default", "name": format!("cd-{i}"), "size": "10G", "format": "qcow2"})).await;
            assert_eq!(st, 201);
            let (st, _) = post(&mut tx, "/api/delete-volume", &json!({"pool": "default", "name": format!("cd-{i}")})).await;
            assert_eq!(st, 200);
        }
        let per = t0.elapsed() / n;
        let floor_file = t.path().join("floor.json");
        let m = 200u32;
        let f0 = Instant::now();
        for _ in 0..m {
            write_atomic(&floor_file, b"{}\n").unwrap();
        }
        let floor = f0.elapsed() / m;
        println!(
            "| create + delete, sparse 10 GiB qcow2, 1 client | {:.0} ops/s | {:.2} ms each | – | {n} |",
            1.0 / per.as_secs_f64(),
            per.as_secs_f64() * 1e3
        );
        println!(
            "| floor: one crash-safe record write (temp, fsync, rename, fsync dir) | {:.0} /s | {:.3} ms each | – | {m} |",
            1.0 / floor.as_secs_f64(),
            floor.as_secs_f64() * 1e3
        );
    });
}
