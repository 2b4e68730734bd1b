//! Temporary outputs (`.NAME.XXXXXX.vmvol-tmp`) of convert and compact: a
//! process SIGKILLed mid-operation leaves one behind; the next convert or
//! compact to that destination, or a read-write open of that image, removes
//! it, and leaves alone the temporary output of a writer that is still alive.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::support::*;
use vmvol_format::host::AtomicFile;
use vmvol_format::{
    compact, convert, CompactOptions, Control, ConvertOptions, Format, Image, OpenOptions,
};

/// Environment of the child: `op src dst marker`.
const CHILD_ENV: &str = "VMVOL_TEMP_OUTPUTS_CHILD";

fn temps(dir: &Path, target: &str) -> Vec<PathBuf> {
    let prefix = format!(".{target}.");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".vmvol-tmp")
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// The body of the child process (run by [`spawn_and_kill`] through this
/// test binary): a convert or compact slowed down by its progress callback,
/// which touches `marker` once work has started.
#[test]
#[ignore = "run as a child process by the temp_outputs tests"]
fn child_slow_operation() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let [op, src, dst, marker] = parts[..] else {
        panic!("bad child spec {spec:?}");
    };
    let marker = PathBuf::from(marker);
    let ctl = Control::new().with_progress(move |_, _| {
        let _ = std::fs::write(&marker, b"started");
        std::thread::sleep(Duration::from_millis(200));
    });
    match op {
        "convert" => {
            let o = OpenOptions::new().format(Format::Raw);
            convert(
                Path::new(src),
                &o,
                Path::new(dst),
                &ConvertOptions::default(),
                &ctl,
            )
            .map(|_| ())
        }
        _ => compact(Path::new(dst), &CompactOptions::default(), &ctl).map(|_| ()),
    }
    .unwrap();
}

/// Run `op` in a child process, wait until it has started writing its
/// temporary output for `dst`, and SIGKILL it.
fn spawn_and_kill(op: &str, src: &Path, dst: &Path) {
    let dir = dst.parent().unwrap();
    let marker = dir.join("started");
    let _ = std::fs::remove_file(&marker);
    let spec = format!(
        "{op}\n{}\n{}\n{}",
        src.display(),
        dst.display(),
        marker.display()
    );
    let mut child: Child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "temp_outputs::child_slow_operation",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, spec)
        .spawn()
        .unwrap();
    let name = dst.file_name().unwrap().to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() || temps(dir, name).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "child ended before it started its output"
        );
        assert!(Instant::now() < deadline, "child never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    // Dense enough for many progress steps (each sleeps in the child).
    raw_with(&src, 32 << 20, &[(0, text(5, 32 << 20))]);
    src
}

#[test]
fn killed_convert_leftover_is_removed_by_the_next_convert() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let dst = d.path().join("out.qcow2");
    spawn_and_kill("convert", &src, &dst);
    let dead = temps(d.path(), "out.qcow2");
    assert_eq!(
        dead.len(),
        1,
        "a SIGKILLed convert leaves its temporary output"
    );
    assert!(!dst.exists());

    // A live writer's temporary output (this process holds it) stays.
    let live = AtomicFile::new(&dst).unwrap();
    let o = OpenOptions::new().format(Format::Raw);
    convert(&src, &o, &dst, &ConvertOptions::default(), &Control::new()).unwrap();
    assert_eq!(
        temps(d.path(), "out.qcow2"),
        vec![live.path().to_path_buf()],
        "the dead output is removed, the live one kept"
    );
    drop(live);
    assert!(temps(d.path(), "out.qcow2").is_empty());
    if require_tool("qemu-img") {
        assert_same(&src, &dst);
    }
}

#[test]
fn killed_compact_leftover_is_removed_by_opening_the_image() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let img = d.path().join("img.qcow2");
    let o = OpenOptions::new().format(Format::Raw);
    convert(&src, &o, &img, &ConvertOptions::default(), &Control::new()).unwrap();
    spawn_and_kill("compact", &src, &img);
    assert_eq!(temps(d.path(), "img.qcow2").len(), 1);

    // Read-only opens leave it (they change nothing on disk)...
    drop(Image::open(&img, &OpenOptions::new().read_only(true)).unwrap());
    assert_eq!(temps(d.path(), "img.qcow2").len(), 1);
    // ...a read-write open removes it, but not a live one.
    let live = AtomicFile::new(&img).unwrap();
    drop(Image::open(&img, &OpenOptions::new()).unwrap());
    assert_eq!(
        temps(d.path(), "img.qcow2"),
        vec![live.path().to_path_buf()]
    );
    drop(live);

    // The next compact also cleans up after a killed one.
    spawn_and_kill("compact", &src, &img);
    assert_eq!(temps(d.path(), "img.qcow2").len(), 1);
    compact(&img, &CompactOptions::default(), &Control::new()).unwrap();
    assert!(temps(d.path(), "img.qcow2").is_empty());
    if require_tool("qemu-img") {
        assert_qemu_clean(&img);
        assert_same(&src, &img);
    }
}
