//! Fuzz bodies for vmvol, one module per subject. Each body takes the raw
//! fuzzer input and must never panic (errors are fine); the targets in
//! `fuzz_targets/` are one-line wrappers, and `examples/seedgen.rs` builds
//! the seeds that need our own code.

pub mod ext4;
pub mod memdev;
pub mod pool;
pub mod qcow2;
pub mod tar;
