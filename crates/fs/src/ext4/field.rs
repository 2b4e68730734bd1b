//! Little-endian (and the journal's big-endian) field access on metadata
//! buffers. A field that does not fit in the buffer reads as zero and is not
//! written: offsets are constants from this module's siblings, so that never
//! happens, but it keeps every access free of panicking indexing.

/// Read the `u16` at `off`.
pub(crate) fn get16(buf: &[u8], off: usize) -> u16 {
    buf.get(off..off.saturating_add(2))
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}

/// Read the `u32` at `off`.
pub(crate) fn get32(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off.saturating_add(4))
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// Read the byte at `off`.
pub(crate) fn get8(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

/// Write the byte `v` at `off`.
pub(crate) fn put8(buf: &mut [u8], off: usize, v: u8) {
    if let Some(b) = buf.get_mut(off) {
        *b = v;
    }
}

/// Write `v` at `off`.
pub(crate) fn put16(buf: &mut [u8], off: usize, v: u16) {
    put_bytes(buf, off, &v.to_le_bytes());
}

/// Write `v` at `off`.
pub(crate) fn put32(buf: &mut [u8], off: usize, v: u32) {
    put_bytes(buf, off, &v.to_le_bytes());
}

/// Write `v` big-endian at `off` (jbd2 structures are big-endian).
pub(crate) fn put32be(buf: &mut [u8], off: usize, v: u32) {
    put_bytes(buf, off, &v.to_be_bytes());
}

/// Copy `v` to `off`.
pub(crate) fn put_bytes(buf: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = buf.get_mut(off..off.saturating_add(v.len())) {
        s.copy_from_slice(v);
    }
}
