//! Jobs: progress of an async clone, and a cancelled one leaves nothing.

use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{kind, Server};

const MIB: u64 = 1 << 20;

/// A raw volume of `size` with `data` MiB of non-zero bytes at its start.
async fn filled(s: &Server, name: &str, size: u64, data: u64) {
    s.ok(
        "create-volume",
        json!({"pool": "default", "name": name, "size": size, "format": "raw"}),
        201,
    )
    .await;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.image_path("default", name))
        .unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8 | 1).collect();
    for _ in 0..data {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

async fn wait_done(s: &Server, id: &str, samples: &mut Vec<(u64, u64, u64)>) -> Value {
    let t0 = Instant::now();
    loop {
        let (st, j) = s.call("GET", &format!("/api/jobs/{id}"), None).await;
        assert_eq!(st, 200, "{j}");
        samples.push((
            j["progress"]["phase"].as_u64().unwrap(),
            j["progress"]["done"].as_u64().unwrap(),
            j["progress"]["total"].as_u64().unwrap(),
        ));
        if j["state"] != "running" {
            return j;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "job stuck: {j}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_clone_reports_progress_and_cancel_leaves_nothing() {
    let s = Server::start().await;
    s.pool("default").await;
    s.pool("other").await;
    filled(&s, "big", 512 * MIB, 192).await;

    // A clone to another pool (our chunked copy): progress rises to total.
    let a = s
        .ok(
            "clone-volume",
            json!({"pool": "default", "name": "big", "new_name": "c1", "to_pool": "other", "async": true}),
            202,
        )
        .await;
    let id = a["job_id"].as_str().unwrap().to_string();
    let mut samples = Vec::new();
    let j = wait_done(&s, &id, &mut samples).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["operation"], "clone volume");
    assert_eq!(j["result"]["record"]["name"], "c1");
    // Within a phase `done` only rises; phases only advance.
    assert!(
        samples
            .windows(2)
            .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 <= w[1].1)),
        "progress fell: {samples:?}"
    );
    let (phase, done, total) = *samples.last().unwrap();
    assert!(
        phase >= 1 && total >= 512 * MIB && done == total,
        "{phase} {done}/{total}"
    );
    let seen: std::collections::BTreeSet<u64> = samples
        .iter()
        .filter(|s| s.0 == phase)
        .map(|s| s.1)
        .collect();
    assert!(seen.len() >= 3, "last phase seen rising only at {seen:?}");

    // Cancelled at once: the job ends cancelled; no entry, nothing staged,
    // no reservation left.
    let before = s
        .vols
        .registry()
        .info("other", vmvol_pool::Wait::Block)
        .unwrap();
    let a = s
        .ok(
            "clone-volume",
            json!({"pool": "default", "name": "big", "new_name": "c2", "to_pool": "other", "async": true}),
            202,
        )
        .await;
    let id = a["job_id"].as_str().unwrap().to_string();
    let c = s.ok("cancel-job", json!({"id": id}), 200).await;
    assert_eq!(c["id"], id.as_str());
    let j = wait_done(&s, &id, &mut Vec::new()).await;
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(j["error"]["kind"], "cancelled");
    let (st, e) = s
        .api("describe-volume", json!({"pool": "other", "name": "c2"}))
        .await;
    assert_eq!((st, kind(&e)), (404, "not_found"));
    assert_eq!(s.staged("other"), 0);
    let after = s
        .vols
        .registry()
        .info("other", vmvol_pool::Wait::Block)
        .unwrap();
    assert_eq!(after.reservations, 0);
    assert_eq!(after.allocation, before.allocation);
    assert_eq!(after.volumes, 1);

    // Without async the call waits and answers the result.
    let c = s
        .ok(
            "clone-volume",
            json!({"pool": "default", "name": "big", "new_name": "c3"}),
            201,
        )
        .await;
    assert_eq!(c["record"]["name"], "c3");
    // Unknown job.
    let (st, _) = s.api("cancel-job", json!({"id": "nope"})).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_call() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start().await;
    s.pool("default").await;
    s.pool("other").await;
    filled(&s, "big", 1024 * MIB, 384).await;
    // How long the whole copy takes here, to know how long to wait below.
    let t = Instant::now();
    s.ok(
        "clone-volume",
        json!({"pool": "default", "name": "big", "new_name": "timed", "to_pool": "other"}),
        201,
    )
    .await;
    let full = t.elapsed();
    s.ok(
        "delete-volume",
        json!({"pool": "other", "name": "timed"}),
        200,
    )
    .await;
    let body = json!({"pool": "default", "name": "big", "new_name": "gone", "to_pool": "other"})
        .to_string();
    let mut c = tokio::net::UnixStream::connect(&s.sock).await.unwrap();
    c.write_all(
        format!(
            "POST /api/clone-volume HTTP/1.1\r\nHost: vmvol\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    // The copy stops at its next check and removes its staging area.
    let t0 = Instant::now();
    loop {
        let info = s
            .vols
            .registry()
            .info("other", vmvol_pool::Wait::Block)
            .unwrap();
        if s.staged("other") == 0 && info.reservations == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "work goes on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Had it gone on, the copy would be done by now.
    tokio::time::sleep(full * 2 + Duration::from_millis(500)).await;
    let (st, _) = s
        .api("describe-volume", json!({"pool": "other", "name": "gone"}))
        .await;
    assert_eq!(st, 404, "the call ran to the end although its client left");
    assert_eq!(s.staged("other"), 0);
}
