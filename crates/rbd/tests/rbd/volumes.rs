//! The volume layer on an RBD pool: create (blank ext4, linked and full from
//! a template, from a snapshot), snapshot, resize, delete refusals; content
//! checked through `rbd export` + `e2fsck -fn`, links through `rbd info`.

use std::sync::Arc;
use std::time::Instant;

use vmvol_format::{Control, Format, Prealloc};
use vmvol_pool::*;
use vmvol_rbd::{RbdBackend, RbdOptions, RbdProvider};
use vmvol_volume::{CreateVolume, LinkMode, NewSize, VolumeSource, Volumes};

use crate::cluster::{ceph, cluster, namespace, Cluster};
use crate::conformance::LEASE;

const MIB: u64 = 1 << 20;

pub fn image_of(kind: EntryKind, id: &str) -> String {
    RbdBackend::image_name(&ImageRef::entry(kind, id, DATA_IMAGE, Format::Raw))
}

pub fn e2fsck_clean(c: &Cluster, spec: &RbdSpec, image: &str) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("x.raw");
    crate::cluster::export(c, spec, image, &out);
    let r = std::process::Command::new("e2fsck")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("-fn")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "e2fsck -fn {image}: {}",
        String::from_utf8_lossy(&r.stdout)
    );
}

fn parent_of(c: &Cluster, spec: &RbdSpec, image: &str) -> Option<String> {
    let name = format!("{}/{}/{}", spec.pool, spec.namespace, image);
    let out = ceph(c, "rbd", &["info", "--format", "json", &name]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.get("parent")
        .and_then(|p| p.get("image"))
        .and_then(|i| i.as_str())
        .map(str::to_string)
}

/// `rbd info`'s parent of `image`: (image, snapshot).
pub fn parent_snap_of(c: &Cluster, spec: &RbdSpec, image: &str) -> Option<(String, String)> {
    let name = format!("{}/{}/{}", spec.pool, spec.namespace, image);
    let out = ceph(c, "rbd", &["info", "--format", "json", &name]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let p = v.get("parent")?;
    Some((
        p.get("image")?.as_str()?.to_string(),
        p.get("snapshot")?.as_str()?.to_string(),
    ))
}

/// The RBD snapshot behind snapshot entry `sid` (what the pool records).
pub fn native_snap(spec: &RbdSpec, sid: &str) -> String {
    let b = RbdBackend::open(spec, RbdOptions::default()).unwrap();
    let want = ImageRef::entry(EntryKind::Snapshot, sid, DATA_IMAGE, Format::Raw);
    let all = b.native_snapshots_of_pool().unwrap();
    let n = all.iter().find(|n| n.image == want);
    let n = n.unwrap_or_else(|| panic!("no native snapshot of {sid}: {all:?}"));
    assert!(n.rbd_snapshot.starts_with("vmvol-snap-"), "{n:?}");
    n.rbd_snapshot.clone()
}

/// `rbd snap ls`: (name, protected) of each snapshot of `image`.
pub fn snaps_of(c: &Cluster, spec: &RbdSpec, image: &str) -> Vec<(String, bool)> {
    let name = format!("{}/{}/{}", spec.pool, spec.namespace, image);
    let out = ceph(c, "rbd", &["snap", "ls", "--format", "json", &name]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["protected"].as_str() == Some("true"),
            )
        })
        .collect()
}

