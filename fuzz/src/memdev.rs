//! An in-memory block device for the fs targets: no file system round trip
//! per execution. Bytes past the input read as zeros, so seeds can drop an
//! image's trailing zeros.

use std::sync::Mutex;

use vmvol_format::{BlockIo, Error, Result};

/// A fixed-size device backed by a growable buffer (unwritten tail = zeros).
pub struct MemDev {
    size: u64,
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemDev {
    /// A device of `size` bytes whose first bytes are `init`.
    pub fn new(size: u64, init: &[u8], read_only: bool) -> MemDev {
        let keep = init.len().min(size as usize);
        MemDev {
            size,
            data: Mutex::new(init[..keep].to_vec()),
            read_only,
        }
    }

    fn range(&self, offset: u64, len: usize, op: &'static str) -> Result<(usize, usize)> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok((offset as usize, end as usize)),
            _ => Err(Error::io(
                "memdev",
                op,
                std::io::Error::from_raw_os_error(libc_einval()),
            )),
        }
    }

    fn write_with(
        &self,
        offset: u64,
        len: u64,
        op: &'static str,
        f: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::io(
                "memdev",
                op,
                std::io::Error::from_raw_os_error(30),
            ));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let (s, e) = self.range(offset, len, op)?;
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() < e {
            d.resize(e, 0);
        }
        f(&mut d[s..e]);
        Ok(())
    }
}

/// EINVAL without a libc dependency.
fn libc_einval() -> i32 {
    22
}

impl BlockIo for MemDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (s, e) = self.range(offset, buf.len(), "read")?;
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        buf.fill(0);
        if s < d.len() {
            let have = e.min(d.len());
            buf[..have - s].copy_from_slice(&d[s..have]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_with(offset, buf.len() as u64, "write", |d| {
            d.copy_from_slice(buf)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.write_with(offset, len, "write zeroes", |d| d.fill(0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_with(offset, len, "discard", |d| d.fill(0))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
