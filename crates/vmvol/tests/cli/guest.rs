//! A real Linux guest under QEMU (TCG) mounts the volumes an instance got
//! from `vmvol instance attach`, with `guest/vmvol-mount.sh`; the disks are
//! attached as virtio-blk in exactly the order, modes and serials of
//! `vmvol instance disks --output json` (Cloud Hypervisor's DiskConfigs).
//!
//! Scenario: instance A attaches volume W read-write and writes files; after
//! A is detached, B and C run at the same time, both attaching W read-only
//! and the base volume S as an overlay (B: guest overlayfs, C: block qcow2
//! overlay); each writes into its overlay and sees W's files, its own writes
//! and not the other's; a write to W fails. Afterwards S is unchanged
//! (qemu-img compare with a copy), W is e2fsck -fn clean, every qcow2 checks
//! clean; detach removes the overlays and config disks and the pool's
//! figures equal a rescan.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmvol::chv::{DiskConfig, ImageType, MOUNT_SCRIPT};
use vmvol::format::{Control, Prealloc, RawImage};
use vmvol::fs::{mkfs, MkfsOptions};

use super::{vol_json, vol_ok, volume_file};

/// `tool`'s path on PATH (and /sbin, /usr/sbin). Missing: panic when
/// VMVOL_REQUIRE_TOOLS=1, else say why the test is skipped and return None.
pub(super) fn require_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/sbin", "/usr/sbin"]) {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return Some(p);
        }
    }
    missing(tool)
}

/// Report a missing prerequisite: panic under VMVOL_REQUIRE_TOOLS=1.
pub(super) fn missing<T>(what: &str) -> Option<T> {
    if std::env::var("VMVOL_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("required tool missing: {what} (VMVOL_REQUIRE_TOOLS=1)");
    }
    eprintln!("skipping: {what} not found");
    None
}

/// Run a command, return (success, stdout+stderr).
pub(super) fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

pub(super) const MIB: u64 = 1 << 20;
/// Per-guest limit (a failsafe): a TCG guest runs this scenario in ~6–16 s
/// of guest time, ~20–50 s of wall time on a busy 2-core host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(150);

/// What the guest needs from the host: QEMU, a kernel and its modules, a static busybox.
pub(super) struct Guestkit {
    qemu: PathBuf,
    kernel: PathBuf,
    modules: Vec<PathBuf>,
    busybox: PathBuf,
}

/// Modules to load (with their dependencies, from modules.dep): the Debian
/// kernel builds virtio, ext4 and overlayfs as modules.
const WANTED_MODULES: [&str; 5] = [
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "overlay",
];

