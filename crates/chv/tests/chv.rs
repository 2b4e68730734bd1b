//! vmvol-chv tests: goldens of the Cloud Hypervisor encoding, the config
//! disk against e2fsprogs (the real Linux guest runs in the facade's CLI
//! tests, on disks made by `vmvol instance attach`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "chv/common.rs"]
mod common;
#[path = "chv/configdisk.rs"]
mod configdisk;
#[path = "chv/encoding.rs"]
mod encoding;
