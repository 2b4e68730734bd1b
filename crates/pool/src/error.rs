//! The one error type of `vmvol-pool`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::record::EntryKind;

/// Everything that can go wrong in `vmvol-pool`.
///
/// Every variant names the object it is about (pool, entry or file), so a
/// message read alone in a log says what, which operation and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A pool or entry name broke the naming rule.
    #[error("invalid name {name:?}: {rule}")]
    InvalidName {
        /// The name as given (may contain control characters; shown escaped).
        name: String,
        /// The rule it broke, in words.
        rule: &'static str,
    },
    /// A pool specification is not acceptable (bad ratio, zero quota, ...).
    #[error("pool {pool}: invalid specification: {reason}")]
    InvalidSpec {
        /// The pool.
        pool: String,
        /// What is wrong.
        reason: String,
    },
    /// An operating-system call failed.
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What we were doing, e.g. `"create directory"`.
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// A path that must be a directory (registry root, pool directory) is
    /// something else, or one of its parents is a regular file.
    #[error("{}: not a directory: {reason}", .path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A directory we must write to refuses writes (permissions, read-only
    /// filesystem, pseudo filesystem).
    #[error("{}: not writable: {source}", .path.display())]
    Unwritable {
        /// The directory.
        path: PathBuf,
        /// The system error from the write attempt.
        #[source]
        source: std::io::Error,
    },
    /// `define` of a name the registry already holds.
    #[error("pool {name}: already defined (directory {})", .path.display())]
    AlreadyDefined {
        /// The pool name.
        name: String,
        /// The existing pool's directory.
        path: PathBuf,
    },
    /// `define` pointed at a directory that already holds files.
    #[error("{}: cannot define pool {name} here: {reason}", .path.display())]
    PathInUse {
        /// The pool name.
        name: String,
        /// The directory.
        path: PathBuf,
        /// What is in the way.
        reason: String,
    },
    /// No pool of that name is defined.
    #[error("pool {name}: not defined in registry {}", .root.display())]
    PoolNotFound {
        /// The pool name.
        name: String,
        /// The registry root.
        root: PathBuf,
    },
    /// `undefine` of a pool that still holds something.
    #[error(
        "pool {pool}: cannot undefine, it is not empty ({volumes} volumes, {templates} templates, \
         {snapshots} snapshots, {staging} staging items, {reservations} open reservations, \
         {damaged} damaged entries)"
    )]
    NotEmpty {
        /// The pool.
        pool: String,
        /// Volumes held.
        volumes: usize,
        /// Templates held.
        templates: usize,
        /// Snapshots held.
        snapshots: usize,
        /// In-flight staging directories of live operations.
        staging: usize,
        /// Open reservations of live processes.
        reservations: usize,
        /// Entries whose record is damaged (counted in the kinds above too).
        damaged: usize,
    },
    /// The pool is inactive and the operation needs an active pool.
    #[error("pool {pool}: {op}: the pool is inactive (activate it first)")]
    Inactive {
        /// The pool.
        pool: String,
        /// The refused operation.
        op: &'static str,
    },
    /// A reservation would exceed what the pool's policy allows.
    #[error(
        "pool {pool}: cannot reserve {needed} bytes: only {available} bytes available \
         (limit {limit} = capacity x overcommit ratio, {allocation} bytes already allocated or reserved)"
    )]
    InsufficientSpace {
        /// The pool.
        pool: String,
        /// Bytes asked for.
        needed: u64,
        /// Bytes that could have been granted.
        available: u64,
        /// The pool's allocation limit.
        limit: u64,
        /// Allocation (virtual sizes + reservations) at the time of refusal.
        allocation: u64,
    },
    /// A reservation of bytes that will really be written exceeds the free
    /// space of the storage under the pool (whatever the policy allows).
    #[error(
        "pool {pool}: cannot reserve {needed} bytes to be written: only {available} bytes \
         physically available ({free} bytes free on the storage, {reserved} bytes already \
         reserved for writing)"
    )]
    InsufficientPhysicalSpace {
        /// The pool.
        pool: String,
        /// Bytes asked for.
        needed: u64,
        /// `free − reserved`: bytes that could have been granted.
        available: u64,
        /// Free space the storage reports.
        free: u64,
        /// Bytes held by other physical reservations.
        reserved: u64,
    },
    /// A write carried the exclusive guard of a lock tenure that is over
    /// (its lease lapsed or passed to another holder): refused, so a stale
    /// holder cannot overwrite a newer holder's work.
    #[error("{}: {op}: refused: {reason}", .location.display())]
    Fenced {
        /// The pool's location.
        location: PathBuf,
        /// The refused operation.
        op: &'static str,
        /// Why the guard is stale.
        reason: String,
    },
    /// The pool's records name a backend this build does not include.
    #[error("pool {pool}: backend {backend:?} is not built into this vmvol")]
    BackendNotBuiltIn {
        /// The pool.
        pool: String,
        /// The backend type (`rbd`, ...).
        backend: &'static str,
    },
    /// An image operation of the format layer failed.
    #[error("{image}: {op}: {source}")]
    Image {
        /// The image.
        image: String,
        /// What we were doing.
        op: &'static str,
        /// The format layer's error.
        #[source]
        source: vmvol_format::Error,
    },
    /// An image request is not acceptable.
    #[error("{image}: {reason}")]
    InvalidImage {
        /// The image.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// An image does not exist.
    #[error("{image}: not found")]
    ImageNotFound {
        /// The image.
        image: String,
    },
    /// The pool lock could not be taken in time.
    #[error("{}: {op}: pool is locked by another user (gave up after {waited:?})", .path.display())]
    Busy {
        /// The lock file.
        path: PathBuf,
        /// The operation that wanted the lock.
        op: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// A pool method was called from inside a transaction on the same pool
    /// (it would wait forever for the lock the transaction holds).
    #[error("{}: {op}: called inside a transaction on the same pool; use the transaction's methods", .path.display())]
    Reentrant {
        /// The pool.
        path: PathBuf,
        /// The refused operation.
        op: &'static str,
    },
    /// An entry (volume, template, snapshot) does not exist.
    #[error("pool {pool}: {kind} {id}: not found")]
    EntryNotFound {
        /// The pool.
        pool: String,
        /// The kind of entry.
        kind: EntryKind,
        /// The entry id.
        id: String,
    },
    /// An entry with that id already exists.
    #[error("pool {pool}: {kind} {id}: already exists")]
    EntryExists {
        /// The pool.
        pool: String,
        /// The kind of entry.
        kind: EntryKind,
        /// The entry id.
        id: String,
    },
    /// A record (or the pool's own config) cannot be read or parsed.
    #[error("{}: damaged record: {reason}", .path.display())]
    Damaged {
        /// The record file.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// A record could not be serialised.
    #[error("{}: serialise record: {source}", .path.display())]
    Serialize {
        /// Where it was to be written.
        path: PathBuf,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] for `path` and operation `op`.
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