#[test]
fn volume_lifecycle_on_rbd() {
    let Some(c) = cluster() else { return };
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
        CapacityPolicy::Quota { bytes: 8 << 30 },
        4.0,
    )
    .unwrap();
    reg.activate("ceph", Wait::Block).unwrap();
    let vols = Volumes::new(reg);
    let ctl = Control::new();
    let blank_ext4 = VolumeSource::Blank {
        format: Format::Qcow2,
        prealloc: Prealloc::Off,
        ext4: true,
    };
    let web = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "web".into(),
                size: Some(128 * MIB),
                source: blank_ext4,
            },
            &ctl,
        )
        .unwrap();
    e2fsck_clean(c, &spec, &image_of(EntryKind::Volume, &web.id));
    // A template (frozen copy), then a linked volume: an RBD clone of it.
    let tpl = vols
        .create_template_from_volume("ceph", "tpl", "web", &ctl)
        .unwrap();
    let tpl_img = image_of(EntryKind::Template, &tpl.id);
    e2fsck_clean(c, &spec, &tpl_img);
    let t0 = Instant::now();
    let linked = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "linked".into(),
                size: None,
                source: VolumeSource::Template {
                    name: "tpl".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap();
    eprintln!("linked create from a 128 MiB template: {:?}", t0.elapsed());
    let linked_img = image_of(EntryKind::Volume, &linked.id);
    assert_eq!(parent_of(c, &spec, &linked_img).as_deref(), Some(&*tpl_img));
    e2fsck_clean(c, &spec, &linked_img);
    // Full: independent.
    let full = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "full".into(),
                size: None,
                source: VolumeSource::Template {
                    name: "tpl".into(),
                    mode: LinkMode::Full,
                },
            },
            &ctl,
        )
        .unwrap();
    let full_img = image_of(EntryKind::Volume, &full.id);
    assert_eq!(parent_of(c, &spec, &full_img), None);
    e2fsck_clean(c, &spec, &full_img);
    // The template cannot go while a volume is linked to it.
    assert!(vols.delete_template("ceph", "tpl").is_err());
    // Snapshot, restore from it, grow (shrink refused).
    vols.create_snapshot("ceph", "s1", "linked", &ctl).unwrap();
    let restored = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "restored".into(),
                size: None,
                source: VolumeSource::Snapshot {
                    name: "s1".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap();
    e2fsck_clean(c, &spec, &image_of(EntryKind::Volume, &restored.id));
    vols.resize_volume("ceph", "full", NewSize::To(256 * MIB))
        .unwrap();
    assert!(vols
        .resize_volume("ceph", "full", NewSize::To(64 * MIB))
        .is_err());
    let out = ceph(
        c,
        "rbd",
        &[
            "info",
            "--format",
            "json",
            &format!("{}/{}/{full_img}", spec.pool, spec.namespace),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["size"].as_u64(), Some(256 * MIB));
    // Delete everything; nothing of ours stays in the cluster.
    for v in ["restored", "full", "web"] {
        vols.delete_volume("ceph", v).unwrap();
    }
    vols.delete_volume("ceph", "linked").unwrap();
    vols.delete_snapshot("ceph", "s1", false).unwrap();
    vols.delete_template("ceph", "tpl").unwrap();
    let left = ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    );
    assert!(left.is_empty(), "{}", String::from_utf8_lossy(&left));
}

