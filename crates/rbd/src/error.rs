//! The crate's error type.

use std::path::PathBuf;

/// What went wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A librados/librbd call failed.
    #[error("{}: {op}: {source}", .object.display())]
    Ceph {
        /// The cluster object, image or pool (`rbd:POOL[/NS]/NAME`).
        object: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The errno the library returned.
        #[source]
        source: std::io::Error,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
