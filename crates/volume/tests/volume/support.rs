//! Helpers: a registry with pools, external tools, loop mounts, and the
//! whole-pool consistency check every mutating test ends with.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use vmvol_pool::{AttachTarget, CapacityPolicy, EntryKind, Listed, PoolSpec, Registry, Wait};
use vmvol_volume::{
    Control, CreateVolume, Format, Found, LinkMode, Prealloc, VolumeRecord, VolumeSource, Volumes,
};

pub const MIB: u64 = 1 << 20;

/// A registry in a temp dir with active pools `default` and `other`.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub vols: Volumes,
}

impl Env {
    pub fn new() -> Env {
        Env::with_quota(1 << 30)
    }

    pub fn with_quota(bytes: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path().join("reg")).unwrap();
        for p in ["default", "other"] {
            let spec = PoolSpec {
                capacity: CapacityPolicy::Quota { bytes },
                ..PoolSpec::default()
            };
            reg.define(p, &spec).unwrap();
            reg.activate(p, Wait::Block).unwrap();
        }
        Env {
            vols: Volumes::new(reg),
            dir,
        }
    }

    /// A second, independent handle on the same registry (like another process).
    pub fn reopen(&self) -> Volumes {
        Volumes::new(Registry::open(self.dir.path().join("reg")).unwrap())
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("reg")
    }

    pub fn blank(&self, pool: &str, name: &str, size: u64, format: Format) -> Found<VolumeRecord> {
        self.vols
            .create_volume(
                pool,
                &CreateVolume {
                    name: name.into(),
                    size: Some(size),
                    source: VolumeSource::Blank {
                        format,
                        prealloc: Prealloc::Off,
                        ext4: false,
                    },
                },
                &Control::new(),
            )
            .unwrap()
    }

    pub fn linked_or_full(
        &self,
        pool: &str,
        name: &str,
        tpl: &str,
        mode: LinkMode,
    ) -> Found<VolumeRecord> {
        self.vols
            .create_volume(
                pool,
                &CreateVolume {
                    name: name.into(),
                    size: None,
                    source: VolumeSource::Template {
                        name: tpl.into(),
                        mode,
                    },
                },
                &Control::new(),
            )
            .unwrap()
    }

    /// The host file of a volume (tests may look; the library never joins paths).
    pub fn path(&self, pool: &str, name: &str) -> PathBuf {
        match self.vols.describe_volume(pool, name).unwrap().path {
            AttachTarget::File { path, .. } => path,
            other => panic!("no file: {other:?}"),
        }
    }

    /// Writes `data` at `off` into volume `name` through the pool.
    pub fn write(&self, pool: &str, name: &str, off: u64, data: &[u8]) {
        let d = self.vols.describe_volume(pool, name).unwrap();
        let p = self.vols.pool(pool).unwrap();
        let r = vmvol_pool::ImageRef::entry(
            EntryKind::Volume,
            &d.uuid,
            vmvol_pool::DATA_IMAGE,
            d.format,
        );
        let io = p.open_image(&r, true).unwrap();
        io.write_at(data, off).unwrap();
        io.flush().unwrap();
    }

    /// Reads `len` bytes at `off` of volume `name` through the pool.
    pub fn read(&self, pool: &str, name: &str, off: u64, len: usize) -> Vec<u8> {
        let d = self.vols.describe_volume(pool, name).unwrap();
        let p = self.vols.pool(pool).unwrap();
        let r = vmvol_pool::ImageRef::entry(
            EntryKind::Volume,
            &d.uuid,
            vmvol_pool::DATA_IMAGE,
            d.format,
        );
        let io = p.open_image(&r, false).unwrap();
        let mut b = vec![0u8; len];
        io.read_at(&mut b, off).unwrap();
        b
    }
}

