//! Compress of an ext4 volume on an RBD pool: the blocks of files written
//! then deleted (with `debugfs`, on an export written back through librbd)
//! go back to the cluster, the kept file and the filesystem stay intact
//! (`rbd export` + `e2fsck -fn` + `debugfs cat`), and an attached volume is
//! refused.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use vmvol_format::{BlockIo, Control, Format, Prealloc};
use vmvol_pool::*;
use vmvol_rbd::{Connection, RbdOptions, RbdProvider};
use vmvol_volume::{AttachRequest, AttachVolume, CreateVolume, ErrorKind, VolumeSource, Volumes};

use crate::cluster::{cluster, export, namespace, Cluster};
use crate::conformance::LEASE;
use crate::volumes::{e2fsck_clean, image_of};

const MIB: u64 = 1 << 20;

/// A registry (rooted in the returned directory) holding one active RBD
/// pool "ceph" on a fresh namespace, wrapped in the volume layer.
pub fn rbd_volumes(c: &Cluster, quota: u64) -> (RbdSpec, tempfile::TempDir, Volumes) {
    register_backend(Arc::new(RbdProvider {
        options: RbdOptions {
            lease: LEASE,
            ..RbdOptions::default()
        },
    }));
    let spec = namespace(c);
    let root = tempfile::tempdir().unwrap();
    let reg = Registry::open(root.path()).unwrap();
    reg.define_on(
        "ceph",
        &BackendSpec::Rbd(spec.clone()),
        CapacityPolicy::Quota { bytes: quota },
        1000.0,
    )
    .unwrap();
    reg.activate("ceph", Wait::Block).unwrap();
    (spec, root, Volumes::new(reg))
}

/// A blank ext4 volume (qcow2 in the record; the RBD image is raw).
pub fn blank_ext4(vols: &Volumes, name: &str, size: u64) -> String {
    vols.create_volume(
        "ceph",
        &CreateVolume {
            name: name.into(),
            size: Some(size),
            source: VolumeSource::Blank {
                format: Format::Qcow2,
                prealloc: Prealloc::Off,
                ext4: true,
            },
        },
        &Control::new(),
    )
    .unwrap()
    .id
}

/// A read-write request for one volume of pool "ceph".
pub fn rw_request(instance: &str, volume: &str) -> AttachRequest {
    AttachRequest {
        instance: instance.into(),
        volumes: vec![AttachVolume {
            pool: Some("ceph".into()),
            volume_id: volume.into(),
            mount_path: "/data".into(),
            readonly: false,
            overlay: false,
            overlay_size: None,
            overlay_kind: Default::default(),
        }],
        vmm: serde_json::json!({}),
    }
}

fn debugfs(img: &Path, write: bool, cmds: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cmds");
    std::fs::write(&f, cmds).unwrap();
    let mut c = Command::new("debugfs");
    c.env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin");
    if write {
        c.arg("-w");
    }
    let out = c.arg("-f").arg(&f).arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "debugfs {cmds}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn compress_returns_deleted_files_space_to_the_cluster() {
    let Some(c) = cluster() else { return };
    let (spec, _root, vols) = rbd_volumes(c, 4 << 30);
    let id = blank_ext4(&vols, "data", 256 * MIB);
    let img_name = image_of(EntryKind::Volume, &id);
    let conn = Connection::connect(&spec).unwrap();
    let allocated = || {
        conn.open_image(&img_name, false)
            .unwrap()
            .allocated()
            .unwrap()
    };
    let fresh = allocated();
    // Files written, one deleted: on an export with debugfs, then the
    // changed 64 KiB chunks written back into the RBD image.
    let t = tempfile::tempdir().unwrap();
    let (raw, keep, big) = (
        t.path().join("x.raw"),
        t.path().join("keep"),
        t.path().join("big"),
    );
    let before = export(c, &spec, &img_name, &raw);
    let keep_data = noise(3 * MIB as usize + 123, 1);
    std::fs::write(&keep, &keep_data).unwrap();
    std::fs::write(&big, noise(48 * MIB as usize, 2)).unwrap();
    debugfs(
        &raw,
        true,
        &format!(
            "write {} keep\nwrite {} big\nrm big\n",
            keep.display(),
            big.display()
        ),
    );
    let after = std::fs::read(&raw).unwrap();
    assert_eq!(before.len(), after.len());
    {
        let io = conn.open_image(&img_name, true).unwrap();
        for (i, (a, b)) in before
            .chunks(64 << 10)
            .zip(after.chunks(64 << 10))
            .enumerate()
        {
            if a != b {
                io.write_at(b, (i as u64) * (64 << 10)).unwrap();
            }
        }
        io.flush().unwrap();
    }
    let used = allocated();
    assert!(
        used >= fresh + 40 * MIB,
        "the deleted file's data is not in the image: {fresh} -> {used} bytes"
    );
    // Attached read-write: refused, nothing changes.
    vols.attach_instance(&rw_request("vm1", "data"), &mut |_| Ok(()))
        .unwrap();
    let e = vols
        .compress_volume("ceph", "data", None, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
    assert!(e.to_string().contains("vm1"), "{e}");
    assert_eq!(allocated(), used);
    vols.detach_instance("vm1").unwrap();
    // Detached: the deleted file's objects go back to the cluster.
    let r = vols
        .compress_volume("ceph", "data", None, &Control::new())
        .unwrap();
    let compact = allocated();
    eprintln!("compress on RBD: {used} -> {compact} bytes allocated (report {r:?}, fresh {fresh})");
    assert!(
        compact + 40 * MIB <= used,
        "compress freed too little: {used} -> {compact} bytes"
    );
    assert_eq!(r.bytes_after, compact);
    e2fsck_clean(c, &spec, &img_name);
    let out = t.path().join("y.raw");
    export(c, &spec, &img_name, &out);
    let dump = t.path().join("keep.out");
    debugfs(&out, false, &format!("dump keep {}\n", dump.display()));
    assert!(
        std::fs::read(&dump).unwrap() == keep_data,
        "kept file changed"
    );
    let ls = String::from_utf8_lossy(&debugfs(&out, false, "ls -l /\n")).into_owned();
    assert!(ls.contains("keep") && !ls.contains("big"), "{ls}");
}
