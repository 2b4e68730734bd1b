//! Seed 004's whole flow over the Unix socket.

use serde_json::json;

use crate::{kind, Server};

const MIB: u64 = 1 << 20;

fn names(v: &serde_json::Value) -> Vec<String> {
    let mut n: Vec<String> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_flow() {
    let s = Server::start().await;
    s.pool("p1").await;
    s.pool("p2").await;

    // Blank (size as a string), a template of it, linked and full volumes
    // from the template, a snapshot and a volume from it.
    let v = s
        .ok(
            "create-volume",
            json!({"pool": "p1", "name": "golden", "size": "64M", "format": "qcow2", "ext4": true}),
            201,
        )
        .await;
    assert_eq!(v["record"]["size"], 64 * MIB);
    assert_eq!(v["pool"], "p1");
    s.ok(
        "create-template",
        json!({"pool": "p1", "name": "base", "volume": "golden"}),
        201,
    )
    .await;
    s.ok(
        "create-volume",
        json!({"pool": "p1", "name": "linked", "template": "base"}),
        201,
    )
    .await;
    s.ok(
        "create-volume",
        json!({"pool": "p1", "name": "full", "template": "base", "mode": "full"}),
        201,
    )
    .await;
    s.ok(
        "create-snapshot",
        json!({"pool": "p1", "name": "s1", "volume": "full"}),
        201,
    )
    .await;
    s.ok(
        "create-volume",
        json!({"pool": "p1", "name": "restored", "snapshot": "s1"}),
        201,
    )
    .await;
    // Size as a number of bytes; raw.
    s.ok(
        "create-volume",
        json!({"pool": "p1", "name": "rawvol", "size": 8 * MIB, "format": "raw"}),
        201,
    )
    .await;
    // Name taken: 409.
    let (st, e) = s
        .api(
            "create-volume",
            json!({"pool": "p1", "name": "rawvol", "size": 8 * MIB}),
        )
        .await;
    assert_eq!((st, kind(&e)), (409, "already_exists"), "{e}");

    // The linked volume names its template; the template cannot go.
    let d = s
        .ok(
            "describe-volume",
            json!({"pool": "p1", "name": "linked"}),
            200,
        )
        .await;
    assert_eq!(d["backing"][0]["name"], "base");
    let (st, e) = s
        .api("delete-template", json!({"pool": "p1", "name": "base"}))
        .await;
    assert_eq!((st, kind(&e)), (409, "has_dependents"), "{e}");

    // describe is the same object `vmvol volume describe --output json` prints.
    let lib = serde_json::to_value(s.vols.describe_volume("p1", "linked").unwrap()).unwrap();
    assert_eq!(d, lib);

    // Every filter.
    let all = s.ok("list-volumes", json!({"pool": "p1"}), 200).await;
    assert_eq!(
        names(&all),
        ["full", "golden", "linked", "rawvol", "restored"]
    );
    let raw = s
        .ok("list-volumes", json!({"pool": "p1", "format": "raw"}), 200)
        .await;
    assert_eq!(names(&raw), ["rawvol"]);
    let by_name = s.ok("list-volumes", json!({"name": "LINK"}), 200).await;
    assert_eq!(names(&by_name), ["linked"]);
    s.set_attached("p1", "rawvol", Some("vm-1")).await;
    let att = s
        .ok(
            "list-volumes",
            json!({"pool": "p1", "state": "attached"}),
            200,
        )
        .await;
    assert_eq!(names(&att), ["rawvol"]);
    let avail = s
        .ok("list-volumes", json!({"state": "available"}), 200)
        .await;
    assert_eq!(names(&avail), ["full", "golden", "linked", "restored"]);

    // Resize: grow ok ("+" grows by), shrink 400.
    let r = s
        .ok(
            "resize-volume",
            json!({"pool": "p1", "name": "linked", "size": "128M"}),
            200,
        )
        .await;
    assert_eq!(
        (r["old_size"].as_u64(), r["new_size"].as_u64()),
        (Some(64 * MIB), Some(128 * MIB))
    );
    let r = s
        .ok(
            "resize-volume",
            json!({"pool": "p1", "name": "linked", "size": "+64M"}),
            200,
        )
        .await;
    assert_eq!(r["new_size"], 192 * MIB);
    let (st, e) = s
        .api(
            "resize-volume",
            json!({"pool": "p1", "name": "linked", "size": "32M"}),
        )
        .await;
    assert_eq!((st, kind(&e)), (400, "invalid_argument"), "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("shrink"),
        "{e}"
    );

    // Clone to another pool.
    let c = s
        .ok(
            "clone-volume",
            json!({"pool": "p1", "name": "linked", "new_name": "copy", "to_pool": "p2"}),
            201,
        )
        .await;
    assert_eq!(c["pool"], "p2");
    let d = s
        .ok(
            "describe-volume",
            json!({"pool": "p2", "name": "copy"}),
            200,
        )
        .await;
    assert!(d["backing"].as_array().unwrap().is_empty(), "{d}");
    assert_eq!(d["capacity"], 192 * MIB);

    // Compress: qcow2 ok, raw refused.
    let r = s
        .ok(
            "compress-volume",
            json!({"pool": "p2", "name": "copy", "compress": true, "compression_type": "zlib"}),
            200,
        )
        .await;
    assert!(r["bytes_after"].as_u64().is_some(), "{r}");
    s.set_attached("p1", "rawvol", None).await;
    let (st, e) = s
        .api("compress-volume", json!({"pool": "p1", "name": "rawvol"}))
        .await;
    assert_eq!((st, kind(&e)), (409, "refused"), "{e}");

    // Delete: refused while attached, fine after detach.
    s.set_attached("p1", "rawvol", Some("vm-1")).await;
    let (st, e) = s
        .api("delete-volume", json!({"pool": "p1", "name": "rawvol"}))
        .await;
    assert_eq!((st, kind(&e)), (409, "in_use"), "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("vm-1"),
        "{e}"
    );
    s.set_attached("p1", "rawvol", None).await;
    s.ok(
        "delete-volume",
        json!({"pool": "p1", "name": "rawvol"}),
        200,
    )
    .await;
    let (st, e) = s
        .api("describe-volume", json!({"pool": "p1", "name": "rawvol"}))
        .await;
    assert_eq!((st, kind(&e)), (404, "not_found"), "{e}");

    // Pools: describe, deactivate refuses work, undefine of a non-empty pool is refused.
    let p = s.ok("describe-pool", json!({"name": "p2"}), 200).await;
    assert_eq!(p["volumes"], 1);
    s.ok("deactivate-pool", json!({"name": "p2"}), 200).await;
    let (st, e) = s
        .api(
            "create-volume",
            json!({"pool": "p2", "name": "x", "size": "8M"}),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    let (st, e) = s.api("undefine-pool", json!({"name": "p2"})).await;
    assert_eq!(st, 409, "{e}");
    let pools = s.ok("list-pools", json!({}), 200).await;
    assert_eq!(pools["pools"].as_array().unwrap().len(), 2);
    // Snapshots and templates listings.
    let l = s.ok("list-snapshots", json!({"pool": "p1"}), 200).await;
    assert_eq!(l["snapshots"][0]["record"]["name"], "s1");
    let l = s.ok("list-templates", json!({"pool": "p1"}), 200).await;
    assert_eq!(l["templates"][0]["record"]["name"], "base");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_with_one_line() {
    let s = Server::start().await;
    s.pool("p1").await;
    for body in [
        json!({"pool": "p1", "name": "../evil", "size": "8M"}),
        json!({"pool": "p1", "name": "/etc/passwd", "size": "8M"}),
        json!({"pool": "p1", "name": "a", "size": "8Q"}),
        json!({"pool": "p1", "name": "a", "size": 1000}),
        json!({"pool": "p1", "name": "a"}),
        json!({"pool": "p1", "name": "a", "size": "8M", "format": "vmdk"}),
        json!({"pool": "p1", "name": "a", "size": "8M", "template": "t", "snapshot": "s"}),
        json!({"pool": "p1", "name": "a", "size": "8M", "format": "qcow2", "prealloc": "full"}),
        json!({"pool": "p1"}),
        json!([1, 2]),
    ] {
        let (st, e) = s.api("create-volume", body.clone()).await;
        assert_eq!((st, kind(&e)), (400, "invalid_argument"), "{body}: {e}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(!m.is_empty() && !m.contains('\n'), "{m:?}");
    }
    // Not JSON at all.
    let (st, e) = s.call("POST", "/api/list-volumes", None).await;
    assert_eq!(st, 400, "{e}");
    // Unknown pool: 404, and the registry's directory is not named.
    let (st, e) = s.api("describe-pool", json!({"name": "nope"})).await;
    assert_eq!(st, 404, "{e}");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(!m.contains(s.root.to_str().unwrap()), "{m}");
    // Unknown endpoint and job.
    let (st, e) = s.call("GET", "/api/nothing", None).await;
    assert_eq!((st, kind(&e)), (404, "not_found"));
    let (st, _) = s.call("GET", "/api/jobs/123", None).await;
    assert_eq!(st, 404);
}
