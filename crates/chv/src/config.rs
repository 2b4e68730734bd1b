//! Cloud Hypervisor's `DiskConfig` (release v53.0), its `--disk` command-line
//! form, and the `vm.resize-disk` request body.
//!
//! Field names, types and defaults follow `vmm/src/vm_config.rs` of v53.0:
//! JSON written by [`DiskConfig`] is accepted by `PUT /vm.create` (`disks`),
//! and JSON Cloud Hypervisor returns (`GET /vm.info`) reads back, unknown
//! fields ignored.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Longest serial Cloud Hypervisor passes to the guest (virtio-blk's ID field).
pub const MAX_SERIAL_BYTES: usize = 20;

/// The disk image format Cloud Hypervisor opens the file as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ImageType {
    /// A fixed-size VHD (`vhd` on the command line).
    FixedVhd,
    /// qcow2.
    Qcow2,
    /// Raw.
    Raw,
    /// VHDX.
    Vhdx,
    /// Probe the file (deprecated in Cloud Hypervisor; vmvol never writes it:
    /// a probed qcow2 gets its backing files forced off).
    #[default]
    Unknown,
}

impl ImageType {
    /// The value of `image_type=` on the command line (`None` for `Unknown`,
    /// which the command line cannot express).
    pub fn cli_name(self) -> Option<&'static str> {
        match self {
            ImageType::FixedVhd => Some("vhd"),
            ImageType::Qcow2 => Some("qcow2"),
            ImageType::Raw => Some("raw"),
            ImageType::Vhdx => Some("vhdx"),
            ImageType::Unknown => None,
        }
    }
}

impl From<vmvol_format::Format> for ImageType {
    fn from(f: vmvol_format::Format) -> Self {
        match f {
            vmvol_format::Format::Raw => ImageType::Raw,
            vmvol_format::Format::Qcow2 => ImageType::Qcow2,
        }
    }
}

/// How Cloud Hypervisor locks the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum LockGranularity {
    /// A byte-range lock over `[0, size)` (the default).
    #[default]
    ByteRange,
    /// A whole-file lock.
    Full,
}

/// A token bucket of a rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenBucket {
    /// Bucket size (bytes or operations).
    pub size: u64,
    /// Initial burst credit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
}

/// A disk's rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RateLimiterConfig {
    /// Bandwidth bucket (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// Pinning of one virtqueue to host CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtQueueAffinity {
    /// The queue.
    pub queue_index: u16,
    /// Host CPUs it may run on.
    pub host_cpus: Vec<usize>,
}

fn default_num_queues() -> usize {
    1
}
fn default_queue_size() -> u16 {
    128
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// One disk of a Cloud Hypervisor VM (`DiskConfig`, v53.0).
///
/// `None` fields are left out of the JSON; missing fields read as Cloud
/// Hypervisor's defaults; unknown fields are ignored on read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image file (absent only for vhost-user disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Read-only device; Cloud Hypervisor then takes a shared lock on the file.
    #[serde(default)]
    pub readonly: bool,
    /// Open with `O_DIRECT`.
    #[serde(default)]
    pub direct: bool,
    /// Behind the virtual IOMMU (written only when true, as Cloud Hypervisor does).
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Number of virtqueues (default 1).
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    /// Virtqueue size (default 128, a power of two).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// A vhost-user disk.
    #[serde(default)]
    pub vhost_user: bool,
    /// The vhost-user socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// A rate limiter of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// PCI segment (default 0).
    #[serde(default)]
    pub pci_segment: u16,
    /// PCI device number on the segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Device id: unique in the VM, not starting with `__`; `vm.resize-disk`
    /// names the disk by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Serial the guest sees (`/dev/disk/by-id/virtio-<serial>`), ≤ 20 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// A shared rate-limit group (exclusive with `rate_limiter_config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    /// Virtqueue to host CPU pinning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<Vec<VirtQueueAffinity>>,
    /// Open qcow2 backing files (default false; a qcow2 with a backing file
    /// needs true).
    #[serde(default)]
    pub backing_files: bool,
    /// Punch holes on discard (default true).
    #[serde(default = "default_true")]
    pub sparse: bool,
    /// The image format; vmvol always sets it.
    #[serde(default)]
    pub image_type: ImageType,
    /// The file lock's extent.
    #[serde(default)]
    pub lock_granularity: LockGranularity,
}