pub(super) fn find_kit() -> Option<Guestkit> {
    let qemu = require_tool("qemu-system-x86_64")?;
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    kernels.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vmlinuz-"))
    });
    kernels.sort();
    let Some(kernel) = kernels.pop() else {
        return missing("a kernel /boot/vmlinuz-* (linux-image-amd64)");
    };
    let version = kernel
        .file_name()?
        .to_str()?
        .trim_start_matches("vmlinuz-")
        .to_string();
    let moddir = Path::new("/lib/modules").join(&version);
    let Ok(dep) = std::fs::read_to_string(moddir.join("modules.dep")) else {
        return missing(&format!("{}/modules.dep", moddir.display()));
    };
    let Ok(builtin) = std::fs::read_to_string(moddir.join("modules.builtin")) else {
        return missing(&format!("{}/modules.builtin", moddir.display()));
    };
    // name -> (path, deps); built-in modules need no loading.
    let name_of = |p: &str| -> String {
        Path::new(p)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .split(".ko")
            .next()
            .unwrap_or("")
            .replace('-', "_")
    };
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        if let Some((m, d)) = line.split_once(':') {
            deps.insert(
                name_of(m),
                (
                    m.to_string(),
                    d.split_whitespace().map(str::to_string).collect(),
                ),
            );
        }
    }
    let builtin: Vec<String> = builtin.lines().map(name_of).collect();
    let mut order: Vec<PathBuf> = Vec::new();
    fn add(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        name_of: &dyn Fn(&str) -> String,
        moddir: &Path,
        order: &mut Vec<PathBuf>,
    ) -> bool {
        let Some((path, ds)) = deps.get(name) else {
            return false;
        };
        // modules.dep lists every transitive dependency; load deepest first.
        for d in ds.iter().rev() {
            add(&name_of(d), deps, name_of, moddir, order);
        }
        let p = moddir.join(path);
        if !order.contains(&p) {
            order.push(p);
        }
        true
    }
    for m in WANTED_MODULES {
        if !builtin.contains(&m.to_string()) && !add(m, &deps, &name_of, &moddir, &mut order) {
            return missing(&format!("kernel module {m} for {version}"));
        }
    }
    if order
        .iter()
        .any(|p| p.extension().is_none_or(|e| e != "ko"))
    {
        return missing("uncompressed kernel modules (.ko) for the busybox initramfs");
    }
    let busybox = require_tool("busybox")?;
    // The initramfs has no libc: the busybox must be static (busybox-static).
    let bytes = std::fs::read(&busybox).ok()?;
    if has_interpreter(&bytes) {
        return missing("a static busybox (busybox-static)");
    }
    Some(Guestkit {
        qemu,
        kernel,
        modules: order,
        busybox,
    })
}

/// Whether an ELF64 executable names a program interpreter (PT_INTERP), i.e. is dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return true;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

/// A newc cpio archive (what the kernel unpacks as initramfs).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(hdr.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }
    fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100755, data);
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.buf
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "insmod $m failed"; done
n=0
while [ ! -b /dev/vdc ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo VMVOL-GUEST-START
check() { if eval "$2"; then echo "CHECK $1 PASS"; else echo "CHECK $1 FAIL"; fi; }
sh /vmvol-mount.sh
echo "MOUNT-STATUS $?"
# Every disk carries the serial of its DiskConfig (vhost-user disks have
# none: their export daemon answers for the device).
. /mnt/vmvol-config/config.sh
i=0
while [ $i -lt "$VMVOL_DISK_COUNT" ]; do
  eval "d=\$VMVOL_DISK_${i}_DEVICE s=\$VMVOL_DISK_${i}_SERIAL"
  [ -z "$s" ] || check "serial-${d##*/}" '[ "$(cat /sys/block/${d##*/}/serial)" = "$s" ]'
  i=$((i + 1))
done
. /scenario.sh
sync
echo VMVOL-GUEST-DONE
poweroff -f
"#;

const SCENARIO_A: &str = r#"
check w-rw-mounted 'grep -q "^/dev/vde /w ext4 rw" /proc/mounts'
check bad-not-mounted '! grep -q " /bad " /proc/mounts'
echo from-A > /w/hello.txt && mkdir -p /w/dir && echo nested > /w/dir/n.txt
check w-written '[ "$(cat /w/hello.txt)" = from-A ] && [ "$(cat /w/dir/n.txt)" = nested ]'
sync
check w-unmounted 'umount /w'
"#;

/// B and C: `$ME` / `$OTHER` are set before this runs.
pub(super) const SCENARIO_BC: &str = r#"
check w-ro-mounted 'grep -q "^/dev/vdd /w ext4 ro" /proc/mounts'
check w-sees-A '[ "$(cat /w/hello.txt)" = from-A ] && [ "$(cat /w/dir/n.txt)" = nested ]'
check w-write-refused '! (echo x > /w/nope) 2>/dev/null && [ ! -e /w/nope ]'
check s-sees-base '[ "$(cat /s/base.txt)" = base ] && [ "$(cat /s/sub/deep.txt)" = deep ]'
echo "$ME" > "/s/mine-$ME.txt"
echo "changed-by-$ME" > /s/base.txt
rm /s/sub/deep.txt
sync
# B and C run at the same time: give the other one time to write its files.
sleep 4
check s-own-writes '[ "$(cat /s/mine-$ME.txt)" = "$ME" ] && [ "$(cat /s/base.txt)" = "changed-by-$ME" ] && [ ! -e /s/sub/deep.txt ]'
check s-not-other '[ ! -e "/s/mine-$OTHER.txt" ]'
sync
umount /s; umount /w
"#;

pub(super) const SCENARIO_B: &str = r#"ME=B OTHER=C
check s-overlayfs 'grep -q "^overlay /s overlay " /proc/mounts'
"#;
pub(super) const SCENARIO_C: &str = r#"ME=C OTHER=B
check s-block-rw 'grep -q "^/dev/vde /s ext4 rw" /proc/mounts'
"#;

fn initramfs(kit: &Guestkit, scenario: &str) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "modules"] {
        c.dir(d);
    }
    c.file("bin/busybox", &std::fs::read(&kit.busybox).unwrap());
    c.entry("bin/sh", 0o120777, b"busybox");
    c.file("init", INIT.as_bytes());
    c.file("vmvol-mount.sh", MOUNT_SCRIPT.as_bytes());
    c.file("scenario.sh", scenario.as_bytes());
    let mut order = String::new();
    for m in &kit.modules {
        let name = m.file_name().unwrap().to_str().unwrap();
        c.file(&format!("modules/{name}"), &std::fs::read(m).unwrap());
        order.push_str(name);
        order.push('\n');
    }
    c.file("modules/order", order.as_bytes());
    c.finish()
}

