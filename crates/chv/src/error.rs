//! The error type of vmvol-chv.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while encoding an instance's disks for Cloud Hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be encoded (bad value, too many devices, ...).
    #[error("chv {what}: {reason}")]
    Invalid {
        /// The object refused (a disk, a volume, a field).
        what: String,
        /// Why.
        reason: String,
    },
    /// Host I/O on a file failed.
    #[error("chv {op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Making the config disk's image failed.
    #[error("chv config disk {}: {source}", path.display())]
    Format {
        /// The image file.
        path: PathBuf,
        /// The block layer's error.
        #[source]
        source: vmvol_format::Error,
    },
    /// Writing the config disk's ext4 failed.
    #[error("chv config disk {}: {source}", path.display())]
    Fs {
        /// The image file.
        path: PathBuf,
        /// The filesystem layer's error.
        #[source]
        source: vmvol_fs::Error,
    },
    /// A vhost-user export (its qemu-storage-daemon) could not be started
    /// or stopped.
    #[error("chv {op} of {what}: {reason}")]
    Export {
        /// The export (volume and device).
        what: String,
        /// The operation.
        op: &'static str,
        /// Why, with the daemon's own words when it gave any.
        reason: String,
    },
    /// Encoding JSON failed.
    #[error("chv encode {what} as JSON: {source}")]
    Json {
        /// What was encoded.
        what: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
