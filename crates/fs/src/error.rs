//! The one error type of `vmvol-fs`.

/// Everything that can go wrong while making, populating or reading an ext4
/// filesystem on a block image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// I/O through the block layer failed (the inner error names the image file).
    #[error("ext4 {op}: {source}")]
    Block {
        /// What we were doing, e.g. `"write inode table"`.
        op: &'static str,
        /// The block-layer error.
        #[source]
        source: vmvol_format::Error,
    },
    /// A host file or directory (populate source) could not be read.
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        /// The host path.
        path: std::path::PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// An option or argument is invalid (block size, size out of range, label too long, ...).
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// The filesystem on the image is corrupt or not ext4.
    #[error("corrupt ext4 filesystem: {reason}")]
    Corrupt {
        /// What is inconsistent.
        reason: String,
    },
    /// The filesystem uses a feature vmvol refuses (unknown incompatible
    /// feature, journal needing recovery, ...).
    #[error("unsupported ext4 filesystem: {reason}")]
    Unsupported {
        /// The feature or state, in words.
        reason: String,
    },
    /// A tar or tree entry was refused (absolute path, `..`, unsupported type,
    /// truncated archive, ...).
    #[error("entry {entry:?} refused: {reason}")]
    EntryRefused {
        /// The entry's path as recorded in the archive or source tree.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A configured limit was exceeded (total bytes, entry count, filesystem full).
    #[error("limit exceeded: {what}: {reason}")]
    LimitExceeded {
        /// Which limit, e.g. `"entry count"`.
        what: &'static str,
        /// Details (entry, amount, limit).
        reason: String,
    },
    /// The caller cancelled the operation.
    #[error("{op} cancelled")]
    Cancelled {
        /// The operation.
        op: &'static str,
    },
    /// The image holds no ext2/ext3/ext4 filesystem (no superblock magic,
    /// or too small for one).
    #[error("no ext2/ext3/ext4 filesystem on the image: {reason}")]
    NotExt4 {
        /// What was found instead.
        reason: String,
    },
    /// The filesystem must be recovered before its metadata can be trusted:
    /// its journal needs replaying, or it was not cleanly unmounted, or it has
    /// errors recorded.
    #[error("ext4 filesystem needs recovery: {reason}")]
    NeedsRecovery {
        /// Which state, and what to do about it.
        reason: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap a block-layer error with the operation it came from.
    pub fn block(op: &'static str, source: vmvol_format::Error) -> Self {
        Error::Block { op, source }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(reason: impl Into<String>) -> Self {
        Error::Corrupt {
            reason: reason.into(),
        }
    }
}

impl From<vmvol_format::Error> for Error {
    fn from(source: vmvol_format::Error) -> Self {
        Error::Block {
            op: "block I/O",
            source,
        }
    }
}
