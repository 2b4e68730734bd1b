//! Bad input: each refused with a specific error, nothing written, no panic.

use std::io::Write;
use std::path::Path;

use vmvol_pool::Wait;
use vmvol_volume::{
    AttachMode, Control, CreateVolume, ErrorKind, Format, LinkMode, NewSize, Prealloc, VolumeSource,
};

use crate::lifecycle::attach;
use crate::support::*;

fn blank() -> VolumeSource {
    VolumeSource::Blank {
        format: Format::Qcow2,
        prealloc: Prealloc::Off,
        ext4: false,
    }
}

/// Figures that must not move when a request is refused.
fn figures(env: &Env, pool: &str) -> (u64, u64, usize, usize, usize) {
    let d = env.vols.pool(pool).unwrap().describe().unwrap();
    (
        d.allocation,
        d.physical,
        d.volumes,
        d.templates,
        d.snapshots,
    )
}

#[test]
fn bad_names_are_refused() {
    let env = Env::new();
    let before = figures(&env, "default");
    let long = "a".repeat(64);
    for name in [
        "a/b",
        "..",
        ".",
        "a\0b",
        long.as_str(),
        "",
        ".hidden",
        "sp ace",
    ] {
        let e = env
            .vols
            .create_volume(
                "default",
                &CreateVolume {
                    name: name.into(),
                    size: Some(MIB),
                    source: blank(),
                },
                &Control::new(),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{name:?}: {e}");
        assert!(e.to_string().contains("invalid name"), "{e}");
        let e = env
            .vols
            .create_snapshot("default", name, "x", &Control::new())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = env
            .vols
            .import_template("default", name, Path::new("/nonexistent"), &Control::new())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    assert_eq!(figures(&env, "default"), before);
    assert_consistent(&env.root(), "default", false);
}

#[test]
fn missing_inactive_pool_and_foreign_template() {
    let env = Env::new();
    let req = CreateVolume {
        name: "v".into(),
        size: Some(MIB),
        source: blank(),
    };
    let e = env
        .vols
        .create_volume("nope", &req, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("pool nope"), "{e}");
    env.vols
        .registry()
        .deactivate("other", Wait::Block)
        .unwrap();
    let fresh = env.reopen();
    let e = fresh
        .create_volume("other", &req, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("inactive"), "{e}");
    env.vols.registry().activate("other", Wait::Block).unwrap();
    // A template of another pool is not found from this one.
    env.blank("other", "g", MIB, Format::Qcow2);
    env.vols
        .create_template_from_volume("other", "tpl", "g", &Control::new())
        .unwrap();
    let before = figures(&env, "default");
    let e = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "v".into(),
                size: None,
                source: VolumeSource::Template {
                    name: "tpl".into(),
                    mode: LinkMode::Linked,
                },
            },
            &Control::new(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("pool default template tpl"), "{e}");
    assert_eq!(figures(&env, "default"), before);
    // Duplicate name, bad size, no room.
    env.blank("default", "dup", MIB, Format::Qcow2);
    let e = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "dup".into(),
                size: Some(MIB),
                source: blank(),
            },
            &Control::new(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "odd".into(),
                size: Some(1000),
                source: blank(),
            },
            &Control::new(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "huge".into(),
                size: Some(4 << 30),
                source: blank(),
            },
            &Control::new(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InsufficientSpace, "{e}");
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn shrink_raw_compress_and_attached_refusals() {
    let env = Env::new();
    env.blank("default", "r", 2 * MIB, Format::Raw);
    env.blank("default", "q", 2 * MIB, Format::Qcow2);
    let before = figures(&env, "default");
    let e = env
        .vols
        .resize_volume("default", "q", NewSize::To(MIB))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string().contains("2097152") && e.to_string().contains("1048576"),
        "{e}"
    );
    let e = env
        .vols
        .compress_volume("default", "r", None, &Control::new())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused);
    // Two read-only holders (a read-write one would be exclusive).
    attach(&env, "default", "q", "web-1", AttachMode::Ro);
    attach(&env, "default", "q", "web-2", AttachMode::Ro);
    for e in [
        env.vols
            .compress_volume("default", "q", None, &Control::new())
            .unwrap_err(),
        env.vols.delete_volume("default", "q").unwrap_err(),
        env.vols
            .create_snapshot("default", "s", "q", &Control::new())
            .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::InUse, "{e}");
        assert!(e.to_string().contains("web-1, web-2"), "{e}");
    }
    let after = figures(&env, "default");
    assert_eq!((before.0, before.2), (after.0, after.2));
    assert_consistent(&env.root(), "default", true);
}

#[test]
fn hostile_archive_is_refused() {
    let env = Env::new();
    let before = figures(&env, "default");
    let tarball = env.dir.path().join("evil.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&tarball).unwrap());
        let mut h = tar::Header::new_gnu();
        // Written byte by byte: the tar crate itself refuses `..`.
        h.as_old_mut().name[..12].copy_from_slice(b"../../escape");
        h.set_size(4);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, &b"evil"[..]).unwrap();
        b.into_inner().unwrap().flush().unwrap();
    }
    let e = env
        .vols
        .create_volume(
            "default",
            &CreateVolume {
                name: "evil".into(),
                size: Some(32 * MIB),
                source: VolumeSource::Archive { path: tarball },
            },
            &Control::new(),
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("volume evil"), "{e}");
    assert_eq!(figures(&env, "default"), before);
    assert_consistent(&env.root(), "default", false);
}

#[test]
fn hostile_imported_images_are_refused() {
    if !require_tool("qemu-img") {
        return;
    }
    let env = Env::new();
    let before = figures(&env, "default");
    let d = env.dir.path();
    std::fs::create_dir_all(d.join("outside")).unwrap();
    std::fs::create_dir_all(d.join("img")).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            d.join("outside/base.raw").to_str().unwrap(),
            "1M",
        ],
    );
    let out = d.join("img/out.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../outside/base.raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
        ],
    );
    // A loop: a -> b -> a.
    let a = d.join("img/a.qcow2");
    let b = d.join("img/b.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
        ],
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            b.to_str().unwrap(),
        ],
    );
    // No backing format: blank out the backing-format header extension.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            d.join("img/base.raw").to_str().unwrap(),
            "1M",
        ],
    );
    let nofmt = d.join("img/nofmt.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            nofmt.to_str().unwrap(),
        ],
    );
    let mut bytes = std::fs::read(&nofmt).unwrap();
    let pos = bytes
        .windows(4)
        .position(|w| w == [0xE2, 0x79, 0x2A, 0xCA])
        .expect("backing format extension");
    bytes[pos..pos + 4].copy_from_slice(&[0x7f, 0x7f, 0x7f, 0x7f]);
    std::fs::write(&nofmt, bytes).unwrap();
    let garbage = d.join("img/garbage.qcow2");
    std::fs::write(&garbage, b"QFI\xfb not really").unwrap();
    for (f, what) in [
        (&out, "outside"),
        (&a, "loop"),
        (&nofmt, "no backing format"),
        (&garbage, "garbage"),
    ] {
        let e = env
            .vols
            .import_template("default", "t", f, &Control::new())
            .unwrap_err();
        assert!(
            matches!(
                e.kind(),
                ErrorKind::Refused | ErrorKind::Corrupt | ErrorKind::InvalidArgument
            ),
            "{what}: {e} ({:?})",
            e.kind()
        );
        assert!(e.to_string().contains("template t"), "{e}");
    }
    assert_eq!(figures(&env, "default"), before);
    assert_consistent(&env.root(), "default", false);
}
