//! Seed helper for `fuzz/make-corpus.sh` (built without fuzzing flags):
//!
//! - `seedgen sparse IN OUT`: write image IN in the qcow2 targets' sparse
//!   input form (only non-zero 512-byte runs), or as-is if that is smaller.
//! - `seedgen trim IN OUT MAX`: IN without its trailing zeros, at most MAX
//!   bytes (the fs targets read the rest of the device as zeros).
//! - `seedgen mkfs OUT SIZE BLOCK JOURNAL`: an ext4 image made by our own
//!   mkfs (`JOURNAL` = `none` or `default`).
//! - `seedgen pool DIR`: pool-record seeds from a pool built through the API.

use std::io::Write;

use vmvol_fuzz::memdev::MemDev;
use vmvol_fuzz::qcow2::SPARSE_MAGIC;

type R = Result<(), Box<dyn std::error::Error>>;

fn main() -> R {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("sparse") if a.len() == 4 => sparse(&a[2], &a[3]),
        Some("trim") if a.len() == 5 => {
            let b = std::fs::read(&a[2])?;
            let end = b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
            let max: usize = a[4].parse()?;
            std::fs::write(&a[3], &b[..end.min(max)])?;
            Ok(())
        }
        Some("mkfs") if a.len() == 6 => mkfs(&a[2], a[3].parse()?, a[4].parse()?, &a[5]),
        Some("pool") if a.len() == 3 => {
            std::fs::create_dir_all(&a[2])?;
            for (name, bytes) in vmvol_fuzz::pool::seeds() {
                std::fs::write(std::path::Path::new(&a[2]).join(name), bytes)?;
            }
            Ok(())
        }
        _ => Err("usage: seedgen sparse IN OUT | trim IN OUT MAX | mkfs OUT SIZE BLOCK none|default | pool DIR".into()),
    }
}

fn sparse(input: &str, out: &str) -> R {
    let b = std::fs::read(input)?;
    let mut v = SPARSE_MAGIC.to_vec();
    let mut i = 0;
    while i < b.len() {
        let blk = |i: usize| &b[i..(i + 512).min(b.len())];
        if blk(i).iter().all(|&x| x == 0) {
            i += 512;
            continue;
        }
        let start = i;
        while i < b.len() && blk(i).iter().any(|&x| x != 0) {
            i += 512;
        }
        let end = i.min(b.len());
        v.extend_from_slice(&(start as u64).to_le_bytes());
        v.extend_from_slice(&((end - start) as u32).to_le_bytes());
        v.extend_from_slice(&b[start..end]);
    }
    // Trailing partial record: the file length.
    v.extend_from_slice(&(b.len() as u64).to_le_bytes());
    let mut f = std::fs::File::create(out)?;
    f.write_all(if v.len() < b.len() { &v } else { &b })?;
    Ok(())
}

fn mkfs(out: &str, size: u64, block: u32, journal: &str) -> R {
    let dev = MemDev::new(size, &[], false);
    let opts = vmvol_fs::MkfsOptions {
        block_size: block,
        journal: if journal == "none" {
            vmvol_fs::Journal::None
        } else {
            vmvol_fs::Journal::Default
        },
        timestamp: Some(0),
        ..vmvol_fs::MkfsOptions::default()
    };
    vmvol_fs::mkfs(&dev, &opts)?;
    let mut buf = vec![0u8; size as usize];
    vmvol_format::BlockIo::read_at(&dev, &mut buf, 0)?;
    std::fs::write(out, buf)?;
    Ok(())
}
