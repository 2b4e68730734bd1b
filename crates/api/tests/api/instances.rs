//! Instances over HTTP: attach (all or nothing, rules, overlays), the
//! DiskConfig array, list, describe, detach.

use serde_json::json;

use crate::{kind, Server};

fn attach_body(id: &str, volumes: serde_json::Value) -> serde_json::Value {
    json!({
        "instance": id,
        "rootfs": "/images/rootfs.qcow2", "rootfs_image_type": "qcow2",
        "instance_overlay": format!("/guests/{id}/overlay.raw"),
        "instance_overlay_image_type": "raw",
        "volumes": volumes,
        "config_extra": {"entrypoint": ["/bin/app"]},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_attach_describe_detach() {
    let s = Server::start().await;
    s.pool("p1").await;
    s.pool("p2").await;
    for (pool, name) in [("p1", "db"), ("p2", "base")] {
        s.ok(
            "create-volume",
            json!({"pool": pool, "name": name, "size": "32M", "ext4": true}),
            201,
        )
        .await;
    }
    let vols = json!([
        {"pool": "p1", "volume_id": "db", "mount_path": "/data"},
        {"pool": "p2", "volume_id": "base", "mount_path": "/srv", "readonly": true,
         "overlay": true, "overlay_size": "16M"},
    ]);
    let v = s
        .ok("attach-instance", attach_body("vm-1", vols), 201)
        .await;
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 6, "{v}");
    // Cloud Hypervisor's field names and explicit image types.
    assert_eq!(disks[0]["image_type"], "Qcow2");
    assert_eq!(disks[0]["readonly"], true);
    assert_eq!(disks[3]["id"], "vdd");
    assert_eq!(v["volume_mounts"][1]["mode"], "overlay");
    assert_eq!(v["volume_mounts"][1]["overlay_device"], "/dev/vdf");
    assert!(std::path::Path::new(v["config_disk"].as_str().unwrap()).exists());
    assert_eq!(v["instance"]["state"], "attached");

    // Refusals: rule (409 naming the holder), existing instance (409),
    // mount path (400), unknown volume (404); nothing attached by them.
    let (st, e) = s
        .api(
            "attach-instance",
            attach_body(
                "vm-2",
                json!([{"pool": "p1", "volume_id": "db", "mount_path": "/d", "readonly": true}]),
            ),
        )
        .await;
    assert_eq!((st, kind(&e)), (409, "in_use"), "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vm-1 (rw)"),
        "{e}"
    );
    let (st, e) = s
        .api("attach-instance", attach_body("vm-1", json!([])))
        .await;
    assert_eq!((st, kind(&e)), (409, "already_exists"), "{e}");
    let (st, e) = s
        .api(
            "attach-instance",
            attach_body("vm-3", json!([{"pool": "p2", "volume_id": "base", "mount_path": "/usr/x", "readonly": true}])),
        )
        .await;
    assert_eq!((st, kind(&e)), (400, "invalid_argument"), "{e}");
    let (st, e) = s
        .api(
            "attach-instance",
            attach_body(
                "vm-3",
                json!([{"pool": "p2", "volume_id": "nope", "mount_path": "/x"}]),
            ),
        )
        .await;
    assert_eq!((st, kind(&e)), (404, "not_found"), "{e}");
    let (st, e) = s
        .api("delete-volume", json!({"pool": "p1", "name": "db"}))
        .await;
    assert_eq!((st, kind(&e)), (409, "in_use"), "{e}");

    let list = s.ok("list-instances", json!({}), 200).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 1, "{list}");
    let d = s
        .ok("describe-instance", json!({"instance": "vm-1"}), 200)
        .await;
    assert_eq!(d["disks"], v["disks"]);

    let r = s
        .ok("detach-instance", json!({"instance": "vm-1"}), 200)
        .await;
    assert_eq!(r["volumes"].as_array().unwrap().len(), 2);
    assert!(!std::path::Path::new(v["config_disk"].as_str().unwrap()).exists());
    let r = s
        .ok("detach-instance", json!({"instance": "vm-1"}), 200)
        .await;
    assert_eq!(r["volumes"], json!([]));
    let (st, _) = s
        .api("describe-instance", json!({"instance": "vm-1"}))
        .await;
    assert_eq!(st, 404);
    s.ok("delete-volume", json!({"pool": "p1", "name": "db"}), 200)
        .await;
}
