//! Request and response bodies. These types are the API's contract: the
//! OpenAPI document is generated from them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vmvol_format::{Compression, Format, Prealloc};
use vmvol_volume::{AttachMode, LinkMode, VolumeRecord};

use crate::error::{ApiError, ApiResult};

/// A size: bytes as a number, or a string with a binary unit (`"10G"`,
/// `"512M"`, `"1.5T"`, `"4096"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SizeArg {
    /// Bytes.
    Bytes(u64),
    /// `10G`-style text (K, M, G, T, P; binary units).
    Text(String),
}

impl SizeArg {
    /// The size in bytes.
    pub fn bytes(&self) -> ApiResult<u64> {
        match self {
            SizeArg::Bytes(n) => Ok(*n),
            SizeArg::Text(s) => parse_size(s).map_err(ApiError::invalid),
        }
    }
}

/// Parses `10G`, `512M`, `1.5T`, `4096`, `64K`, `2MiB` (binary units).
pub use vmvol_volume::parse_size;

/// Image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FormatArg {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// Host space reservation of a raw volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreallocArg {
    /// Sparse.
    Off,
    /// `fallocate`.
    Falloc,
    /// Zeros written.
    Full,
}

impl From<PreallocArg> for Prealloc {
    fn from(p: PreallocArg) -> Prealloc {
        match p {
            PreallocArg::Off => Prealloc::Off,
            PreallocArg::Falloc => Prealloc::Falloc,
            PreallocArg::Full => Prealloc::Full,
        }
    }
}

/// Linked overlay or full independent copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    /// Backing-file overlay (O(1)).
    Linked,
    /// Independent copy.
    Full,
}

impl From<ModeArg> for LinkMode {
    fn from(m: ModeArg) -> LinkMode {
        match m {
            ModeArg::Linked => LinkMode::Linked,
            ModeArg::Full => LinkMode::Full,
        }
    }
}

/// qcow2 cluster compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompressionArg {
    /// zstd.
    Zstd,
    /// zlib (deflate).
    Zlib,
}

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Zlib => Compression::Zlib,
        }
    }
}

/// `POST /api/create-volume`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateVolumeRequest {
    /// Pool.
    pub pool: String,
    /// Name, unique in the pool.
    pub name: String,
    /// Virtual size (required for blank volumes).
    pub size: Option<SizeArg>,
    /// Format of a blank volume (default qcow2).
    pub format: Option<FormatArg>,
    /// Preallocation of a blank raw volume (default off).
    pub prealloc: Option<PreallocArg>,
    /// Born ext4-formatted (blank volumes).
    pub ext4: Option<bool>,
    /// Make it from this template.
    pub template: Option<String>,
    /// Make it from this snapshot.
    pub snapshot: Option<String>,
    /// With template/snapshot: linked (default) or full.
    pub mode: Option<ModeArg>,
    /// A tar or tar.gz file under one of the server's import roots whose
    /// tree the new ext4 volume holds.
    pub archive: Option<String>,
    /// Answer 202 with a job id instead of waiting.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
}

/// `{"pool", "name"}`: one volume.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct VolumeRef {
    /// Pool.
    pub pool: String,
    /// Volume name or UUID.
    pub name: String,
}

/// Attachment state filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateArg {
    /// Attached to at least one instance.
    Attached,
    /// Attached nowhere.
    Available,
}

/// Sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SortArg {
    /// By name.
    Name,
    /// By creation time.
    Created,
    /// By virtual size.
    Size,
    /// By pool.
    Pool,
}

/// `POST /api/list-volumes`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct ListVolumesRequest {
    /// Only this pool.
    pub pool: Option<String>,
    /// Only attached or only available volumes.
    pub state: Option<StateArg>,
    /// Only this format.
    pub format: Option<FormatArg>,
    /// Case-insensitive substring of the name.
    pub name: Option<String>,
    /// Sort order (default name).
    pub sort: Option<SortArg>,
}

/// `{"volumes": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeList {
    /// Rows as `vmvol volume list --output json` prints them
    /// (`status` `ok` or `damaged`).
    #[schema(value_type = Vec<Object>)]
    pub volumes: Vec<vmvol_volume::VolumeRow>,
}

/// `POST /api/resize-volume`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ResizeVolumeRequest {
    /// Pool.
    pub pool: String,
    /// Volume name or UUID.
    pub name: String,
    /// The new size (grow only); a string starting with `+` grows by it.
    pub size: SizeArg,
}

/// What a resize did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResizeResult {
    /// Volume name.
    pub name: String,
    /// Whether an instance has it attached read-write.
    pub online: bool,
    /// Size before.
    pub old_size: u64,
    /// Size asked for (recorded now unless `request` is set).
    pub new_size: u64,
    /// Cloud Hypervisor's `PUT /vm.resize-disk` body when the VMM must
    /// grow it (a host file attached read-write); none when vmvol grew it
    /// (detached, or an RBD volume through its export daemon).
    #[schema(value_type = Option<Object>)]
    pub request: Option<vmvol_volume::ResizeDiskRequest>,
    /// What to tell the user.
    pub note: String,
}

