//! The integration tests of vmvol-rbd, in one binary, against a real
//! throwaway Ceph cluster (`cluster`): the BlockIo over librbd (`blockio`)
//! and the pool conformance suite on the RBD backend (`conformance`, with
//! the suite's source shared with vmvol-pool's tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod blockio;
mod cluster;
mod compress;
mod conformance;
mod crash;
mod exclusive;
mod hosts;
mod images;
mod journal;
mod registry;
mod scale;
#[path = "../../../pool/tests/pool/suite.rs"]
mod suite;
mod timing;
mod volumes;
