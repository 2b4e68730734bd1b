//! cargo-fuzz target `tar_populate`: see `vmvol_fuzz::tar::populate` and docs/testing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmvol_fuzz::tar::populate(data));
