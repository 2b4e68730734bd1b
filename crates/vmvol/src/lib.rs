//! vmvol: persistent block volumes for virtual machines.
//!
//! The facade crate: it re-exports the layers so an embedder needs one dependency.

pub use vmvol_format as format;
pub use vmvol_fs as fs;
pub use vmvol_pool as pool;
