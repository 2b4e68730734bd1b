//! DiskConfig JSON and `--disk` goldens, serde behaviour, validation.

use std::path::Path;

use vmvol_chv::{
    cli_quote, plan, DiskConfig, DiskTransport, ImageType, MountMode, OverlayKind, ResizeDisk,
    VolumeDisk, MAX_VOLUME_DEVICES,
};

use crate::common::sample_spec;

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("VMVOL_UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, actual).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (VMVOL_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(actual, want, "golden {name} differs");
}

#[test]
fn disk_configs_json_golden() {
    let p = plan(&sample_spec()).unwrap();
    golden("disks.json", &(p.disks_json().unwrap() + "\n"));
}

#[test]
fn disk_args_golden() {
    let p = plan(&sample_spec()).unwrap();
    golden("disk-args.txt", &(p.disk_args().unwrap().join("\n") + "\n"));
}

#[test]
fn mount_plan_golden() {
    let p = plan(&sample_spec()).unwrap();
    golden(
        "volume-mounts.json",
        &(serde_json::to_string_pretty(&p.volume_mounts).unwrap() + "\n"),
    );
    golden("config.sh", &vmvol_chv::config_sh(&p).unwrap());
}

#[test]
fn disk_order_modes_and_flags() {
    let p = plan(&sample_spec()).unwrap();
    let devs: Vec<&str> = p.disks.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(
        devs,
        [
            "/dev/vda", "/dev/vdb", "/dev/vdc", "/dev/vdd", "/dev/vde", "/dev/vdf", "/dev/vdg",
            "/dev/vdh"
        ]
    );
    let ro: Vec<bool> = p.disks.iter().map(|d| d.config.readonly).collect();
    assert_eq!(ro, [true, false, true, false, true, true, false, false]);
    let backing: Vec<bool> = p.disks.iter().map(|d| d.config.backing_files).collect();
    assert_eq!(
        backing,
        [false, false, false, false, false, false, false, true]
    );
    for d in &p.disks {
        let c = &d.config;
        assert_ne!(c.image_type, ImageType::Unknown);
        let id = c.id.as_deref().unwrap();
        assert!(!id.starts_with("__"));
        assert!(c.serial.as_deref().unwrap().len() <= 20);
    }
    let ids: std::collections::HashSet<_> = p.disks.iter().map(|d| d.config.id.clone()).collect();
    assert_eq!(ids.len(), p.disks.len());
    assert_eq!(p.disk_id("cache"), Some("vdh"));
    assert_eq!(p.disk_id("dataset-2026-with-a-long-name"), Some("vdf"));
    let modes: Vec<(&str, &str, Option<&str>)> = p
        .volume_mounts
        .iter()
        .map(|m| {
            (
                m.device.as_str(),
                m.mode.as_str(),
                m.overlay_device.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("/dev/vdd", "rw", None),
            ("/dev/vde", "ro", None),
            ("/dev/vdf", "overlay", Some("/dev/vdg")),
            ("/dev/vdh", "rw", None)
        ]
    );
}

#[test]
fn serde_round_trip_defaults_and_unknown_fields() {
    let p = plan(&sample_spec()).unwrap();
    let json = p.disks_json().unwrap();
    let back: Vec<DiskConfig> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p.disk_configs());
    // None fields are left out; iommu=false is left out as Cloud Hypervisor does.
    assert!(!json.contains("null"));
    assert!(!json.contains("vhost_socket") && !json.contains("iommu"));
    // Cloud Hypervisor's defaults for missing fields; its test-only fields ignored.
    let d: DiskConfig = serde_json::from_str(
        r#"{"path":"/x","disable_io_uring":true,"some_future_field":{"a":1}}"#,
    )
    .unwrap();
    assert_eq!(
        d,
        DiskConfig {
            image_type: ImageType::Unknown,
            ..DiskConfig::new("/x", ImageType::Unknown)
        }
    );
    assert_eq!(
        (d.num_queues, d.queue_size, d.sparse, d.backing_files),
        (1, 128, true, false)
    );
    // Unknown image types are refused, not guessed.
    assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/x","image_type":"Qed"}"#).is_err());
}

