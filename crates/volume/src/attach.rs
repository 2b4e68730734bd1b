//! What an instance asks for when it is created (its volumes, mount paths
//! and overlays), the checks made on the request before anything changes,
//! and the multi-attach rules.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::record::{validate_name, AttachMode, Attachment};
use crate::size::parse_size;

/// Most volume devices an instance can have: `/dev/vdd` … `/dev/vdz`
/// (`vda`–`vdc` are the rootfs, the instance overlay and the config disk).
pub const MAX_VOLUME_DEVICES: usize = 23;

/// Pool a request entry names when it names none.
pub const DEFAULT_POOL: &str = "default";

/// Guest directories no volume may be mounted at or under: the guest
/// system's own.
pub const RESERVED_MOUNT_DIRS: [&str; 14] = [
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin", "/sys",
    "/tmp", "/usr", "/var",
];

/// Where an overlay's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlayKind {
    /// Two devices: the shared base (read-only) and a per-instance sparse
    /// ext4 disk the guest joins to it with overlayfs (the seed's kind).
    #[default]
    GuestOverlayfs,
    /// One device: a per-instance qcow2 whose backing file is the base; the
    /// guest mounts it read-write like a plain disk.
    Block,
}

impl OverlayKind {
    /// Guest devices an attachment of this kind takes.
    pub fn devices(self) -> usize {
        match self {
            OverlayKind::GuestOverlayfs => 2,
            OverlayKind::Block => 1,
        }
    }
}

/// One volume of an instance's request, in the seed's JSON form
/// (`{"volume_id", "mount_path", "readonly", "overlay", "overlay_size"}`)
/// plus the pool and the overlay kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVolume {
    /// The pool ([`DEFAULT_POOL`] when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The volume's name or UUID.
    pub volume_id: String,
    /// Where the guest mounts it: absolute and clean.
    pub mount_path: String,
    /// Read-only (shared) rather than read-write (exclusive).
    #[serde(default)]
    pub readonly: bool,
    /// Give the instance private writes over the read-only volume.
    #[serde(default)]
    pub overlay: bool,
    /// Size of the overlay in bytes (JSON: a number, or a string such as
    /// `"1G"` or `"1GB"`, powers of 1024).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "size_opt"
    )]
    pub overlay_size: Option<u64>,
    /// Which overlay (guest overlayfs unless told).
    #[serde(default)]
    pub overlay_kind: OverlayKind,
}

impl AttachVolume {
    /// The pool named, or [`DEFAULT_POOL`].
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }

    /// How the base volume is attached (an overlay's base is read-only).
    pub fn mode(&self) -> AttachMode {
        if self.readonly {
            AttachMode::Ro
        } else {
            AttachMode::Rw
        }
    }

    /// The overlay asked for, if any.
    pub fn overlay(&self) -> Option<OverlayKind> {
        self.overlay.then_some(self.overlay_kind)
    }

    /// Guest devices the entry takes.
    pub fn devices(&self) -> usize {
        self.overlay().map_or(1, OverlayKind::devices)
    }

    /// `POOL/VOLUME:PATH`, how errors name the entry.
    pub fn label(&self) -> String {
        format!("{}/{}:{}", self.pool(), self.volume_id, self.mount_path)
    }
}

