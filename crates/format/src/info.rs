//! Image information, in the spirit of `qemu-img info --output=json`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::OpenOptions;
use crate::qcow2::Qcow2Header;
use crate::{detect_format, Error, Format, Result};

/// What `info` reports about an image. Field names serialise as
/// `qemu-img info --output=json` names them (`virtual-size`, `dirty-flag`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The path as given.
    pub filename: String,
    /// The image's format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (`st_blocks * 512`).
    pub actual_size: u64,
    /// Cluster size in bytes (qcow2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Backing file name as recorded in the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file format as recorded (None if the image records none).
    #[serde(
        default,
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_format: Option<Format>,
    /// The backing file name combined with this image's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing files below this image, from the top down, each resolved
    /// and vetted under the backing policy.
    pub chain: Vec<ChainEntry>,
    /// Compression type for compressed clusters: `"zlib"` or `"zstd"` (qcow2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<String>,
    /// Whether the dirty bit is set (refcounts may be stale: lazy refcounts).
    #[serde(rename = "dirty-flag")]
    pub dirty: bool,
    /// Whether the image is marked corrupt.
    pub corrupt: bool,
    /// Whether lazy refcounts are enabled (qcow2 only).
    pub lazy_refcounts: bool,
    /// Refcount width in bits (qcow2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refcount_bits: Option<u32>,
    /// qcow2 version (2 or 3), if qcow2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qcow2_version: Option<u32>,
    /// Number of internal snapshots (qcow2 only).
    pub snapshot_count: u32,
}

/// One backing file of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainEntry {
    /// Path combined from the recorded name and the naming image's directory.
    pub filename: String,
    /// Canonical path (symlinks resolved).
    pub canonical: PathBuf,
    /// Format (as recorded in the image above).
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes the file occupies on the host.
    pub actual_size: u64,
    /// Cluster size (qcow2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
}

fn actual_size(path: &Path, file: &File) -> Result<(u64, u64)> {
    let m = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    Ok((m.len(), m.blocks().saturating_mul(512)))
}

/// Describe the image at `path` and its backing chain (resolved under
/// `opts.policy`, headers only: no image is opened for I/O). Images marked
/// dirty or corrupt are described, not refused.
pub fn info(path: &Path, opts: &OpenOptions) -> Result<ImageInfo> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let (len, actual) = actual_size(path, &file)?;
    let mut info = ImageInfo {
        filename: path.display().to_string(),
        format,
        virtual_size: len,
        actual_size: actual,
        cluster_size: None,
        backing_filename: None,
        backing_format: None,
        full_backing_filename: None,
        chain: Vec::new(),
        compression_type: None,
        dirty: false,
        corrupt: false,
        lazy_refcounts: false,
        refcount_bits: None,
        qcow2_version: None,
        snapshot_count: 0,
    };
    if format == Format::Raw {
        return Ok(info);
    }
    let h = Qcow2Header::read(path, &file)?;
    h.vet(path, len)?;
    info.virtual_size = h.size;
    info.cluster_size = Some(h.cluster_size());
    info.compression_type = Some(h.compression.as_str().to_string());
    info.dirty = h.is_dirty();
    info.corrupt = h.is_corrupt();
    info.lazy_refcounts = h.lazy_refcounts();
    info.refcount_bits = Some(1u32 << h.refcount_order);
    info.qcow2_version = Some(h.version);
    info.snapshot_count = h.nb_snapshots;
    info.backing_filename = h.backing_file.clone();
    info.backing_format = h.backing_format.as_deref().and_then(|f| f.parse().ok());

    let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, "canonicalize", e))?;
    let mut seen = vec![canonical];
    let mut naming = path.to_path_buf();
    let mut header = h;
    while let Some(name) = header.backing_file.clone() {
        let rb = opts
            .policy
            .resolve(&naming, &name, header.backing_format.as_deref(), &seen)?;
        if info.full_backing_filename.is_none() {
            info.full_backing_filename = Some(rb.combined.display().to_string());
        }
        let (blen, bactual) = actual_size(&rb.canonical, &rb.file)?;
        let mut entry = ChainEntry {
            filename: rb.combined.display().to_string(),
            canonical: rb.canonical.clone(),
            format: rb.format,
            virtual_size: blen,
            actual_size: bactual,
            cluster_size: None,
        };
        seen.push(rb.canonical.clone());
        match rb.format {
            Format::Raw => {
                info.chain.push(entry);
                break;
            }
            Format::Qcow2 => {
                let bh = Qcow2Header::read(&rb.canonical, &rb.file)?;
                bh.vet(&rb.canonical, blen)?;
                entry.virtual_size = bh.size;
                entry.cluster_size = Some(bh.cluster_size());
                info.chain.push(entry);
                naming = rb.combined;
                header = bh;
            }
        }
    }
    Ok(info)
}
