//! cargo-fuzz target `pool_records`: see `vmvol_fuzz::pool::records` and docs/testing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmvol_fuzz::pool::records(data));