impl DiskConfig {
    /// A disk of `path` in format `image_type`, every other field at Cloud
    /// Hypervisor's default.
    pub fn new(path: impl Into<PathBuf>, image_type: ImageType) -> Self {
        DiskConfig {
            path: Some(path.into()),
            readonly: false,
            direct: false,
            iommu: false,
            num_queues: default_num_queues(),
            queue_size: default_queue_size(),
            vhost_user: false,
            vhost_socket: None,
            rate_limiter_config: None,
            pci_segment: 0,
            pci_device_id: None,
            id: None,
            serial: None,
            rate_limit_group: None,
            queue_affinity: None,
            backing_files: false,
            sparse: true,
            image_type,
            lock_granularity: LockGranularity::ByteRange,
        }
    }

    /// Check what Cloud Hypervisor would refuse and what vmvol promises:
    /// an id that is non-empty and does not start with `__`, a serial of at
    /// most 20 bytes, an explicit image type, a UTF-8 path.
    pub fn validate(&self) -> Result<()> {
        let name = self.id.as_deref().unwrap_or("(no id)");
        let what = || format!("disk {name}");
        match &self.id {
            Some(id) if id.is_empty() => return Err(Error::invalid(what(), "empty id")),
            Some(id) if id.starts_with("__") => {
                return Err(Error::invalid(what(), "id starts with \"__\" (reserved)"))
            }
            _ => {}
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_SERIAL_BYTES {
                return Err(Error::invalid(
                    what(),
                    format!(
                        "serial {s:?} is {} bytes, at most {MAX_SERIAL_BYTES}",
                        s.len()
                    ),
                ));
            }
        }
        if self.image_type == ImageType::Unknown && !self.vhost_user {
            return Err(Error::invalid(
                what(),
                "image_type must be set (Raw or Qcow2)",
            ));
        }
        if self.backing_files && self.image_type != ImageType::Qcow2 {
            return Err(Error::invalid(what(), "backing_files needs a qcow2 image"));
        }
        if self.rate_limiter_config.is_some() && self.rate_limit_group.is_some() {
            return Err(Error::invalid(
                what(),
                "rate_limiter_config and rate_limit_group exclude each other",
            ));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(Error::invalid(what(), "queue_size must be a power of two"));
        }
        if self.num_queues == 0 {
            return Err(Error::invalid(what(), "num_queues must be at least 1"));
        }
        match &self.path {
            Some(p) if p.to_str().is_none() => Err(Error::invalid(
                what(),
                format!("path {} is not UTF-8", p.display()),
            )),
            Some(p) if p.as_os_str().is_empty() => Err(Error::invalid(what(), "empty path")),
            None if !self.vhost_user => Err(Error::invalid(what(), "no path")),
            _ => Ok(()),
        }
    }

