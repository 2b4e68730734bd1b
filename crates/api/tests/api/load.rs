//! Load: 8 clients × mixed requests in parallel, then every invariant.

use std::collections::BTreeSet;

use serde_json::json;
use vmvol_pool::Wait;

use crate::Server;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_mixed_requests() {
    let s = std::sync::Arc::new(Server::start().await);
    s.ok(
        "define-pool",
        json!({"name": "default", "quota": "256M", "activate": true}),
        201,
    )
    .await;
    let per_client: usize = std::env::var("VMVOL_API_LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<u16, usize>::new();
            for i in 0..per_client {
                // Few names shared by all clients, so requests collide.
                let name = format!("v{}", (c * 7 + i) % 12);
                let (st, _) = match i % 4 {
                    0 => {
                        s.api(
                            "create-volume",
                            json!({"pool": "default", "name": name, "size": 32 * MIB}),
                        )
                        .await
                    }
                    1 => {
                        s.api("describe-volume", json!({"pool": "default", "name": name}))
                            .await
                    }
                    2 => {
                        s.api("list-volumes", json!({"pool": "default", "name": "v1"}))
                            .await
                    }
                    _ => {
                        s.api("delete-volume", json!({"pool": "default", "name": name}))
                            .await
                    }
                };
                *codes.entry(st).or_default() += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *codes.entry(k).or_default() += v;
        }
    }
    // Only expected answers: ok, created, not found, exists, no room.
    for k in codes.keys() {
        assert!(
            [200, 201, 404, 409, 507].contains(k),
            "unexpected status {k}: {codes:?}"
        );
    }
    assert!(codes.get(&201).copied().unwrap_or(0) > 0, "{codes:?}");

    // Invariants: no overcommit, no orphan, figures equal a rescan.
    let reg = s.vols.registry();
    let info = reg.info("default", Wait::Block).unwrap();
    assert!(info.allocation <= info.limit, "overcommitted: {info:?}");
    assert_eq!(info.reservations, 0);
    assert_eq!(s.staged("default"), 0);
    let (_, l) = s.api("list-volumes", json!({"pool": "default"})).await;
    let listed: BTreeSet<String> = l["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "ok", "{r}");
            r["uuid"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(listed.len() as u64 * 32 * MIB, info.virtual_size);
    let p = s.vols.pool("default").unwrap();
    let on_disk: BTreeSet<String> = std::fs::read_dir(p.location().join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, listed, "orphans or missing entries");
    let fresh = reg.refresh("default", Wait::Block).unwrap();
    assert_eq!(
        (fresh.allocation, fresh.virtual_size, fresh.volumes),
        (info.allocation, info.virtual_size, info.volumes)
    );
}
