//! The integration tests of vmvol-format, in one binary (one link of imago,
//! zstd, flate2 and proptest), by subject. The hostile-input corpus is the
//! second binary (`tests/hostile.rs`): it counts allocations with its own
//! global allocator.
//!
//! Tests that need `qemu-img` or `qemu-io` skip, saying why, when the tool
//! is missing, and fail instead when `VMVOL_REQUIRE_TOOLS=1`
//! (see [`support::require_tool`]).

#[path = "format/support.rs"]
mod support;

/// The cargo-fuzz body, run on stable Rust by `mutated_images`.
#[path = "../../../fuzz/src/qcow2.rs"]
mod fuzz_body;

#[path = "format/check.rs"]
mod check;
#[path = "format/compact.rs"]
mod compact;
#[path = "format/convert.rs"]
mod convert;
#[path = "format/crash.rs"]
mod crash;
#[path = "format/crash_perf.rs"]
mod crash_perf;
#[path = "format/grow.rs"]
mod grow;
#[path = "format/info_map.rs"]
mod info_map;
#[path = "format/model.rs"]
mod model;
#[path = "format/mutated_images.rs"]
mod mutated_images;
#[path = "format/qemu_images.rs"]
mod qemu_images;
#[path = "format/temp_outputs.rs"]
mod temp_outputs;
#[path = "format/threads.rs"]
mod threads;
#[path = "format/writer.rs"]
mod writer;
