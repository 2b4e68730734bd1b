//! The volume layer's test suite, against real tools (`qemu-img`,
//! `e2fsck`, loop mounts as root). A missing tool skips its check, saying
//! why, or fails the test under `VMVOL_REQUIRE_TOOLS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "volume/bad_input.rs"]
mod bad_input;
#[path = "volume/crash.rs"]
mod crash;
#[path = "volume/instances.rs"]
mod instances;
#[path = "volume/instances_crash.rs"]
mod instances_crash;
#[path = "volume/lifecycle.rs"]
mod lifecycle;
#[path = "volume/model.rs"]
mod model;
#[path = "volume/races.rs"]
mod races;
#[path = "volume/support.rs"]
mod support;