fn size_opt<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Wire {
        N(u64),
        S(String),
    }
    match Option::<Wire>::deserialize(d)? {
        None => Ok(None),
        Some(Wire::N(n)) => Ok(Some(n)),
        Some(Wire::S(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Everything an instance gets when it is created, in one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// The instance's id, chosen by the caller (1–63 of `a-z A-Z 0-9 . _ -`,
    /// not starting with `.`).
    pub instance: String,
    /// Its volumes, in request order (the guest's device order).
    pub volumes: Vec<AttachVolume>,
    /// Data the caller keeps with the instance (e.g. the VMM's rootfs and
    /// overlay paths); stored as given, never interpreted here.
    #[serde(default)]
    pub vmm: serde_json::Value,
}

pub(crate) fn instance_object(id: &str) -> String {
    format!("instance {id}")
}

/// Checks a request before anything is looked up or changed: instance id,
/// each mount path, overlay arguments, duplicates and the device count.
/// Each refusal names the rule and the entry.
pub fn check_request(req: &AttachRequest) -> Result<()> {
    const OP: &str = "attach";
    validate_name("instance", OP, &req.instance)?;
    let object = instance_object(&req.instance);
    let bad = |i: usize, v: &AttachVolume, why: String| {
        Error::invalid(
            &object,
            OP,
            format!("volume entry {} ({}): {why}", i + 1, v.label()),
        )
    };
    let mut devices = 0usize;
    for (i, v) in req.volumes.iter().enumerate() {
        if v.volume_id.is_empty() {
            return Err(bad(i, v, "volume_id must not be empty".into()));
        }
        if let Some(p) = &v.pool {
            vmvol_pool::validate_name(p).map_err(|e| bad(i, v, format!("pool: {e}")))?;
        }
        check_mount_path(&v.mount_path).map_err(|why| bad(i, v, why))?;
        if let Some(j) = req
            .volumes
            .iter()
            .take(i)
            .position(|w| w.mount_path == v.mount_path)
        {
            return Err(bad(
                i,
                v,
                format!(
                    "mount path {} is already used by entry {} (mount paths are unique within an instance)",
                    v.mount_path,
                    j + 1
                ),
            ));
        }
        if let Some(j) = req
            .volumes
            .iter()
            .take(i)
            .position(|w| w.pool() == v.pool() && w.volume_id == v.volume_id)
        {
            return Err(bad(
                i,
                v,
                format!(
                    "the volume is already attached by entry {} (an instance attaches a volume once)",
                    j + 1
                ),
            ));
        }
        if v.overlay {
            if !v.readonly {
                return Err(bad(
                    i,
                    v,
                    "an overlay needs readonly=true (the base is shared read-only)".into(),
                ));
            }
            match v.overlay_size {
                None | Some(0) => {
                    return Err(bad(i, v, "an overlay needs overlay_size > 0".into()));
                }
                Some(s) if !s.is_multiple_of(512) => {
                    return Err(bad(
                        i,
                        v,
                        format!("overlay_size {s} must be a multiple of 512 bytes"),
                    ));
                }
                Some(_) => {}
            }
        } else if v.overlay_size.is_some() {
            return Err(bad(i, v, "overlay_size given without overlay=true".into()));
        }
        devices += v.devices();
    }
    if devices > MAX_VOLUME_DEVICES {
        return Err(Error::invalid(
            &object,
            OP,
            format!(
                "{devices} volume devices asked for, at most {MAX_VOLUME_DEVICES} fit \
                 (/dev/vdd to /dev/vdz; a guest-overlayfs overlay takes two)"
            ),
        ));
    }
    Ok(())
}

/// Checks one guest mount path: absolute, clean (as `filepath.Clean`
/// leaves it), not `/`, and not at or under a [`RESERVED_MOUNT_DIRS`] entry.
pub fn check_mount_path(p: &str) -> std::result::Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("mount path {p:?} must be absolute"));
    }
    if p == "/" {
        return Err("mount path / is the guest's root".into());
    }
    if p.len() > 4096 {
        return Err("mount path is longer than 4096 bytes".into());
    }
    if p.chars().any(char::is_control) {
        return Err(format!("mount path {p:?} contains a control character"));
    }
    let clean = clean_path(p);
    if clean != p {
        return Err(format!("mount path {p:?} is not clean (cleaned: {clean})"));
    }
    if let Some(r) = RESERVED_MOUNT_DIRS.iter().find(|r| {
        p == **r
            || p.strip_prefix(**r)
                .is_some_and(|rest| rest.starts_with('/'))
    }) {
        return Err(format!(
            "mount path {p} is at or under {r}, which belongs to the guest system"
        ));
    }
    Ok(())
}

