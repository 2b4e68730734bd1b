//! The integration tests of vmvol-rbd, in one binary, against a real
//! throwaway Ceph cluster (`cluster`): the BlockIo over librbd (`blockio`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod blockio;
mod cluster;
