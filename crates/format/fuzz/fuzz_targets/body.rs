//! The fuzz body: write the bytes to a file, open it as qcow2 (and as raw) and
//! read, map and describe it. Must never panic whatever the bytes are; errors
//! are fine.

use std::path::PathBuf;

use vmvol_format::{info, BlockIo, Format, Image, OpenOptions};

/// Open `data` as an image file and exercise the read paths.
pub fn open_and_read(data: &[u8]) {
    let path = scratch_path();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for (format, read_only) in [
        (Format::Qcow2, true),
        (Format::Qcow2, false),
        (Format::Raw, true),
    ] {
        let opts = OpenOptions::new().format(format).read_only(read_only);
        let _ = info(&path, &opts);
        let Ok(img) = Image::open(&path, &opts) else {
            continue;
        };
        let size = img.size();
        // Read the start, a middle window and the end; map the first GiB.
        let mut buf = vec![0u8; 128 << 10];
        for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
        }
        let _ = img.map(0, size.min(1 << 30));
        let _ = img.known_zero(0, size.min(1 << 20));
        if !read_only {
            // Writes on a hostile image must fail cleanly or succeed, never panic.
            let _ = img.write_at(&[0x5a; 4096], size / 3);
            let _ = img.write_zeroes(0, size.min(8192));
            let _ = img.discard(0, size.min(65536));
            let _ = img.flush();
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// A per-process, per-thread scratch file.
fn scratch_path() -> PathBuf {
    std::env::temp_dir().join(format!(
        "vmvol-fuzz-{}-{:?}.img",
        std::process::id(),
        std::thread::current().id()
    ))
}
