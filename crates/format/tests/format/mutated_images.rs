//! The cargo-fuzz body (`fuzz/src/qcow2.rs`) on stable Rust: proptest
//! feeds it mutated valid images (our own, qemu-compressed, snapshotted) and
//! plain random bytes. Any panic fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::fuzz_body as body;

use std::sync::OnceLock;

use crate::support::*;
use proptest::prelude::*;
use vmvol_format::{BlockIo, OpenOptions, Qcow2CreateOptions, Qcow2Image};

/// Valid seed images, built once.
fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        for cs in [512u64, 4096, 65536] {
            let p = dir.path().join(format!("s{cs}.qcow2"));
            Qcow2Image::create(&p, &Qcow2CreateOptions::new(2 << 20).cluster_size(cs)).unwrap();
            let img = Qcow2Image::open(&p, &OpenOptions::new()).unwrap();
            img.write_at(&pattern(cs, 150_000), 1000).unwrap();
            img.write_zeroes(500_000, 70_000).unwrap();
            drop(img);
            out.push(std::fs::read(&p).unwrap());
        }
        if require_tool("qemu-img") {
            let src = dir.path().join("src.qcow2");
            let c = dir.path().join("c.qcow2");
            std::fs::write(dir.path().join("r.raw"), pattern(3, 300_000)).unwrap();
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                dir.path().join("r.raw").to_str().unwrap(),
                src.to_str().unwrap(),
            ]);
            qemu_img(&["snapshot", "-c", "s1", src.to_str().unwrap()]);
            out.push(std::fs::read(&src).unwrap());
            qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                src.to_str().unwrap(),
                c.to_str().unwrap(),
            ]);
            out.push(std::fs::read(&c).unwrap());
            let z = dir.path().join("z.qcow2");
            qemu_img(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096,compression_type=zstd",
                src.to_str().unwrap(),
                z.to_str().unwrap(),
            ]);
            out.push(std::fs::read(&z).unwrap());
        }
        out
    })
}

/// 256 cases in the suite; `VMVOL_FUZZ_CASES=100000` for a long fuzzing run.
fn cases() -> u32 {
    std::env::var("VMVOL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[derive(Debug, Clone)]
enum Mutation {
    Byte { pos: u64, xor: u8 },
    Field { pos: u64, value: u64 },
    Truncate { at: u64 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Mostly within the header cluster and the first metadata clusters.
    let pos = prop_oneof![3 => 0u64..512, 2 => 0u64..8192, 1 => 0u64..1_000_000];
    let value = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(1 << 63),
        Just(0x7fff_ffff),
        Just(512),
        Just(65536),
        any::<u64>(),
    ];
    prop_oneof![
        6 => (pos.clone(), 1u8..=255).prop_map(|(pos, xor)| Mutation::Byte { pos, xor }),
        3 => (pos.clone(), value).prop_map(|(pos, value)| Mutation::Field { pos: pos & !3, value }),
        1 => pos.prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(mut img: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = img.len() as u64;
        if len == 0 {
            break;
        }
        match *m {
            Mutation::Byte { pos, xor } => img[(pos % len) as usize] ^= xor,
            Mutation::Field { pos, value } => {
                let p = (pos % len) as usize;
                let b = value.to_be_bytes();
                let n = b.len().min(img.len() - p);
                // Write 4 or 8 bytes: header fields are both widths.
                let w = if value >> 32 == 0 { 4.min(n) } else { n };
                let src = if w == 4 { &b[4..] } else { &b[..w] };
                img[p..p + w].copy_from_slice(&src[..w]);
            }
            Mutation::Truncate { at } => img.truncate((at % len) as usize),
        }
    }
    img
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn mutated_images_never_panic(
        seed in 0usize..16,
        muts in prop::collection::vec(mutation(), 1..12),
    ) {
        let seeds = seeds();
        let img = apply(seeds[seed % seeds.len()].clone(), &muts);
        dump(&img);
        body::open_and_read(&img);
    }

    #[test]
    fn random_bytes_never_panic(
        head in prop::collection::vec(any::<u8>(), 0..2048),
        magic in any::<bool>(),
    ) {
        let mut img = head;
        if magic && img.len() >= 8 {
            img[..4].copy_from_slice(b"QFI\xfb");
            img[4..8].copy_from_slice(&3u32.to_be_bytes());
        }
        dump(&img);
        body::open_and_read(&img);
    }
}

/// With `VMVOL_FUZZ_DUMP=path`, keep each input there first, so an input that
/// aborts the process (stack overflow) can be found and replayed.
fn dump(img: &[u8]) {
    if let Some(p) = std::env::var_os("VMVOL_FUZZ_DUMP") {
        std::fs::write(p, img).unwrap();
    }
}

/// `VMVOL_FUZZ_REPLAY=path` replays one saved input (does nothing otherwise).
#[test]
fn replay() {
    if let Some(p) = std::env::var_os("VMVOL_FUZZ_REPLAY") {
        body::open_and_read(&std::fs::read(p).unwrap());
    }
}
