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
    // Linked, not copied: the snapshot holds the old image (a clone of
    // the template), the volume a clone of the snapshot's.
    let snap_img = image_of(EntryKind::Snapshot, &s.id);
    let tpl_img = image_of(EntryKind::Template, &tpl.id);
    assert_eq!(parent_of(c, &spec, &snap_img).as_deref(), Some(&*tpl_img));
    let vol_img = image_of(EntryKind::Volume, &linked.id);
    assert_eq!(parent_of(c, &spec, &vol_img).as_deref(), Some(&*snap_img));
    assert_eq!(
        vols.describe_volume("ceph", "linked").unwrap().format,
        Format::Raw
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
    let restored_img = image_of(EntryKind::Volume, &restored.id);
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