#[test]
fn rbd_volumes_are_recorded_raw() {
    // RBD stores every image raw: a volume asked for as qcow2, a linked
    // one, a snapshot, a restore and a block overlay are recorded,
    // described and attached as raw; the snapshot is still a link (an RBD
    // clone, no copy).
    let Some(c) = cluster() else { return };
    let (spec, _root, vols) = crate::compress::rbd_volumes(c, 8 << 30);
    let ctl = Control::new();
    let id = crate::compress::blank_ext4(&vols, "asked-qcow2", 64 * MIB);
    let d = vols.describe_volume("ceph", "asked-qcow2").unwrap();
    assert_eq!(d.format, Format::Raw);
    // What a VMM opens: the RBD image of the raw data image (through a
    // vhost-user-blk export).
    let AttachTarget::Rbd(t) = &d.path else {
        panic!("{:?}", d.path)
    };
    assert_eq!(
        (t.pool.as_str(), t.namespace.as_str(), t.snapshot.as_ref()),
        (spec.pool.as_str(), spec.namespace.as_str(), None)
    );
    assert_eq!(t.image, image_of(EntryKind::Volume, &id));
    let tpl = vols
        .create_template_from_volume("ceph", "tpl", "asked-qcow2", &ctl)
        .unwrap();
    assert_eq!(tpl.record.format, Format::Raw);
    let linked = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "linked".into(),
                size: None,
                source: VolumeSource::Template {
                    name: "tpl".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap();
    assert_eq!(linked.record.format, Format::Raw);
    let s = vols.create_snapshot("ceph", "s", "linked", &ctl).unwrap();
    assert_eq!(s.record.format, Format::Raw);
    // Native, not copied: an RBD snapshot of the volume's image (a clone
    // of the template), protected; the volume keeps its image and base.
    let tpl_img = image_of(EntryKind::Template, &tpl.id);
    let vol_img = image_of(EntryKind::Volume, &linked.id);
    assert_eq!(parent_of(c, &spec, &vol_img).as_deref(), Some(&*tpl_img));
    assert!(s.record.native, "{:?}", s.record);
    let snaps = snaps_of(c, &spec, &vol_img);
    let snap = native_snap(&spec, &s.id);
    assert!(
        snaps.iter().any(|(n, protected)| *n == snap && *protected),
        "{vol_img}: {snaps:?}"
    );
    let d = vols.describe_volume("ceph", "linked").unwrap();
    assert_eq!(d.format, Format::Raw);
    assert_eq!(
        d.backing.first().map(|b| b.name.as_str()),
        Some("tpl"),
        "the volume keeps its base"
    );
    e2fsck_clean(c, &spec, &vol_img);
    let restored = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "restored".into(),
                size: None,
                source: VolumeSource::Snapshot {
                    name: "s".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap();
    assert_eq!(restored.record.format, Format::Raw);
    // A link to the snapshot clones the volume's image at it.
    let restored_img = image_of(EntryKind::Volume, &restored.id);
    assert_eq!(
        parent_snap_of(c, &spec, &restored_img),
        Some((vol_img.clone(), snap.clone()))
    );
    // A block overlay: an RBD clone of the volume, attached as raw, gone
    // with the detach.
    let mut req = crate::compress::rw_request("vm1", "restored");
    req.volumes[0].overlay = true;
    req.volumes[0].readonly = true;
    req.volumes[0].overlay_size = Some(64 * MIB);
    req.volumes[0].overlay_kind = vmvol_volume::OverlayKind::Block;
    let att = vols.attach_instance(&req, &mut |_| Ok(())).unwrap();
    let disk = &att.disks[0];
    assert_eq!(disk.volume.format, Format::Raw);
    let AttachTarget::Rbd(t) = &disk.target else {
        panic!("{:?}", disk.target)
    };
    let ovl = t.image.clone();
    assert!(ovl.ends_with("+raw"), "raw overlay image: {ovl}");
    assert_ne!(
        ovl,
        image_of(EntryKind::Volume, &restored.id),
        "the overlay is what the guest gets"
    );
    assert_eq!(parent_of(c, &spec, &ovl).as_deref(), Some(&*restored_img));
    vols.detach_instance("vm1").unwrap();
    let ls = String::from_utf8(ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    ))
    .unwrap();
    assert!(!ls.contains(&ovl), "{ls}");
}

fn rbd_ls(c: &Cluster, spec: &RbdSpec) -> Vec<String> {
    String::from_utf8(ceph(
        c,
        "rbd",
        &["ls", "--pool", &spec.pool, "--namespace", &spec.namespace],
    ))
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

/// The last 4 KiB of a 64 MiB ext4 volume: a free block (e2fsck stays clean).
const MARK_AT: u64 = 64 * MIB - 4096;

fn write_block(b: &RbdBackend, image: &str, byte: u8) {
    use vmvol_format::BlockIo;
    let img = b.connection().open_image(image, true).unwrap();
    img.write_at(&[byte; 4096], MARK_AT).unwrap();
    img.flush().unwrap();
}

fn read_block(b: &RbdBackend, image: &str) -> u8 {
    use vmvol_format::BlockIo;
    let img = b.connection().open_image(image, false).unwrap();
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, MARK_AT).unwrap();
    buf[0]
}

#[test]
fn snapshots_are_rbd_snapshots_and_outlive_their_volume() {
    // A snapshot is an RBD snapshot of the volume's image: the volume keeps
    // writing its image, the snapshot (and a link to it) keeps the old
    // data; deleting the volume keeps its image (renamed h+<id>) for its
    // snapshots, deleting the last of them removes it; merges and the
    // refusals behave as on a local pool. `rbd` is the oracle.
    let Some(c) = cluster() else { return };
    let (spec, _root, vols) = crate::compress::rbd_volumes(c, 8 << 30);
    let ctl = Control::new();
    let vid = crate::compress::blank_ext4(&vols, "v", 64 * MIB);
    let vol_img = image_of(EntryKind::Volume, &vid);
    let b = RbdBackend::open(&spec, RbdOptions::default()).unwrap();
    write_block(&b, &vol_img, 1);
    let s1 = vols.create_snapshot("ceph", "s1", "v", &ctl).unwrap();
    write_block(&b, &vol_img, 2);
    let s2 = vols.create_snapshot("ceph", "s2", "v", &ctl).unwrap();
    write_block(&b, &vol_img, 3);
    let s2_snap = native_snap(&spec, &s2.id);
    let names: Vec<String> = snaps_of(c, &spec, &vol_img)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [native_snap(&spec, &s1.id), native_snap(&spec, &s2.id)]
    );
    // Nothing was copied or renamed: the pool holds one image.
    assert_eq!(rbd_ls(c, &spec), std::slice::from_ref(&vol_img));
    let native = b.native_snapshots_of_pool().unwrap();
    assert_eq!(native.len(), 2, "{native:?}");
    assert!(native
        .iter()
        .all(|n| n.rbd_image.as_deref() == Some(vol_img.as_str())));
    // Each reads as the volume did when it was taken (through our open,
    // and through `rbd export` of IMAGE@SNAP + e2fsck).
    let pool = vols.registry().open_pool("ceph", Wait::Block).unwrap();
    use vmvol_format::BlockIo;
    for (s, byte) in [(&s1, 1u8), (&s2, 2u8)] {
        let r = ImageRef::entry(EntryKind::Snapshot, &s.id, DATA_IMAGE, Format::Raw);
        let io = pool.open_image(&r, false).unwrap();
        let mut buf = [0u8; 4096];
        io.read_at(&mut buf, MARK_AT).unwrap();
        assert_eq!(buf[0], byte);
        assert!(
            pool.open_image(&r, true).is_err(),
            "a snapshot is read-only"
        );
        // Sizes and the pool's figures come from the records, no open.
        assert_eq!(pool.image_summary(&r).unwrap().virtual_size, Some(64 * MIB));
    }
    // A linked volume from s1 is a clone of the volume's image at s1.
    let lid = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "from-s1".into(),
                size: Some(128 * MIB),
                source: VolumeSource::Snapshot {
                    name: "s1".into(),
                    mode: LinkMode::Linked,
                },
            },
            &ctl,
        )
        .unwrap()
        .id;
    let limg = image_of(EntryKind::Volume, &lid);
    assert_eq!(
        parent_snap_of(c, &spec, &limg),
        Some((vol_img.clone(), native_snap(&spec, &s1.id)))
    );
    assert_eq!(read_block(&b, &limg), 1);
    // A full copy of s2 stands alone.
    let fid = vols
        .create_volume(
            "ceph",
            &CreateVolume {
                name: "full-s2".into(),
                size: None,
                source: VolumeSource::Snapshot {
                    name: "s2".into(),
                    mode: LinkMode::Full,
                },
            },
            &ctl,
        )
        .unwrap()
        .id;
    let fimg = image_of(EntryKind::Volume, &fid);
    assert_eq!(parent_snap_of(c, &spec, &fimg), None);
    assert_eq!(read_block(&b, &fimg), 2);
    e2fsck_clean(c, &spec, &fimg);
    // s1 has a dependent: its delete is refused, nothing removed.
    let err = vols.delete_snapshot("ceph", "s1", false).unwrap_err();
    assert!(err.to_string().contains("from-s1"), "{err}");
    assert_eq!(snaps_of(c, &spec, &vol_img).len(), 2);
    // The volume goes; its image stays for its snapshots, held.
    vols.delete_volume("ceph", "v").unwrap();
    let ls = rbd_ls(c, &spec);
    assert!(!ls.contains(&vol_img), "{ls:?}");
    let held: Vec<&String> = ls.iter().filter(|n| n.starts_with("h+")).collect();
    assert_eq!(held.len(), 1, "{ls:?}");
    let held = held[0].clone();
    assert_eq!(snaps_of(c, &spec, &held).len(), 2);
    assert_eq!(
        parent_snap_of(c, &spec, &limg).map(|p| p.0),
        Some(held.clone()),
        "the link follows the held image"
    );
    e2fsck_clean(c, &spec, &format!("{held}@{s2_snap}"));
    let pool = vols.registry().open_pool("ceph", Wait::Block).unwrap();
    assert!(pool.recovered().is_empty(), "{:?}", pool.recovered());
    // s2 goes: one snapshot left on the held image.
    vols.delete_snapshot("ceph", "s2", false).unwrap();
    assert_eq!(snaps_of(c, &spec, &held).len(), 1);
    // s1 with merge: its dependent becomes independent of it, then the
    // snapshot and the held image go.
    vols.delete_snapshot("ceph", "s1", true).unwrap();
    assert_eq!(read_block(&b, &limg), 1);
    e2fsck_clean(c, &spec, &limg);
    let mut ls = rbd_ls(c, &spec);
    ls.sort();
    let mut want = vec![limg.clone(), fimg.clone()];
    want.sort();
    assert_eq!(ls, want, "the held image went with its last snapshot");
    assert!(b.native_snapshots_of_pool().unwrap().is_empty());
    // The pool's figures equal a rescan.
    let before = vols
        .registry()
        .open_pool("ceph", Wait::Block)
        .unwrap()
        .describe()
        .unwrap();
    assert_eq!(before.damaged, 0);
}
