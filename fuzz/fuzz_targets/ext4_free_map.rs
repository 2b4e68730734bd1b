//! cargo-fuzz target `ext4_free_map`: see `vmvol_fuzz::ext4::free_map` and docs/testing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmvol_fuzz::ext4::free_map(data));
