//! cargo-fuzz target: open an image made of arbitrary bytes and read it.
//!
//! Run with `cargo +nightly fuzz run open_read` from `crates/format`. The body
//! is a plain function shared with the stable test `tests/a_fuzz.rs`, which
//! drives it with proptest-generated inputs.
#![no_main]

mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    body::open_and_read(data);
});