/// QEMU's `-drive`/`-device` pair for a DiskConfig: same file, format, mode,
/// serial; a vhost-user disk is a `vhost-user-blk-pci` on its socket (its
/// export daemon decides size and read-only).
fn qemu_disk_args(i: usize, d: &DiskConfig) -> Vec<String> {
    if d.vhost_user {
        assert!(d.path.is_none(), "a vhost-user disk has no path: {d:?}");
        let sock = d.vhost_socket.as_deref().unwrap();
        assert!(!sock.contains(','), "test paths have no commas");
        return vec![
            "-chardev".into(),
            format!("socket,id=c{i},path={sock}"),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev=c{i}"),
        ];
    }
    let format = match d.image_type {
        ImageType::Raw => "raw",
        ImageType::Qcow2 => "qcow2",
        other => panic!("unexpected image type {other:?}"),
    };
    let path = d.path.as_ref().unwrap().to_str().unwrap();
    assert!(!path.contains(','), "test paths have no commas");
    let ro = if d.readonly { ",readonly=on" } else { "" };
    vec![
        "-drive".into(),
        format!("file={path},format={format},if=none,id=d{i},cache=writeback{ro}"),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=d{i},serial={}",
            d.serial.as_deref().unwrap()
        ),
    ]
}

pub(super) struct Guest {
    name: &'static str,
    child: Child,
    log: PathBuf,
    pub(super) started: Instant,
    pub(super) ended: Option<Instant>,
}