/// `POST /api/clone-volume`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CloneVolumeRequest {
    /// Pool of the source.
    pub pool: String,
    /// Source name or UUID.
    pub name: String,
    /// Name of the copy.
    pub new_name: String,
    /// Pool of the copy (default: the same).
    pub to_pool: Option<String>,
    /// Answer 202 with a job id instead of waiting.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
}

/// `POST /api/compress-volume`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompressVolumeRequest {
    /// Pool.
    pub pool: String,
    /// Volume name or UUID.
    pub name: String,
    /// Compress the clusters kept (default false).
    pub compress: Option<bool>,
    /// Compression type with `compress` (default zstd).
    pub compression_type: Option<CompressionArg>,
    /// Answer 202 with a job id instead of waiting.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
}

/// A created volume, template or snapshot: where it lives and its record
/// (as `vmvol … create --output json` prints it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Created {
    /// Pool.
    pub pool: String,
    /// UUID.
    pub id: String,
    /// The stored record.
    #[schema(value_type = Object)]
    pub record: serde_json::Value,
}

/// `{}`-style acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Done {
    /// Always true.
    pub ok: bool,
}

/// `POST /api/define-pool`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct DefinePoolRequest {
    /// Pool name.
    pub name: String,
    /// Capacity quota (default: the filesystem's size).
    pub quota: Option<SizeArg>,
    /// Thin-provisioning ratio (default 1.0).
    pub overcommit: Option<f64>,
    /// Activate right away.
    pub activate: Option<bool>,
}

/// `{"name"}`: one pool.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct PoolRef {
    /// Pool name.
    pub name: String,
}

/// `{"pools": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    /// Listings as `vmvol pool list --output json` prints them.
    #[schema(value_type = Vec<Object>)]
    pub pools: Vec<vmvol_pool::PoolListing>,
}

/// `POST /api/create-template`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateTemplateRequest {
    /// Pool.
    pub pool: String,
    /// Template name.
    pub name: String,
    /// Freeze a copy of this volume.
    pub volume: Option<String>,
    /// Or import this image file (under one of the server's import roots).
    pub image: Option<String>,
    /// Answer 202 with a job id instead of waiting.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
}

/// `{"pool", "name"}`: one template or snapshot.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct EntryRef {
    /// Pool.
    pub pool: String,
    /// Name or UUID.
    pub name: String,
}

/// `{"pool"}`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct InPool {
    /// Pool.
    pub pool: String,
}

/// `POST /api/create-snapshot`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateSnapshotRequest {
    /// Pool.
    pub pool: String,
    /// Snapshot name.
    pub name: String,
    /// The (detached) volume.
    pub volume: String,
    /// Answer 202 with a job id instead of waiting.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
}

/// `POST /api/list-snapshots`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ListSnapshotsRequest {
    /// Pool.
    pub pool: String,
    /// Only snapshots of this volume.
    pub volume: Option<String>,
}

/// `POST /api/delete-snapshot`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct DeleteSnapshotRequest {
    /// Pool.
    pub pool: String,
    /// Snapshot name or UUID.
    pub name: String,
    /// Pull its data into its dependents first.
    pub merge: Option<bool>,
}

/// A volume of the `/volumes` API (seed 000).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// UUID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Size in GiB (rounded down).
    pub size_gb: u64,
    /// Instances it is attached to.
    pub attachments: Vec<VolumeAttachment>,
    /// Creation time, RFC 3339.
    pub created_at: String,
}

/// One attachment of a [`Volume`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VolumeAttachment {
    /// The instance.
    pub instance_id: String,
    /// Where the guest mounts it.
    pub mount_path: String,
    /// Read-only attachment.
    pub readonly: bool,
}

impl Volume {
    /// The `/volumes` form of a stored record.
    pub fn from_record(id: &str, r: &VolumeRecord) -> Volume {
        Volume {
            id: id.to_string(),
            name: r.name.clone(),
            size_gb: r.size >> 30,
            attachments: r
                .attachments
                .iter()
                .map(|a| VolumeAttachment {
                    instance_id: a.instance.clone(),
                    mount_path: a.mount_path.clone(),
                    readonly: a.mode == AttachMode::Ro,
                })
                .collect(),
            created_at: r.created.clone(),
        }
    }
}

/// `POST /volumes` as JSON.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateVolumeJson {
    /// Name.
    pub name: String,
    /// Size in GiB.
    pub size_gb: u64,
    /// Volume id; vmvol assigns UUIDs itself, so this must be absent.
    pub id: Option<String>,
}

/// `POST /volumes` as `multipart/form-data` (schema for the document).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateVolumeMultipart {
    /// Name.
    pub name: String,
    /// Size in GiB; also caps the archive's size.
    pub size_gb: u64,
    /// Volume id; must be absent (see the JSON form).
    pub id: Option<String>,
    /// A tar.gz whose tree the new ext4 volume holds.
    #[schema(value_type = String, format = Binary)]
    pub content: Vec<u8>,
}

