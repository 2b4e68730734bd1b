//! ext4 free-map body: the input is the start of a filesystem image on a
//! fixed-size device (the rest reads as zeros).

use crate::memdev::MemDev;

/// Device size: seeds are 1–8 MiB filesystems; a bigger declared size
/// than the device is one of the things the reader must refuse.
pub const DEVICE_BYTES: u64 = 8 << 20;

/// Computes the free map of the input; also streams it through `scan_free`
/// with a visitor that stops early, as the compaction caller may.
pub fn free_map(data: &[u8]) {
    let dev = MemDev::new(DEVICE_BYTES, data, true);
    let r = vmvol_fs::free_map(&dev);
    if std::env::var_os("VMVOL_FUZZ_DEBUG").is_some() {
        eprintln!(
            "free_map: {:?}",
            r.as_ref().map(|m| (m.free_bytes, m.ranges.len()))
        );
    }
    if let Ok(map) = r {
        for r in map.ranges.iter().take(64) {
            let _ = map.is_free(r.offset, r.len);
        }
        let _ = map.ranges.last().map(|r| r.end());
    }
    let mut n = 0u32;
    let _ = vmvol_fs::scan_free(&dev, &mut |_r| {
        n += 1;
        if n > 3 {
            Err(vmvol_fs::Error::InvalidArgument {
                reason: "stop".to_string(),
            })
        } else {
            Ok(())
        }
    });
}
