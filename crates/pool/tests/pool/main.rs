//! The integration tests of vmvol-pool, in one binary: the conformance suite
//! (`suite`) run on every backend (`conformance`), and what only the local
//! directory backend can show (`local`: statvfs/du, processes, SIGKILLs,
//! the on-disk layout, qemu-img on the images).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conformance;
mod local;
mod suite;
