//! Open finding F1 (docs/testing.md): `write_zeroes` on a qcow2 image whose
//! virtual size is smaller than one cluster, with data after the zeroed
//! range. With overflow checks (fuzz builds, `cargo test`) imago panics
//! (`access.rs:607` subtract with overflow); this program shows what a
//! release build does with the same call.
//!
//!   cargo run --release --example repro_zero_small --target-dir target/seedgen

use vmvol_format::{BlockIo, Format, Image, OpenOptions, Qcow2CreateOptions, Qcow2Image};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("vmvol-f1-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("small.qcow2");
    // 40 KiB virtual, 64 KiB clusters: the image is less than one cluster.
    Qcow2Image::create(&p, &Qcow2CreateOptions::new(40 << 10))?;
    let img = Image::open(&p, &OpenOptions::new().format(Format::Qcow2))?;
    img.write_at(&[0xaa; 4096], 20 << 10)?;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| img.write_zeroes(0, 8192)));
    println!("write_zeroes(0, 8192): {r:?}");
    let mut back = vec![0u8; 4096];
    img.read_at(&mut back, 20 << 10)?;
    let kept = back.iter().all(|&b| b == 0xaa);
    println!(
        "data at 20 KiB after zeroing [0, 8 KiB): {}",
        if kept { "kept" } else { "LOST" }
    );
    drop(img);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
