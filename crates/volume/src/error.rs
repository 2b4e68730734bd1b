//! The one error type of `vmvol-volume`.

use serde::{Deserialize, Serialize};

/// What kind of failure an [`Error`] is, for callers that map errors to
/// status codes (an HTTP API: 404, 409, 507, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The pool, volume, template or snapshot does not exist.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// The object is attached to an instance.
    InUse,
    /// Something is linked to the object.
    HasDependents,
    /// The pool has no room.
    InsufficientSpace,
    /// The request itself is wrong (bad name, shrink, bad size, ...).
    InvalidArgument,
    /// The request is well formed but not allowed in this state.
    Refused,
    /// Stored data is damaged.
    Corrupt,
    /// Another user holds the pool.
    Busy,
    /// The operating system or the storage failed.
    Io,
    /// The caller cancelled.
    Cancelled,
}

/// Everything that can go wrong in `vmvol-volume`. Each message names the
/// object, the operation and the reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A name broke the naming rule.
    #[error("{object}: {op}: invalid name {name:?}: {rule}")]
    InvalidName {
        /// What was being named (`volume`, `template`, `snapshot`).
        object: String,
        /// The operation.
        op: &'static str,
        /// The name as given.
        name: String,
        /// The rule broken.
        rule: &'static str,
    },
    /// An argument is not acceptable.
    #[error("{object}: {op}: {reason}")]
    InvalidArgument {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The object does not exist.
    #[error("{object}: {op}: not found")]
    NotFound {
        /// The object (`pool P volume V`).
        object: String,
        /// The operation.
        op: &'static str,
    },
    /// The name is taken.
    #[error("{object}: {op}: already exists")]
    AlreadyExists {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
    },
    /// The object is attached.
    #[error("{object}: {op}: refused, attached to instance(s) {}", .instances.join(", "))]
    Attached {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The instances it is attached to.
        instances: Vec<String>,
    },
    /// An attachment rule forbids attaching the volume.
    #[error("{object}: attach to instance {instance} ({}): refused: {rule}; held by {}", .mode.as_str(), .holders.join(", "))]
    AttachRefused {
        /// The volume.
        object: String,
        /// The instance asking.
        instance: String,
        /// The mode asked for.
        mode: crate::record::AttachMode,
        /// The rule broken.
        rule: &'static str,
        /// The attachments in the way (`vm-1 (rw)`).
        holders: Vec<String>,
    },
    /// Other objects are linked to it.
    #[error("{object}: {op}: refused, still needed by {}", .dependents.join(", "))]
    HasDependents {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The dependents (`volume web`, `snapshot s1`).
        dependents: Vec<String>,
    },
    /// A resize asked for a smaller size.
    #[error("{object}: resize: refused to shrink from {current} to {requested} bytes (grow only)")]
    Shrink {
        /// The volume.
        object: String,
        /// Its size now.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
    /// Not allowed in this state.
    #[error("{object}: {op}: refused: {reason}")]
    Refused {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// Stored data is damaged.
    #[error("{object}: {op}: damaged: {reason}")]
    Corrupt {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// What is damaged.
        reason: String,
    },
    /// The caller cancelled; nothing was committed.
    #[error("{object}: {op}: cancelled")]
    Cancelled {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
    },
    /// The pool layer failed.
    #[error("{object}: {op}: {source}")]
    Pool {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The pool error.
        #[source]
        source: Box<vmvol_pool::Error>,
    },
    /// The image layer failed.
    #[error("{object}: {op}: {source}")]
    Image {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The image error.
        #[source]
        source: Box<vmvol_format::Error>,
    },
    /// The filesystem layer failed.
    #[error("{object}: {op}: {source}")]
    Fs {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The filesystem error.
        #[source]
        source: Box<vmvol_fs::Error>,
    },
    /// A step outside this crate failed (e.g. the VMM encoding a
    /// [`PrepareHook`](crate::PrepareHook) runs); `kind` classifies it.
    #[error("{object}: {op}: {source}")]
    External {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// What kind of failure it is.
        kind: ErrorKind,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An operating-system call failed.
    #[error("{object}: {op}: {source}")]
    Io {
        /// The object.
        object: String,
        /// The operation.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        use vmvol_pool::Error as P;
        match self {
            Error::InvalidName { .. } | Error::InvalidArgument { .. } | Error::Shrink { .. } => {
                ErrorKind::InvalidArgument
            }
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Attached { .. } | Error::AttachRefused { .. } => ErrorKind::InUse,
            Error::HasDependents { .. } => ErrorKind::HasDependents,
            Error::Refused { .. } => ErrorKind::Refused,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Io { .. } => ErrorKind::Io,
            Error::External { kind, .. } => *kind,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::Pool { source, .. } => match &**source {
                P::InvalidName { .. } | P::InvalidSpec { .. } => ErrorKind::InvalidArgument,
                P::PoolNotFound { .. } | P::EntryNotFound { .. } | P::ImageNotFound { .. } => {
                    ErrorKind::NotFound
                }
                P::EntryExists { .. } | P::AlreadyDefined { .. } => ErrorKind::AlreadyExists,
                P::InsufficientSpace { .. } | P::InsufficientPhysicalSpace { .. } => {
                    ErrorKind::InsufficientSpace
                }
                P::Inactive { .. } | P::NotEmpty { .. } | P::Fenced { .. } => ErrorKind::Refused,
                P::Busy { .. } => ErrorKind::Busy,
                P::Damaged { .. } => ErrorKind::Corrupt,
                P::Image { source, .. } => image_kind(source),
                P::InvalidImage { .. } => ErrorKind::InvalidArgument,
                _ => ErrorKind::Io,
            },
            Error::Image { source, .. } => image_kind(source),
            Error::Fs { source, .. } => {
                use vmvol_fs::Error as F;
                match &**source {
                    F::Cancelled { .. } => ErrorKind::Cancelled,
                    F::InvalidArgument { .. } => ErrorKind::InvalidArgument,
                    F::EntryRefused { .. } | F::LimitExceeded { .. } | F::Unsupported { .. } => {
                        ErrorKind::Refused
                    }
                    F::Corrupt { .. } | F::NeedsRecovery { .. } => ErrorKind::Corrupt,
                    F::Block { source, .. } => image_kind(source),
                    _ => ErrorKind::Io,
                }
            }
        }
    }

    /// An error from outside this crate, classified as `kind`.
    pub fn external(
        object: impl Into<String>,
        op: &'static str,
        kind: ErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::External {
            object: object.into(),
            op,
            kind,
            source: source.into(),
        }
    }

    pub(crate) fn pool(
        object: impl Into<String>,
        op: &'static str,
    ) -> impl FnOnce(vmvol_pool::Error) -> Error {
        let object = object.into();
        move |source| Error::Pool {
            object,
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn image(
        object: impl Into<String>,
        op: &'static str,
    ) -> impl FnOnce(vmvol_format::Error) -> Error {
        let object = object.into();
        move |source| Error::Image {
            object,
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn fs(
        object: impl Into<String>,
        op: &'static str,
    ) -> impl FnOnce(vmvol_fs::Error) -> Error {
        let object = object.into();
        move |source| Error::Fs {
            object,
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn refused(
        object: impl Into<String>,
        op: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        Error::Refused {
            object: object.into(),
            op,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(
        object: impl Into<String>,
        op: &'static str,
        reason: impl Into<String>,
    ) -> Error {
        Error::InvalidArgument {
            object: object.into(),
            op,
            reason: reason.into(),
        }
    }
}

fn image_kind(e: &vmvol_format::Error) -> ErrorKind {
    use vmvol_format::Error as F;
    match e {
        F::Cancelled { .. } => ErrorKind::Cancelled,
        F::InvalidArgument { .. } | F::OutOfRange { .. } | F::Shrink { .. } => {
            ErrorKind::InvalidArgument
        }
        F::Unsupported { .. } | F::BackingRefused { .. } | F::ReadOnly { .. } => ErrorKind::Refused,
        F::Corrupt { .. } | F::InvalidImage { .. } => ErrorKind::Corrupt,
        F::Exists { .. } => ErrorKind::AlreadyExists,
        _ => ErrorKind::Io,
    }
}