/// Cloud Hypervisor's option splitting as its documentation states it:
/// commas split outside quotes and brackets, values are trimmed, and a
/// quoted value reads `""` as `"`. Written from the behaviour, for the test.
fn chv_split(s: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let (mut cur, mut q, mut br) = (String::new(), false, 0);
    for c in s.chars() {
        match c {
            '"' => q = !q,
            _ if q => {}
            '[' => br += 1,
            ']' => br -= 1,
            ',' if br == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    assert!(!q && br == 0, "unbalanced: {s}");
    items.push(cur);
    items
        .into_iter()
        .map(|it| {
            let (k, v) = it.split_once('=').unwrap();
            let v = v.trim();
            let mut out = String::new();
            let (mut inq, mut prev) = (false, '\0');
            for c in v.chars() {
                if c == '"' {
                    if prev == '"' && !inq {
                        out.push('"');
                    }
                    inq = !inq;
                } else {
                    out.push(c);
                }
                prev = c;
            }
            (k.to_string(), out)
        })
        .collect()
}

#[test]
fn disk_args_survive_chv_option_parsing() {
    for path in [
        "/plain/path.raw",
        "/a,b/c.raw",
        "/q\"uote/x.raw",
        "/\"\"/x,y=z[1]/ end ",
        " /lead",
        "/br[ack]ets,\"",
    ] {
        let mut d = DiskConfig::new(path, ImageType::Raw);
        d.id = Some("vdd".into());
        d.serial = Some("a,b\"c".into());
        let s = d.to_cli().unwrap();
        let kv = chv_split(&s);
        let get = |k: &str| kv.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
        assert_eq!(get("path").as_deref(), Some(path), "{s}");
        assert_eq!(get("serial").as_deref(), Some("a,b\"c"), "{s}");
        assert_eq!(get("image_type").as_deref(), Some("raw"));
    }
    assert_eq!(cli_quote("plain"), "plain");
    assert_eq!(cli_quote("a,b"), "\"a,b\"");
}

#[test]
fn validation_refusals() {
    let mut d = DiskConfig::new("/x", ImageType::Raw);
    d.id = Some("__reserved".into());
    assert!(d.validate().unwrap_err().to_string().contains("__"));
    let mut d = DiskConfig::new("/x", ImageType::Raw);
    d.serial = Some("x".repeat(21));
    assert!(d.validate().unwrap_err().to_string().contains("serial"));
    assert!(DiskConfig::new("/x", ImageType::Unknown)
        .validate()
        .is_err());
    let mut d = DiskConfig::new("/x", ImageType::Raw);
    d.backing_files = true;
    assert!(d.validate().is_err());

    // 23 volume devices fit; 24 do not (a guest-overlayfs overlay counts 2).
    let vol = |i: usize, mode: MountMode| VolumeDisk {
        volume: format!("v{i}"),
        path: format!("/v/{i}.raw").into(),
        image_type: ImageType::Raw,
        transport: Default::default(),
        mount_path: format!("/m{i}"),
        mode,
    };
    let ovl = |i: usize| {
        MountMode::Overlay(OverlayKind::GuestOverlayfs {
            overlay_path: format!("/o/{i}.raw").into(),
        })
    };
    let mut spec = sample_spec();
    spec.volumes = (0..MAX_VOLUME_DEVICES)
        .map(|i| vol(i, MountMode::Ro))
        .collect();
    let p = plan(&spec).unwrap();
    assert_eq!(p.disks.last().unwrap().device, "/dev/vdz");
    spec.volumes = (0..11)
        .map(|i| vol(i, ovl(i)))
        .chain([vol(11, MountMode::Rw)])
        .collect();
    assert!(plan(&spec).is_ok());
    spec.volumes = (0..12).map(|i| vol(i, ovl(i))).collect();
    let e = plan(&spec).unwrap_err().to_string();
    assert!(e.contains("24 volume devices"), "{e}");
    // A block overlay must be qcow2; a relative mount path is refused.
    spec.volumes = vec![vol(0, MountMode::Overlay(OverlayKind::Block))];
    assert!(plan(&spec).unwrap_err().to_string().contains("qcow2"));
    let mut v = vol(0, MountMode::Rw);
    v.mount_path = "data".into();
    spec.volumes = vec![v];
    assert!(plan(&spec).is_err());
}

#[test]
fn resize_disk_body() {
    let r = ResizeDisk::new("vdd", 2 << 30).unwrap();
    assert_eq!(
        r.to_json().unwrap(),
        r#"{"id":"vdd","desired_size":2147483648}"#
    );
    assert!(ResizeDisk::new("vdd", 1000).is_err());
    assert!(ResizeDisk::new("vdd", 0).is_err());
    assert!(ResizeDisk::new("__x", 512).is_err());
    assert!(ResizeDisk::new("vdd", u64::MAX - 511).is_err());
    let back: ResizeDisk = serde_json::from_str(r#"{"id":"a","desired_size":512}"#).unwrap();
    assert_eq!(back.desired_size, 512);
}

/// Volumes reached over vhost-user (RBD): no path, the socket, no serial,
/// read-only per mode, a block overlay raw without backing files, and the
/// plan says shared memory is needed.
#[test]
fn vhost_user_volumes() {
    let mut spec = sample_spec();
    assert!(!plan(&spec).unwrap().requires_shared_memory);
    for v in &mut spec.volumes {
        v.transport = DiskTransport::VhostUser;
        v.image_type = ImageType::Raw;
        v.path = format!(
            "/run/i-1/vhost-{}.sock",
            v.mount_path.trim_start_matches('/')
        )
        .into();
        if let MountMode::Overlay(OverlayKind::GuestOverlayfs { overlay_path }) = &mut v.mode {
            *overlay_path = "/run/i-1/vhost-ovl.sock".into();
        }
    }
    let p = plan(&spec).unwrap();
    assert!(p.requires_shared_memory);
    // vda..vdc stay files.
    for d in &p.disks[..3] {
        assert!(!d.config.vhost_user && d.config.path.is_some());
    }
    let vols: Vec<_> = p.disks[3..].iter().map(|d| &d.config).collect();
    assert_eq!(vols.len(), 5);
    for c in &vols {
        assert!(
            c.vhost_user && c.path.is_none() && c.serial.is_none(),
            "{c:?}"
        );
        assert!(!c.backing_files);
        c.validate().unwrap();
    }
    let sockets: Vec<_> = vols
        .iter()
        .map(|c| c.vhost_socket.clone().unwrap())
        .collect();
    assert_eq!(
        sockets,
        [
            "/run/i-1/vhost-data.sock",
            "/run/i-1/vhost-models.sock",
            "/run/i-1/vhost-srv/dataset.sock",
            "/run/i-1/vhost-ovl.sock",
            "/run/i-1/vhost-var-cache.sock",
        ]
    );
    // rw, ro, overlay base ro + overlay disk rw, block overlay rw.
    let ro: Vec<bool> = vols.iter().map(|c| c.readonly).collect();
    assert_eq!(ro, [false, true, true, false, false]);
    let json = serde_json::to_value(vols[0]).unwrap();
    assert_eq!(json["vhost_user"], true);
    assert!(
        json.get("path").is_none() && json.get("serial").is_none(),
        "{json}"
    );
    let args = p.disk_args().unwrap();
    assert_eq!(
        args[4],
        "vhost_user=on,socket=/run/i-1/vhost-data.sock,id=vdd,image_type=raw"
    );
    // The mount plan is the same as for files.
    assert_eq!(p.volume_mounts, plan(&sample_spec()).unwrap().volume_mounts);
}
