//! Pool record body: the input replaces files of a real pool (made once per
//! process through the public API), then the pool is opened, described and
//! listed the way the CLI does, and the registry is listed.
//!
//! Input: records `[file selector: u8][len: u16 LE][bytes]`; the last
//! record's bytes are clipped at the input's end. `@POOL@` in the bytes is
//! replaced by the pool root, so seeds can name the pool's absolute paths.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmvol_format::{Control, Format, Prealloc};
use vmvol_pool::{EntryKind, ImageSpec, PoolSpec, RecordType, Registry, Wait, DATA_IMAGE};

/// The upper layer's record, as the CLI example defines one.
#[derive(Serialize, Deserialize)]
pub struct Vol {
    /// Display name.
    pub name: String,
    /// Virtual size.
    pub size: u64,
}

impl RecordType for Vol {
    const SCHEMA_VERSION: u32 = 1;
}

/// Placeholder for the per-process root in inputs.
pub const ROOT_TOKEN: &[u8] = b"@POOL@";

/// Files an input may replace, relative to the registry root.
pub const FILES: [&str; 8] = [
    "pools/default/pool.json",
    "pools/default/journal",
    "pools/default/volumes/v1/volume.json",
    "pools/default/volumes/v1/data.qcow2",
    "pools/default/templates/t1/template.json",
    "pools/default/snapshots/s1/snapshot.json",
    "registry/default.json",
    "pools/default/reservations/0123456789abcdef0123456789abcdef.json",
];

/// Builds a registry with pool `default` holding volume `v1` (qcow2),
/// template `t1` and snapshot `s1` (raw) at `root`.
pub fn build(root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let reg = Registry::open(root)?;
    reg.define("default", &PoolSpec::default())?;
    reg.activate("default", Wait::FailFast)?;
    let pool = reg.open_pool("default", Wait::FailFast)?;
    for (kind, id, format) in [
        (EntryKind::Volume, "v1", Format::Qcow2),
        (EntryKind::Template, "t1", Format::Raw),
        (EntryKind::Snapshot, "s1", Format::Raw),
    ] {
        let st = pool.stage()?;
        st.create_image(
            DATA_IMAGE,
            &ImageSpec {
                size: 1 << 20,
                format,
                prealloc: Prealloc::Off,
            },
            &Control::new(),
        )?;
        let vol = Vol {
            name: id.to_string(),
            size: 1 << 20,
        };
        pool.commit(st, kind, id, &vol)?;
    }
    Ok(())
}

/// Per-process pool root and its pristine copy.
struct Roots {
    live: PathBuf,
    pristine: PathBuf,
}

fn roots() -> Option<&'static Roots> {
    static R: std::sync::OnceLock<Option<Roots>> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let top = base.join(format!("vmvol-fuzz-pool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let live = top.join("live");
        let pristine = top.join("pristine");
        build(&live).ok()?;
        copy_tree(&live, &pristine).ok()?;
        Some(Roots { live, pristine })
    })
    .as_ref()
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for de in std::fs::read_dir(from)? {
        let de = de?;
        let t = to.join(de.file_name());
        if de.file_type()?.is_dir() {
            copy_tree(&de.path(), &t)?;
        } else {
            std::fs::copy(de.path(), &t)?;
        }
    }
    Ok(())
}

/// Splits an input into (file index, bytes) pairs.
pub fn split(mut data: &[u8]) -> Vec<(usize, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let sel = data[0] as usize % FILES.len();
        let len = u16::from_le_bytes([data[1], data[2]]) as usize;
        let body = &data[3..];
        let take = len.min(body.len());
        out.push((sel, &body[..take]));
        data = &body[take..];
    }
    out
}

/// Encodes (file index, bytes) pairs as an input (for the seed generator).
pub fn join(files: &[(usize, Vec<u8>)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (sel, b) in files {
        v.push(*sel as u8);
        v.extend_from_slice(&(b.len().min(65535) as u16).to_le_bytes());
        v.extend_from_slice(&b[..b.len().min(65535)]);
    }
    v
}

fn substitute(bytes: &[u8], root: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(ROOT_TOKEN) {
            out.extend_from_slice(root);
            i += ROOT_TOKEN.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The fuzz body.
pub fn records(data: &[u8]) {
    let Some(r) = roots() else {
        return;
    };
    let _ = std::fs::remove_dir_all(&r.live);
    if copy_tree(&r.pristine, &r.live).is_err() {
        return;
    }
    let root = r.live.as_os_str().as_encoded_bytes();
    for (sel, bytes) in split(data) {
        let p = r.live.join(FILES[sel]);
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(&p, substitute(bytes, root));
    }
    let Ok(reg) = Registry::open(&r.live) else {
        return;
    };
    let _ = reg.list();
    let _ = reg.get("default");
    // Open the pool by its directory, never by the (fuzzed) registry path:
    // recovery removes files, and only the scratch tree may be touched.
    let Ok(pool) = vmvol_pool::Pool::open(r.live.join("pools/default"), Wait::FailFast) else {
        return;
    };
    let _ = pool.config();
    let _ = pool.describe();
    for kind in EntryKind::ALL {
        let _ = pool.list::<Vol>(kind, |_, _| true);
        let _ = pool.list::<serde_json::Value>(kind, |_, _| true);
    }
    let got = pool.get::<Vol>(EntryKind::Volume, "v1");
    let d = pool.refresh();
    if std::env::var_os("VMVOL_FUZZ_DEBUG").is_some() {
        eprintln!(
            "get: {:?}\nrefresh: {:?}",
            got.map(|e| e.id),
            d.map(|d| d.allocation)
        );
    }
}

/// Seeds: each real file of a freshly built pool (paths replaced by the
/// token), one input per file plus one with all of them.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let Some(r) = roots() else {
        return Vec::new();
    };
    let root = r.pristine.as_os_str().as_encoded_bytes().to_vec();
    let live = r.live.as_os_str().as_encoded_bytes().to_vec();
    let mut all = Vec::new();
    let mut out = Vec::new();
    // A live reservation's file, read while it is held.
    let mut reservation = None;
    if let Ok(pool) = vmvol_pool::Pool::open(r.live.join("pools/default"), Wait::FailFast) {
        if let Ok(guard) = pool.reserve(4096, "seed") {
            let dir = r.live.join("pools/default/reservations");
            if let Some(Ok(de)) = std::fs::read_dir(&dir).ok().and_then(|mut d| d.next()) {
                reservation = std::fs::read(de.path()).ok();
            }
            drop(guard);
        }
    }
    for (i, f) in FILES.iter().enumerate() {
        let b = if i == 7 {
            reservation.clone()
        } else {
            std::fs::read(r.pristine.join(f)).ok()
        };
        let Some(b) = b else {
            continue;
        };
        let b = replace(&replace(&b, &root, ROOT_TOKEN), &live, ROOT_TOKEN);
        let b = if f.ends_with(".qcow2") {
            b[..b.len().min(1024)].to_vec()
        } else {
            b
        };
        out.push((format!("file{i}"), join(&[(i, b.clone())])));
        all.push((i, b));
    }
    out.push(("all".to_string(), join(&all)));
    out
}

fn replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !from.is_empty() && b[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}