/// A long operation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Working.
    Running,
    /// Finished; `result` holds what it made.
    Succeeded,
    /// Failed; `error` says why.
    Failed,
    /// Cancelled; nothing was left behind.
    Cancelled,
}

/// Bytes done out of bytes to do, in the operation's current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Bytes done in this phase.
    pub done: u64,
    /// Bytes this phase has in all (0 until known).
    pub total: u64,
    /// Phase number, from 1 (0: nothing reported yet). Some operations
    /// report more than one step (e.g. a clone to another pool makes the
    /// image, then copies into it); `done` restarts from zero with each.
    pub phase: u32,
}

/// A job as `GET /api/jobs/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// What it does (`create volume`, `clone volume`, ...).
    pub operation: String,
    /// State.
    pub state: JobState,
    /// Progress.
    pub progress: Progress,
    /// The result once succeeded (what the call would have answered).
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// The error once failed or cancelled.
    pub error: Option<crate::error::ErrorDetail>,
}

/// `202` answer of an `"async": true` call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobAccepted {
    /// Poll `GET /api/jobs/{job_id}`.
    pub job_id: String,
}

/// `POST /api/cancel-job`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CancelJobRequest {
    /// Job id.
    pub id: String,
}

/// A disk image format as Cloud Hypervisor's `image_type` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageTypeArg {
    /// raw
    Raw,
    /// qcow2
    Qcow2,
}

impl From<ImageTypeArg> for vmvol_chv::ImageType {
    fn from(t: ImageTypeArg) -> Self {
        match t {
            ImageTypeArg::Raw => vmvol_chv::ImageType::Raw,
            ImageTypeArg::Qcow2 => vmvol_chv::ImageType::Qcow2,
        }
    }
}

/// Where an overlay's writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OverlayKindArg {
    /// A per-instance ext4 disk joined to the read-only base by the guest's overlayfs (two devices).
    #[default]
    GuestOverlayfs,
    /// A per-instance qcow2 over the base (one device).
    Block,
}

/// One volume of an instance: the seed's `{"volume_id", "mount_path",
/// "readonly", "overlay", "overlay_size"}` plus the pool and the overlay kind.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AttachVolumeArg {
    /// The pool (`default` when absent).
    #[serde(default)]
    pub pool: Option<String>,
    /// The volume's name or UUID.
    pub volume_id: String,
    /// Where the guest mounts it (absolute, clean, not a system directory).
    pub mount_path: String,
    /// Shared read-only instead of exclusive read-write.
    #[serde(default)]
    pub readonly: bool,
    /// Private writes over the read-only volume.
    #[serde(default)]
    pub overlay: bool,
    /// The overlay's size (needed with `overlay`).
    #[serde(default)]
    pub overlay_size: Option<SizeArg>,
    /// Which overlay.
    #[serde(default)]
    pub overlay_kind: OverlayKindArg,
}

/// Body of `POST /api/attach-instance`: a new instance gets all its volumes.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AttachInstanceRequest {
    /// The instance id (1–63 of `a-z A-Z 0-9 . _ -`).
    pub instance: String,
    /// The rootfs image (`/dev/vda`, read-only), as the VMM will open it.
    pub rootfs: String,
    /// Its format (never probed).
    pub rootfs_image_type: ImageTypeArg,
    /// The instance's writable overlay (`/dev/vdb`).
    pub instance_overlay: String,
    /// Its format.
    pub instance_overlay_image_type: ImageTypeArg,
    /// The volumes, in device order.
    #[serde(default)]
    pub volumes: Vec<AttachVolumeArg>,
    /// Extra top-level fields of the config disk's `/config.json`.
    #[serde(default)]
    pub config_extra: serde_json::Map<String, serde_json::Value>,
}

/// Names an instance.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct InstanceRef {
    /// The instance id.
    pub instance: String,
}

/// An attached instance: its record, Cloud Hypervisor's `DiskConfig` array
/// (`disks`, in `/dev/vdX` order, for `PUT /vm.create`), the guest's mount
/// plan and the config disk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceView {
    /// The instance record (state, volumes, overlays).
    #[schema(value_type = Object)]
    pub instance: serde_json::Value,
    /// The `DiskConfig` array, exactly Cloud Hypervisor's JSON.
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<serde_json::Value>,
    /// What the guest mounts (`volume_mounts` of `/config.json`).
    #[schema(value_type = Vec<Object>)]
    pub volume_mounts: Vec<serde_json::Value>,
    /// The config disk (`/dev/vdc`).
    pub config_disk: String,
}

/// The instances of this host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InstanceList {
    /// One row each (damaged records shown with their reason).
    #[schema(value_type = Vec<Object>)]
    pub instances: Vec<serde_json::Value>,
}

/// What a detach did.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetachResult {
    /// The instance.
    pub instance: String,
    /// The volumes it had (empty: nothing was attached).
    #[schema(value_type = Vec<Object>)]
    pub volumes: Vec<serde_json::Value>,
}
