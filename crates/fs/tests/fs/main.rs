//! The tests of `vmvol-fs`, in one binary (one link of the heavy
//! dev-dependencies): each module is one subject. External tools (`e2fsck`,
//! `debugfs`, `dumpe2fs`, `mkfs.ext4`, `resize2fs`, `qemu-img`, loop mounts)
//! are asked for through [`support::require_tool`] and
//! [`support::require_loop_mount`]: a missing one skips the check, saying so,
//! or fails the test when `VMVOL_REQUIRE_TOOLS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod cancel;
mod free_map;
mod free_map_refusals;
mod mkfs;
mod populate_model;
mod populate_tar;
mod populate_tree;
mod sparse_super2;
mod unused_ranges;