/// Lexical clean of an absolute path: no empty, `.` or `..` components, no
/// trailing slash (`..` at the root stays at the root).
fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Why `instance` may not attach a volume with `existing` attachments in
/// `mode`: the rule broken and the instances holding it. `None`: allowed.
///
/// The rules: an instance attaches a volume once; a read-write attachment
/// is exclusive (it cannot join others, and nothing joins it); read-only
/// attachments share.
pub fn attach_conflict(
    existing: &[Attachment],
    instance: &str,
    mode: AttachMode,
) -> Option<(&'static str, Vec<String>)> {
    let names = |f: &dyn Fn(&Attachment) -> bool| -> Vec<String> {
        existing
            .iter()
            .filter(|a| f(a))
            .map(|a| format!("{} ({})", a.instance, a.mode.as_str()))
            .collect()
    };
    if existing.iter().any(|a| a.instance == instance) {
        return Some((
            "the instance has this volume attached already",
            names(&|a| a.instance == instance),
        ));
    }
    match mode {
        AttachMode::Rw if !existing.is_empty() => Some((
            "a read-write attachment is exclusive and cannot join existing attachments",
            names(&|_| true),
        )),
        AttachMode::Ro if existing.iter().any(|a| a.mode == AttachMode::Rw) => Some((
            "the volume is attached read-write, which is exclusive",
            names(&|a| a.mode == AttachMode::Rw),
        )),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v(path: &str) -> AttachVolume {
        AttachVolume {
            pool: None,
            volume_id: "v".into(),
            mount_path: path.into(),
            readonly: false,
            overlay: false,
            overlay_size: None,
            overlay_kind: OverlayKind::GuestOverlayfs,
        }
    }

    #[test]
    fn mount_paths() {
        for ok in ["/data", "/mnt/a", "/srv/x.y", "/variable", "/user", "/a b"] {
            assert!(check_mount_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "data", "/", "/data/", "/a//b", "/a/./b", "/a/../b", "/etc", "/etc/x", "/var/lib",
            "/usr", "/tmp/t", "/a\nb",
        ] {
            assert!(check_mount_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn seed_json_with_size_strings() {
        let j = r#"[{"volume_id":"w","mount_path":"/w","readonly":true,"overlay":true,"overlay_size":"1GB"},
                    {"volume_id":"x","mount_path":"/x","overlay_size":null}]"#;
        let vs: Vec<AttachVolume> = serde_json::from_str(j).unwrap();
        assert_eq!(vs[0].overlay_size, Some(1 << 30));
        assert_eq!(vs[0].devices(), 2);
        assert_eq!(vs[1].mode(), AttachMode::Rw);
    }

    #[test]
    fn device_count_counts_overlays_twice() {
        let mut req = AttachRequest {
            instance: "i".into(),
            volumes: Vec::new(),
            vmm: serde_json::Value::Null,
        };
        for i in 0..12 {
            let mut e = v(&format!("/d{i}"));
            e.volume_id = format!("v{i}");
            e.readonly = true;
            e.overlay = true;
            e.overlay_size = Some(1 << 20);
            req.volumes.push(e);
        }
        // 24 devices.
        let e = check_request(&req).unwrap_err().to_string();
        assert!(e.contains("24 volume devices"), "{e}");
        req.volumes.pop();
        let mut e = v("/last");
        e.volume_id = "last".into();
        req.volumes.push(e);
        check_request(&req).unwrap();
    }

    #[test]
    fn rules() {
        let a = |i: &str, m| Attachment {
            instance: i.into(),
            mount_path: "/m".into(),
            mode: m,
            overlay: None,
        };
        assert!(attach_conflict(&[], "x", AttachMode::Rw).is_none());
        assert!(attach_conflict(&[a("a", AttachMode::Ro)], "x", AttachMode::Ro).is_none());
        let (_, h) = attach_conflict(&[a("a", AttachMode::Ro)], "x", AttachMode::Rw).unwrap();
        assert_eq!(h, ["a (ro)"]);
        let (_, h) = attach_conflict(&[a("a", AttachMode::Rw)], "x", AttachMode::Ro).unwrap();
        assert_eq!(h, ["a (rw)"]);
        assert!(attach_conflict(&[a("x", AttachMode::Ro)], "x", AttachMode::Ro).is_some());
    }
}
