//! Block and inode bitmaps: one bit per block (cluster) or inode, bit `i` of
//! byte `i / 8` at position `i % 8`, set = in use.

/// Set bits `from..to` of `bitmap` (bits past its end are ignored).
pub(crate) fn set_bits(bitmap: &mut [u8], from: u64, to: u64) {
    let mut bit = from;
    while bit < to {
        let Ok(byte) = usize::try_from(bit / 8) else {
            return;
        };
        let Some(b) = bitmap.get_mut(byte) else {
            return;
        };
        if bit.is_multiple_of(8) && to - bit >= 8 {
            *b = 0xFF;
            bit += 8;
        } else {
            *b |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

/// Call `f(first, count)` for each run of clear bits among the first `nbits`
/// bits of `bitmap` (bits past its end count as set).
pub(crate) fn for_each_clear_run<E>(
    bitmap: &[u8],
    nbits: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut run_start: Option<u64> = None;
    let mut bit = 0u64;
    while bit < nbits {
        let byte_idx = (bit / 8) as usize;
        // Fast path over whole 64-bit words that are all used or all free.
        if bit.is_multiple_of(64) && nbits - bit >= 64 {
            if let Some(word) = bitmap
                .get(byte_idx..byte_idx + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_le_bytes)
            {
                if word == u64::MAX {
                    if let Some(s) = run_start.take() {
                        f(s, bit - s)?;
                    }
                    bit += 64;
                    continue;
                }
                if word == 0 {
                    run_start.get_or_insert(bit);
                    bit += 64;
                    continue;
                }
            }
        }
        let used = bitmap
            .get(byte_idx)
            .is_none_or(|b| b & (1 << (bit % 8)) != 0);
        if used {
            if let Some(s) = run_start.take() {
                f(s, bit - s)?;
            }
        } else {
            run_start.get_or_insert(bit);
        }
        bit += 1;
    }
    if let Some(s) = run_start {
        f(s, nbits - s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_partial_and_whole_bytes() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 3, 21);
        assert_eq!(b, vec![0xF8, 0xFF, 0x1F, 0]);
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 0, 32);
        assert_eq!(b, vec![0xFF; 4]);
        // Past the end: ignored, no panic.
        set_bits(&mut b, 30, 1000);
    }

    #[test]
    fn clear_runs() {
        let mut bm = vec![0u8; 32];
        set_bits(&mut bm, 0, 3);
        set_bits(&mut bm, 70, 200);
        let mut runs = Vec::new();
        for_each_clear_run(&bm, 250, |s, n| {
            runs.push((s, n));
            Ok::<(), ()>(())
        })
        .unwrap_or(());
        assert_eq!(runs, vec![(3, 67), (200, 50)]);
    }
}
