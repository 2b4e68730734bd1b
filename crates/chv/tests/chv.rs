//! vmvol-chv tests: goldens of the Cloud Hypervisor encoding, the config
//! disk against e2fsprogs (the real Linux guest runs in the facade's CLI
//! tests, on disks made by `vmvol instance attach`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

/// The throwaway Ceph cluster of vmvol-rbd's tests (one per test binary),
/// shared by path rather than copied.
#[allow(dead_code)]
#[path = "../../rbd/tests/rbd/cluster.rs"]
mod cluster;
#[path = "chv/common.rs"]
mod common;
#[path = "chv/configdisk.rs"]
mod configdisk;
#[path = "chv/encoding.rs"]
mod encoding;
#[path = "chv/export.rs"]
mod export;