pub(super) fn boot(
    kit: &Guestkit,
    dir: &Path,
    name: &'static str,
    disks: &[DiskConfig],
    scenario: &str,
) -> Guest {
    let initrd = dir.join(format!("initrd-{name}.cpio"));
    std::fs::File::create(&initrd)
        .unwrap()
        .write_all(&initramfs(kit, scenario))
        .unwrap();
    let log = dir.join(format!("serial-{name}.log"));
    let mut cmd = Command::new(&kit.qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-display", "none", "-monitor", "none", "-net", "none"])
    .arg("-serial")
    .arg(format!("file:{}", log.display()))
    .arg("-kernel")
    .arg(&kit.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
    ]);
    if disks.iter().any(|d| d.vhost_user) {
        // vhost-user: guest memory the export daemons can map (what
        // Cloud Hypervisor's --memory shared=on gives).
        cmd.args([
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
        ]);
    }
    for (i, d) in disks.iter().enumerate() {
        cmd.args(qemu_disk_args(i, d));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", kit.qemu.display()));
    Guest {
        name,
        child,
        log,
        started: Instant::now(),
        ended: None,
    }
}

/// Wait until guest `g` prints the line `line` on its serial console:
/// true, or false once it exits or runs past the guest timeout first.
/// (Only the RBD guest test, built with the `rbd` feature, waits so.)
#[cfg(feature = "rbd")]
pub(super) fn wait_for_line(g: &mut Guest, line: &str) -> bool {
    loop {
        let log = std::fs::read_to_string(&g.log).unwrap_or_default();
        if log.lines().any(|l| l.trim_end() == line) {
            return true;
        }
        if g.child.try_wait().unwrap().is_some() || g.started.elapsed() > GUEST_TIMEOUT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait for every guest (killing any past the timeout); return each serial log.
pub(super) fn wait_all(guests: &mut [Guest]) -> Vec<String> {
    loop {
        let mut running = false;
        for g in guests.iter_mut() {
            if g.ended.is_some() {
                continue;
            }
            match g.child.try_wait().unwrap() {
                Some(_) => g.ended = Some(Instant::now()),
                None if g.started.elapsed() > GUEST_TIMEOUT => {
                    let _ = g.child.kill();
                    let _ = g.child.wait();
                    g.ended = Some(Instant::now());
                    eprintln!("guest {} killed after {:?}", g.name, GUEST_TIMEOUT);
                }
                None => running = true,
            }
        }
        if !running {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    guests
        .iter_mut()
        .map(|g| {
            let mut err = String::new();
            if let Some(mut e) = g.child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let log = std::fs::read_to_string(&g.log).unwrap_or_default();
            eprintln!(
                "--- guest {} ({:?}) ---\n{log}{err}",
                g.name,
                g.ended.unwrap() - g.started
            );
            log
        })
        .collect()
}

/// The guest finished, its mount script exited with `mount_status`, and
/// every expected check passed (none failed).
pub(super) fn assert_guest(name: &str, log: &str, mount_status: u8, checks: &[&str]) {
    assert!(
        log.contains("VMVOL-GUEST-DONE"),
        "guest {name} did not finish:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.trim_end() == format!("MOUNT-STATUS {mount_status}")),
        "guest {name}: mount script status is not {mount_status}:\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("CHECK ") && l.trim_end().ends_with(" FAIL")),
        "guest {name}: a check failed:\n{log}"
    );
    for c in checks {
        assert!(
            log.contains(&format!("CHECK {c} PASS")),
            "guest {name}: check {c} missing:\n{log}"
        );
    }
}

pub(super) fn ext4_raw(path: &Path, size: u64) {
    let img = RawImage::create(path, size, Prealloc::Off, &Control::new()).unwrap();
    mkfs(&img, &MkfsOptions::default()).unwrap();
}

/// `vmvol instance attach NAME` with per-instance rootfs overlay, then its
/// DiskConfigs as `vmvol instance disks NAME --output json` prints them.
pub(super) fn attach(root: &Path, dir: &Path, name: &str, volumes: &[&str]) -> Vec<DiskConfig> {
    let overlay = dir.join(format!("{name}-overlay.raw"));
    ext4_raw(&overlay, 16 * MIB);
    let rootfs = dir.join("rootfs.raw");
    let mut args = vec![
        "instance",
        "attach",
        name,
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--instance-overlay",
        overlay.to_str().unwrap(),
    ];
    for v in volumes {
        args.extend(["--volume", v]);
    }
    vol_ok(root, &args);
    let json = vol_ok(root, &["instance", "disks", name, "--output", "json"]);
    let disks: Vec<DiskConfig> = serde_json::from_str(&json).unwrap();
    // Exactly Cloud Hypervisor's JSON: our own type reads it back unchanged.
    assert_eq!(
        serde_json::to_value(&disks).unwrap(),
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    );
    disks
}

/// The archive volume S is made from: `base.txt` and `sub/deep.txt`
/// (what the guest scenarios read back), as `DIR/s.tar`.
pub(super) fn s_tarball(dir: &Path) -> PathBuf {
    let tree = dir.join("s-tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("base.txt"), "base\n").unwrap();
    std::fs::write(tree.join("sub/deep.txt"), "deep\n").unwrap();
    let tarball = dir.join("s.tar");
    let (ok, out) = run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    assert!(ok, "tar: {out}");
    tarball
}

fn path_of(d: &DiskConfig) -> PathBuf {
    d.path.clone().unwrap()
}

#[test]
fn linux_guests_mount_rw_ro_and_both_overlay_kinds() {
    let Some(kit) = find_kit() else { return };
    let Some(qemu_img) = require_tool("qemu-img") else {
        return;
    };
    let Some(e2fsck) = require_tool("e2fsck") else {
        return;
    };
    let Some(debugfs) = require_tool("debugfs") else {
        return;
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("reg");
    vol_ok(
        &root,
        &["pool", "define", "default", "--quota", "1G", "--activate"],
    );

    // The shared rootfs (never mounted by this initramfs guest, but attached as /dev/vda).
    ext4_raw(&dir.join("rootfs.raw"), 16 * MIB);
    // bad: no filesystem; W: a raw ext4 volume; S: an ext4 volume made from
    // an archive (qcow2), the base of both overlays.
    vol_ok(
        &root,
        &["volume", "create", "bad", "--size", "4M", "--format", "raw"],
    );
    vol_ok(
        &root,
        &[
            "volume", "create", "w", "--size", "64M", "--format", "raw", "--ext4",
        ],
    );
    let tarball = s_tarball(dir);
    vol_ok(
        &root,
        &[
            "volume",
            "create",
            "s",
            "--size",
            "64M",
            "--from-archive",
            tarball.to_str().unwrap(),
        ],
    );
    let w = PathBuf::from(volume_file(&root, "w", "default"));
    let s = PathBuf::from(volume_file(&root, "s", "default"));
    let s_copy = dir.join("s-before.qcow2");
    std::fs::copy(&s, &s_copy).unwrap();

    // Guest A: W read-write, after a volume that cannot mount (no
    // filesystem): the script reports that failure and still mounts W.
    let pa = attach(&root, dir, "a", &["bad:/bad:ro", "w:/w"]);
    assert_eq!(path_of(&pa[4]), w);
    let mut a = [boot(&kit, dir, "A", &pa, SCENARIO_A)];
    let logs = wait_all(&mut a);
    assert_guest(
        "A",
        &logs[0],
        1,
        &[
            "bad-not-mounted",
            "w-rw-mounted",
            "w-written",
            "w-unmounted",
            "serial-vda",
            "serial-vde",
        ],
    );
    assert!(logs[0]
        .lines()
        .any(|l| l.starts_with("vmvol-mount: FAILED /dev/vdd /bad ro: ")
            && l.contains("mount ro,noload failed")));
    assert!(logs[0].contains("vmvol-mount: ok /dev/vde /w rw"));
    vol_ok(&root, &["instance", "detach", "a"]);
    assert!(!path_of(&pa[2]).exists(), "A's config disk outlived detach");
    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&w));
    assert!(ok, "W after A: e2fsck -fn: {out}");

    // Guest B: W ro + S guest-overlayfs; guest C: W ro + S block (qcow2 over S).
    let pb = attach(&root, dir, "b", &["w:/w:ro", "s:/s:ro:overlay=32M"]);
    let pc = attach(&root, dir, "c", &["w:/w:ro", "s:/s:ro:overlay=64M,block"]);
    let (b_ovl, c_q) = (path_of(&pb[5]), path_of(&pc[4]));
    assert_eq!(path_of(&pb[4]), s);
    assert!(pb[4].readonly && !pb[5].readonly && !pb[4].backing_files);
    assert!(pc[4].backing_files && !pc[4].readonly);
    assert_eq!(pc[4].image_type, ImageType::Qcow2);
    // While attached: the volume list shows W as attached to both.
    let listed = vol_json(&root, &["volume", "list", "--attached"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(names.contains(&"w") && names.contains(&"s"), "{listed}");
    let mut bc = [
        boot(&kit, dir, "B", &pb, &format!("{SCENARIO_B}{SCENARIO_BC}")),
        boot(&kit, dir, "C", &pc, &format!("{SCENARIO_C}{SCENARIO_BC}")),
    ];
    let logs = wait_all(&mut bc);
    let common = [
        "w-ro-mounted",
        "w-sees-A",
        "w-write-refused",
        "s-sees-base",
        "s-own-writes",
        "s-not-other",
    ];
    assert_guest(
        "B",
        &logs[0],
        0,
        &[&common[..], &["s-overlayfs", "serial-vdf"]].concat(),
    );
    assert_guest(
        "C",
        &logs[1],
        0,
        &[&common[..], &["s-block-rw", "serial-vde"]].concat(),
    );
    // They ran at the same time.
    let (b, c) = (&bc[0], &bc[1]);
    assert!(b.started < c.ended.unwrap() && c.started < b.ended.unwrap());

    // S unchanged, W clean, the qcow2s clean; each overlay holds its own writes.
    let (ok, out) = run(Command::new(&qemu_img)
        .args(["compare", "-f", "qcow2", "-F", "qcow2"])
        .arg(&s_copy)
        .arg(&s));
    assert!(ok, "S changed: {out}");
    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&w));
    assert!(ok, "W: e2fsck -fn: {out}");
    for q in [&s, &c_q] {
        let (ok, out) = run(Command::new(&qemu_img)
            .args(["check", "-f", "qcow2"])
            .arg(q));
        assert!(ok, "{}: qemu-img check: {out}", q.display());
    }
    let cat = |img: &Path, file: &str| {
        let (ok, out) = run(Command::new(&debugfs)
            .args(["-R", &format!("cat {file}")])
            .arg(img));
        assert!(ok, "{out}");
        out
    };
    assert!(cat(&b_ovl, "/upper/mine-B.txt").contains('B'));
    assert!(cat(&b_ovl, "/upper/base.txt").contains("changed-by-B"));
    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&b_ovl));
    assert!(ok, "B's overlay disk: e2fsck -fn: {out}");
    let c_raw = dir.join("c-flat.raw");
    let (ok, out) = run(Command::new(&qemu_img)
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&c_q)
        .arg(&c_raw));
    assert!(ok, "{out}");
    assert!(cat(&c_raw, "/mine-C.txt").contains('C'));
    assert!(cat(&c_raw, "/base.txt").contains("changed-by-C"));
    assert!(cat(&b_ovl, "/upper/mine-C.txt").contains("File not found"));
    assert!(cat(&c_raw, "/mine-B.txt").contains("File not found"));
    let (ok, out) = run(Command::new(&e2fsck).arg("-fn").arg(&c_raw));
    assert!(ok, "C's overlay contents: e2fsck -fn: {out}");

    // Clean detach: overlays and config disks gone, volumes kept, figures
    // equal a rescan.
    vol_ok(&root, &["instance", "detach", "b"]);
    vol_ok(&root, &["instance", "detach", "c"]);
    for gone in [&b_ovl, &c_q, &path_of(&pb[2]), &path_of(&pc[2])] {
        assert!(!gone.exists(), "{} outlived detach", gone.display());
    }
    assert!(w.exists() && s.exists());
    let info = vol_json(&root, &["pool", "info", "default"]);
    let rescanned = vol_json(&root, &["pool", "refresh", "default"]);
    for k in ["allocation", "virtual_size", "reserved"] {
        assert_eq!(info[k], rescanned[k], "{k}: {info} vs {rescanned}");
    }
    let listed = vol_json(&root, &["volume", "list", "--attached"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    eprintln!("guest scenario took {:?}", t0.elapsed());
}
