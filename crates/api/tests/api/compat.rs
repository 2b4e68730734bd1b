//! The `/volumes` API of seed 000's system: JSON and multipart tar.gz.

use std::io::Write;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use serde_json::json;
use vmvol_format::{BlockIo, Format};
use vmvol_pool::{EntryKind, ImageRef, DATA_IMAGE};

use crate::{kind, parse, send_unix, Server};

/// A tar.gz holding `hello.txt` and `dir/blob.bin`.
fn archive(blob: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut t = tar::Builder::new(gz);
    for (path, data) in [("hello.txt", &b"hello world\n"[..]), ("dir/blob.bin", blob)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        t.append_data(&mut h, path, data).unwrap();
    }
    t.into_inner().unwrap().finish().unwrap()
}

fn multipart(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let b = "vmvol-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, data) in fields {
        write!(
            body,
            "--{b}\r\nContent-Disposition: form-data; name=\"{name}\""
        )
        .unwrap();
        if *name == "content" {
            write!(
                body,
                "; filename=\"content.tar.gz\"\r\nContent-Type: application/gzip"
            )
            .unwrap();
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{b}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={b}"), body)
}

async fn post_multipart(s: &Server, fields: &[(&str, &[u8])]) -> (u16, serde_json::Value) {
    let (ct, body) = multipart(fields);
    let req = Request::post("/volumes")
        .header("host", "vmvol")
        .header("content-type", ct)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (st, b) = send_unix(&s.sock, req).await;
    (st, parse(&b))
}

/// Our ext4 reader's oracle: ext4-view over the volume's image (qcow2 too).
struct Dev(Box<dyn BlockIo>);

impl ext4_view::Ext4Read for Dev {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.read_at(dst, start).map_err(|e| e.into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_api_json_and_multipart() {
    let s = Server::start().await;
    s.pool("default").await;

    // JSON: an ext4-formatted sparse raw volume.
    let (st, v) = s
        .call(
            "POST",
            "/volumes",
            Some(json!({"name": "data", "size_gb": 1})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["name"], "data");
    assert_eq!(v["size_gb"], 1);
    assert_eq!(v["attachments"], json!([]));
    let created = v["created_at"].as_str().unwrap();
    assert!(
        created.len() >= 20 && created.as_bytes()[10] == b'T',
        "{created}"
    );
    let id = v["id"].as_str().unwrap().to_string();
    let d = s.vols.describe_volume("default", "data").unwrap();
    assert_eq!(d.uuid, id);
    assert_eq!(d.format, Format::Raw);
    assert!(d.filesystem.is_some(), "born ext4");
    assert!(d.allocation < 64 << 20, "sparse: {}", d.allocation);

    // By id and by name; the listing.
    let (st, by_id) = s.call("GET", &format!("/volumes/{id}"), None).await;
    assert_eq!(st, 200);
    let (_, by_name) = s.call("GET", "/volumes/data", None).await;
    assert_eq!(by_id, by_name);
    assert_eq!(by_id, v);

    // Multipart: the archive's files end up in the volume.
    // 3 MiB that gzip cannot shrink: the upload is past the 1 MiB JSON limit.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blob: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let tgz = archive(&blob);
    assert!(tgz.len() > 3 << 20);
    let (st, w) = post_multipart(
        &s,
        &[("name", b"web"), ("size_gb", b"1"), ("content", &tgz)],
    )
    .await;
    assert_eq!(st, 201, "{w}");
    let wid = w["id"].as_str().unwrap().to_string();
    let d = s.vols.describe_volume("default", "web").unwrap();
    let img = s
        .vols
        .pool("default")
        .unwrap()
        .open_image(
            &ImageRef::entry(EntryKind::Volume, &wid, DATA_IMAGE, d.format),
            false,
        )
        .unwrap();
    let fs = ext4_view::Ext4::load(Box::new(Dev(img))).unwrap();
    assert_eq!(fs.read("/hello.txt").unwrap(), b"hello world\n");
    assert_eq!(fs.read("/dir/blob.bin").unwrap(), blob);
    // Nothing of the upload is left in the upload directory.
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );

    let (_, all) = s.call("GET", "/volumes", None).await;
    let mut names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    // Oldest first; creates within one second are in id order.
    names.sort();
    assert_eq!(names, ["data", "web"]);

    // Attached: shown, and delete is 409; detached: 204, then 404.
    s.set_attached("default", "web", Some("inst-1")).await;
    let (_, w) = s.call("GET", "/volumes/web", None).await;
    assert_eq!(
        w["attachments"],
        json!([{"instance_id": "inst-1", "mount_path": "/data", "readonly": false}])
    );
    let (st, e) = s.call("DELETE", &format!("/volumes/{wid}"), None).await;
    assert_eq!((st, kind(&e)), (409, "in_use"), "{e}");
    s.set_attached("default", "web", None).await;
    let (st, body) = s.call("DELETE", &format!("/volumes/{wid}"), None).await;
    assert_eq!((st, body), (204, serde_json::Value::Null));
    let (st, _) = s.call("GET", &format!("/volumes/{wid}"), None).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_api_bad_input() {
    let s = Server::start().await;
    s.pool("default").await;
    for body in [
        json!({"name": "../x", "size_gb": 1}),
        json!({"name": "/abs", "size_gb": 1}),
        json!({"name": "ok", "size_gb": 0}),
        json!({"name": "ok", "size_gb": u64::MAX}),
        json!({"name": "ok", "size_gb": -1}),
        json!({"name": "ok"}),
        json!({"name": "ok", "size_gb": 1, "id": "../up"}),
        json!({"name": "ok", "size_gb": 1, "id": "Upper"}),
    ] {
        let (st, e) = s.call("POST", "/volumes", Some(body.clone())).await;
        assert_eq!((st, kind(&e)), (400, "invalid_argument"), "{body}: {e}");
    }
    // A client-chosen id becomes the volume's id; taken again: 409.
    let (st, v) = s
        .call(
            "POST",
            "/volumes",
            Some(json!({"name": "mine", "size_gb": 1, "id": "vol-abc123"})),
        )
        .await;
    assert_eq!((st, v["id"].as_str()), (201, Some("vol-abc123")), "{v}");
    let (st, g) = s.call("GET", "/volumes/vol-abc123", None).await;
    assert_eq!((st, g["name"].as_str()), (200, Some("mine")), "{g}");
    let (st, e) = s
        .call(
            "POST",
            "/volumes",
            Some(json!({"name": "other", "size_gb": 1, "id": "vol-abc123"})),
        )
        .await;
    assert_eq!((st, kind(&e)), (409, "already_exists"), "{e}");
    let (st, _) = s.call("GET", "/volumes/..", None).await;
    assert!(st == 400 || st == 404, "{st}");
    // Content larger than the volume: 413, and no upload left behind.
    let tgz = archive(&[1u8; 4096]);
    let (st, e) = post_multipart(
        &s,
        &[("name", b"big"), ("size_gb", b"0"), ("content", &tgz)],
    )
    .await;
    assert_eq!((st, kind(&e)), (413, "payload_too_large"), "{e}");
    // Missing content, bad size, unknown field.
    let (st, _) = post_multipart(&s, &[("name", b"a"), ("size_gb", b"1")]).await;
    assert_eq!(st, 400);
    let (st, _) = post_multipart(&s, &[("name", b"a"), ("size_gb", b"x"), ("content", &tgz)]).await;
    assert_eq!(st, 400);
    let (st, _) = post_multipart(&s, &[("name", b"a"), ("size_gb", b"1"), ("evil", b"1")]).await;
    assert_eq!(st, 400);
    // Not an archive: refused, nothing left.
    let (st, e) = post_multipart(
        &s,
        &[
            ("name", b"junk"),
            ("size_gb", b"1"),
            ("content", b"not a tar.gz"),
        ],
    )
    .await;
    assert!((400..500).contains(&st), "{st} {e}");
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(s.staged("default"), 0);
    // Only the volume made under a chosen id exists.
    let (_, all) = s.call("GET", "/volumes", None).await;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    assert_eq!(all[0]["id"], "vol-abc123");
}