    /// The value of one `--disk` argument of `cloud-hypervisor`
    /// (`path=…,readonly=on,…`): defaults are left out, `image_type` is
    /// always written, and values that hold a character the option parser
    /// treats specially are quoted the way it unquotes them.
    pub fn to_cli(&self) -> Result<String> {
        self.validate()?;
        let mut parts: Vec<String> = Vec::new();
        let mut push = |k: &str, v: &str| parts.push(format!("{k}={}", cli_quote(v)));
        if let Some(p) = &self.path {
            // validate() checked it is UTF-8.
            push("path", &p.to_string_lossy());
        }
        let on = |b: bool| if b { "on" } else { "off" };
        if self.readonly {
            push("readonly", on(true));
        }
        if self.direct {
            push("direct", on(true));
        }
        if self.iommu {
            push("iommu", on(true));
        }
        if self.num_queues != default_num_queues() {
            push("num_queues", &self.num_queues.to_string());
        }
        if self.queue_size != default_queue_size() {
            push("queue_size", &self.queue_size.to_string());
        }
        if self.vhost_user {
            push("vhost_user", on(true));
        }
        if let Some(s) = &self.vhost_socket {
            push("socket", s);
        }
        if let Some(rl) = &self.rate_limiter_config {
            for (prefix, tb) in [("bw", rl.bandwidth), ("ops", rl.ops)] {
                if let Some(tb) = tb {
                    push(&format!("{prefix}_size"), &tb.size.to_string());
                    push(
                        &format!("{prefix}_one_time_burst"),
                        &tb.one_time_burst.unwrap_or(0).to_string(),
                    );
                    push(
                        &format!("{prefix}_refill_time"),
                        &tb.refill_time.to_string(),
                    );
                }
            }
        }
        if self.pci_segment != 0 {
            push("pci_segment", &self.pci_segment.to_string());
        }
        if let Some(d) = self.pci_device_id {
            push("pci_device_id", &d.to_string());
        }
        if let Some(id) = &self.id {
            push("id", id);
        }
        if let Some(s) = &self.serial {
            push("serial", s);
        }
        if let Some(g) = &self.rate_limit_group {
            push("rate_limit_group", g);
        }
        if let Some(qa) = &self.queue_affinity {
            let items: Vec<String> = qa
                .iter()
                .map(|a| {
                    let cpus: Vec<String> = a.host_cpus.iter().map(|c| c.to_string()).collect();
                    format!("{}@[{}]", a.queue_index, cpus.join(","))
                })
                .collect();
            // A bracketed list: the parser does not split inside brackets.
            parts.push(format!("queue_affinity=[{}]", items.join(",")));
        }
        let mut push = |k: &str, v: &str| parts.push(format!("{k}={}", cli_quote(v)));
        if self.backing_files {
            push("backing_files", on(true));
        }
        if !self.sparse {
            push("sparse", on(false));
        }
        if let Some(t) = self.image_type.cli_name() {
            push("image_type", t);
        }
        if self.lock_granularity == LockGranularity::Full {
            push("lock_granularity", "full");
        }
        Ok(parts.join(","))
    }
}

/// Quote a `--disk` value for Cloud Hypervisor's option parser: it splits on
/// commas outside `"…"` and outside brackets, trims values, and inside a
/// quoted value reads `""` as one `"`. Plain values are left as they are.
pub fn cli_quote(v: &str) -> String {
    let plain = !v.is_empty() && v.trim() == v && !v.contains([',', '"', '[', ']', '=']);
    if plain {
        v.to_string()
    } else {
        format!("\"{}\"", v.replace('"', "\"\""))
    }
}

/// The `cloud-hypervisor` arguments for `disks`: `["--disk", d0, d1, …]`
/// (one `--disk` taking every disk, as its command line accepts), or nothing
/// when there are no disks.
pub fn disk_args(disks: &[DiskConfig]) -> Result<Vec<String>> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = vec!["--disk".to_string()];
    for d in disks {
        out.push(d.to_cli()?);
    }
    Ok(out)
}

/// The body of `PUT /vm.resize-disk`: grow (or, for raw, shrink) disk `id`
/// to `desired_size` bytes while the VM runs.
///
/// Cloud Hypervisor cannot resize a qcow2 that has a backing file, and
/// qcow2 only grows; the guest must grow its own filesystem afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeDisk {
    /// The disk's `id` in its [`DiskConfig`].
    pub id: String,
    /// The new size in bytes, a positive multiple of 512.
    pub desired_size: u64,
}

impl ResizeDisk {
    /// A validated request: `id` non-empty and not reserved, size a positive
    /// multiple of 512 that fits Cloud Hypervisor's int64.
    pub fn new(id: impl Into<String>, desired_size: u64) -> Result<Self> {
        let id = id.into();
        let what = || format!("resize of disk {id:?}");
        if id.is_empty() || id.starts_with("__") {
            return Err(Error::invalid(what(), "id is empty or starts with \"__\""));
        }
        if desired_size == 0 || !desired_size.is_multiple_of(512) || desired_size > i64::MAX as u64
        {
            return Err(Error::invalid(
                what(),
                format!(
                    "desired_size {desired_size} is not a positive multiple of 512 within int64"
                ),
            ));
        }
        Ok(ResizeDisk { id, desired_size })
    }

    /// The request body as JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|source| Error::Json {
            what: "vm.resize-disk body",
            source,
        })
    }
}
