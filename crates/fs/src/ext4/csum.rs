//! The two checksums ext4 metadata carries: CRC32C (`metadata_csum`) and the
//! older CRC16 of `uninit_bg`/`gdt_csum` group descriptors.

/// ext4's `ext4_chksum`: CRC32C continued from `seed`, without the final
/// inversion the `crc32c` crate applies. Seeding with `!0` starts a fresh
/// checksum; the filesystem seed is `crc32c(!0, uuid)` (or `s_checksum_seed`).
pub(crate) fn crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The kernel's `crc16` (polynomial 0x8005 reflected, no inversions), used by
/// the older `uninit_bg`/`gdt_csum` descriptor checksum.
pub(crate) fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &byte in data {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Checksum seed of a `metadata_csum` filesystem without `csum_seed`.
pub(crate) fn fs_seed(uuid: &[u8]) -> u32 {
    crc32c(!0, uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_kernel_check_value() {
        // CRC-16/ARC of "123456789" is 0xBB3D with init 0; the kernel's crc16
        // is the same algorithm.
        assert_eq!(crc16(0, b"123456789"), 0xBB3D);
    }

    #[test]
    fn crc32c_is_raw_crc32c() {
        // Standard CRC-32C of "123456789" is 0xE3069283; ext4 omits the final
        // inversion when seeded with !0.
        assert_eq!(crc32c(!0, b"123456789"), !0xE306_9283);
        // Continuation equals one pass.
        let one = crc32c(7, b"hello world");
        let two = crc32c(crc32c(7, b"hello "), b"world");
        assert_eq!(one, two);
    }
}
