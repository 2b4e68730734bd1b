//! vmvol-chv tests: goldens of the Cloud Hypervisor encoding, the config
//! disk against e2fsprogs, and a real Linux guest under QEMU.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "chv/common.rs"]
mod common;
#[path = "chv/configdisk.rs"]
mod configdisk;
#[path = "chv/encoding.rs"]
mod encoding;
#[path = "chv/guest.rs"]
mod guest;