pub fn tools_required() -> bool {
    std::env::var("VMVOL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Whether `tool` is on PATH; if not, skip (saying why) or panic under
/// `VMVOL_REQUIRE_TOOLS=1`.
pub fn require_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            !tools_required(),
            "VMVOL_REQUIRE_TOOLS=1 but {tool} is not on PATH"
        );
        eprintln!("SKIP: {tool} is not installed");
    }
    ok
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` clean (qcow2 only; raw passes).
pub fn qemu_check(path: &Path) {
    if path.extension().is_some_and(|e| e == "qcow2") && require_tool("qemu-img") {
        run("qemu-img", &["check", "-q", path.to_str().unwrap()]);
    }
}

/// `qemu-img compare` equal (formats probed from the file names).
pub fn qemu_compare(a: &Path, b: &Path) {
    if require_tool("qemu-img") {
        let fa = if a.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let fb = if b.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                fa,
                "-F",
                fb,
                a.to_str().unwrap(),
                b.to_str().unwrap(),
            ],
        );
    }
}

/// `qemu-img compare` reports a difference.
pub fn qemu_differ(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", a.to_str().unwrap(), b.to_str().unwrap()])
        .output()
        .unwrap();
    out.status.code() == Some(1)
}

/// A raw copy of any image (what e2fsck and mount read).
pub fn to_raw(img: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join(format!(
        "{}.raw-copy",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    raw
}

/// `e2fsck -fn` clean.
pub fn e2fsck_clean(raw: &Path) {
    if require_tool("e2fsck") {
        run("e2fsck", &["-fn", raw.to_str().unwrap()]);
    }
}

/// Whether we can loop-mount (root, loop-control, mount tools).
pub fn require_loop_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/loop-control").exists();
    if !ok {
        assert!(
            !tools_required(),
            "VMVOL_REQUIRE_TOOLS=1 but loop mounts are impossible (root + /dev/loop-control)"
        );
        eprintln!("SKIP: loop mounts need root and /dev/loop-control");
        return false;
    }
    require_tool("mount") && require_tool("umount")
}

/// A read-only loop mount, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Mount {
    pub fn new(raw: &Path) -> Mount {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "ext4",
                "-o",
                "loop,ro",
                raw.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        Mount { dir, _tmp: tmp }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// The whole-pool invariants: no damaged record, every entry has its data
/// image, every base link resolves, staging is empty, the figures equal a
/// fresh rescan, and (with `check`) every qcow2 passes `qemu-img check`.
pub fn assert_consistent(root: &Path, pool: &str, check: bool) {
    let reg = Registry::open(root).unwrap();
    let p = reg.open_pool(pool, Wait::Block).unwrap();
    let before = p.describe().unwrap();
    let after = p.refresh().unwrap();
    assert_eq!(
        (
            before.allocation,
            before.virtual_size,
            before.volumes,
            before.templates,
            before.snapshots
        ),
        (
            after.allocation,
            after.virtual_size,
            after.volumes,
            after.templates,
            after.snapshots
        ),
        "figures differ from a fresh rescan"
    );
    assert_eq!(after.damaged, 0, "damaged entries in {pool}");
    assert_eq!(after.reserved, 0, "reservations left in {pool}");
    let staging = p.location().join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging).unwrap().collect();
    assert!(left.is_empty(), "staging not clean: {left:?}");
    for kind in EntryKind::ALL {
        for l in p.list::<serde_json::Value>(kind, |_, _| true).unwrap() {
            let Listed::Ok(e) = l else {
                panic!("damaged {l:?}")
            };
            let mut names: Vec<_> = e.images.iter().map(|i| i.image.name.as_str()).collect();
            // A volume also holds one `ovl-*` image per attachment with an
            // overlay (instances' private writes), nothing else.
            let overlays = e.record.data["attachments"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|a| !a["overlay"].is_null()).count());
            let ovl = names.iter().filter(|n| n.starts_with("ovl-")).count();
            assert_eq!(
                ovl, overlays,
                "{kind} {} has {ovl} overlay images for {overlays} overlay attachments",
                e.id
            );
            names.retain(|n| !n.starts_with("ovl-"));
            assert_eq!(names, ["data"], "{kind} {} images", e.id);
            let base = &e.record.data["base"];
            if let Some(id) = base.get("id").and_then(|v| v.as_str()) {
                let bk = if base["kind"] == "template" {
                    EntryKind::Template
                } else {
                    EntryKind::Snapshot
                };
                assert!(
                    p.contains(bk, id).unwrap(),
                    "{kind} {} links to missing {id}",
                    e.id
                );
            }
            if check {
                for i in &e.images {
                    if let AttachTarget::File { path, .. } = p.attach_target(&i.image).unwrap() {
                        qemu_check(&path);
                    }
                }
            }
        }
    }
}
