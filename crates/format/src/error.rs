//! The one error type of `vmvol-format`.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in `vmvol-format`.
///
/// Every variant names the file it is about, so a message read alone in a log
/// says which image, what operation and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call on a file failed.
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What we were doing, e.g. `"read"` or `"punch hole"`.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid image of the expected format (bad magic,
    /// truncated header, tables out of proportion to the file, ...).
    #[error("{}: invalid {format} image: {reason}", .path.display())]
    InvalidImage {
        /// The file.
        path: PathBuf,
        /// The format it was opened as.
        format: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The image uses a feature vmvol refuses (encryption, external data file,
    /// unknown incompatible feature bits, extended L2 entries, ...).
    #[error("{}: unsupported: {feature}", .path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature, in words.
        feature: String,
    },
    /// The backing chain of an image breaks the caller's backing policy.
    #[error("{}: backing file {backing:?} refused: {reason}", .path.display())]
    BackingRefused {
        /// The image that names the backing file.
        path: PathBuf,
        /// The backing file name as recorded in the image.
        backing: String,
        /// Why it is refused (outside the allowed roots, loop, depth, no format recorded, ...).
        reason: String,
    },
    /// An I/O request reaches past the end of the image.
    #[error("{}: {op} of {len} bytes at offset {offset} is beyond the image size {size}", .path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },
    /// A resize would shrink the image; vmvol only grows images.
    #[error("{}: cannot shrink from {current} to {requested} bytes: only growing is supported", .path.display())]
    Shrink {
        /// The file.
        path: PathBuf,
        /// The current virtual size in bytes.
        current: u64,
        /// The requested virtual size in bytes.
        requested: u64,
    },
    /// A write-type operation on an image opened read-only.
    #[error("{}: cannot {op}: image is open read-only", .path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
        /// The operation refused.
        op: &'static str,
    },
    /// A long operation was cancelled by its caller; nothing was left behind.
    #[error("{}: {op} cancelled", .path.display())]
    Cancelled {
        /// The file the operation was producing or working on.
        path: PathBuf,
        /// The operation.
        op: &'static str,
    },
    /// The file to be created already exists.
    #[error("{}: already exists", .path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// An argument is invalid (cluster size not a power of two, size zero, ...).
    #[error("{}: invalid argument: {reason}", .path.display())]
    InvalidArgument {
        /// The file the call was about.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image's metadata is inconsistent (found while reading or checking).
    #[error("{}: image is corrupt: {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Vet a grow of the image at `path` from `current` to `requested`
    /// bytes: refused ([`Error::Shrink`]) if smaller; `Ok(false)` if there
    /// is nothing to do.
    pub(crate) fn check_grow(path: &Path, current: u64, requested: u64) -> Result<bool> {
        if requested < current {
            return Err(Error::Shrink {
                path: path.to_path_buf(),
                current,
                requested,
            });
        }
        Ok(requested > current)
    }

    /// Wrap an `io::Error` with the file and operation it came from.
    pub fn io(path: impl AsRef<Path>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            op,
            source,
        }
    }

    /// The file this error is about.
    pub fn path(&self) -> &Path {
        match self {
            Error::Io { path, .. }
            | Error::InvalidImage { path, .. }
            | Error::Unsupported { path, .. }
            | Error::BackingRefused { path, .. }
            | Error::OutOfRange { path, .. }
            | Error::Shrink { path, .. }
            | Error::ReadOnly { path, .. }
            | Error::Cancelled { path, .. }
            | Error::Exists { path }
            | Error::InvalidArgument { path, .. }
            | Error::Corrupt { path, .. } => path,
        }
    }
}
