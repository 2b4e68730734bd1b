//! Write ordering under the engine: the dirty bit and the few flushes that
//! make a power loss safe.
//!
//! imago keeps L2 and refcount updates in caches and writes new L2 tables,
//! L1 entries and header fields directly, without flushing between them. We
//! sit between imago and the file ([`super::storage::HStore`] calls the hooks
//! below) and add:
//!
//! * **the dirty bit** (incompatible feature bit 0), written and made durable
//!   before the first write of a session: refcounts on disk may then lag
//!   behind, and the next read-write open rebuilds them (QEMU does the same
//!   with lazy refcounts, so such images stay interoperable). A clean close
//!   clears it.
//! * **table before pointer**: before a write to the header or to the active
//!   L1 table, everything written so far is made durable (a new L2 table or L1
//!   table must never be pointed at before its content is on disk); after a
//!   header write it is made durable too (the old L1 table may be reused
//!   once imago frees it).
//! * **data before mapping**: before a write to a known L2 table, data written
//!   since the last flush is made durable (copy-on-write and zero-fill parts
//!   of a new cluster must not read as stale bytes once the L2 entry is on
//!   disk).
//!
//! Refcount blocks need no ordering: a dirty image's refcounts are rebuilt.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::header::Qcow2Header;
use super::spec::{be32, be64, INCOMPAT_DIRTY, INCOMPAT_LOW_BYTE, L1E_OFFSET_MASK};
use super::tables::decode_table;
use crate::host::read_upto;

/// Where the active L1 table is, and which clusters are L2 tables.
#[derive(Debug)]
struct Layout {
    l1_offset: u64,
    l1_bytes: u64,
    l2: HashSet<u64>,
}

/// One event seen below the engine, for the power-loss tests.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// A completed fdatasync: everything before it is durable.
    Sync,
}

/// The ordering state of one writable qcow2 file.
#[derive(Debug)]
pub(crate) struct Ordered {
    file: File,
    cs: u64,
    /// The dirty bit is set on disk (durably) by this handle.
    marked: AtomicBool,
    /// Serialises marking and layout updates.
    layout: Mutex<Layout>,
    /// Completed writes of any kind, and of data, counted; and the write
    /// count the last started flush covered.
    writes: AtomicU64,
    data_writes: AtomicU64,
    synced: AtomicU64,
    synced_data: AtomicU64,
    /// Number of flushes we issued ourselves (for the performance notes).
    pub(crate) barriers: AtomicU64,
    /// Every write and flush, when a power-loss test asks for it.
    #[cfg(test)]
    pub(crate) log: std::sync::OnceLock<std::sync::Arc<Mutex<Vec<Event>>>>,
}

impl Ordered {
    /// Ordering for `file` (the top image, opened read-write, whose header
    /// is `h`): reads the L1 table to learn where the L2 tables are.
    pub(crate) fn new(file: &File, h: &Qcow2Header) -> std::io::Result<Ordered> {
        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut l1 = vec![0u8; l1_bytes as usize];
        let got = read_upto(file, &mut l1, h.l1_table_offset)?;
        l1.truncate(got);
        let l2 = decode_table(&l1)
            .into_iter()
            .map(|e| e & L1E_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        Ok(Ordered {
            file: file.try_clone()?,
            cs: h.cluster_size(),
            marked: AtomicBool::new(false),
            layout: Mutex::new(Layout {
                l1_offset: h.l1_table_offset,
                l1_bytes,
                l2,
            }),
            writes: AtomicU64::new(0),
            data_writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            synced_data: AtomicU64::new(0),
            barriers: AtomicU64::new(0),
            #[cfg(test)]
            log: std::sync::OnceLock::new(),
        })
    }

    fn layout(&self) -> std::sync::MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// fdatasync, remembering what it covered.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        let w = self.writes.load(Ordering::SeqCst);
        let d = self.data_writes.load(Ordering::SeqCst);
        self.file.sync_data()?;
        self.synced.fetch_max(w, Ordering::SeqCst);
        self.synced_data.fetch_max(d, Ordering::SeqCst);
        #[cfg(test)]
        self.record(Event::Sync);
        Ok(())
    }

    fn barrier(&self) -> std::io::Result<()> {
        self.barriers.fetch_add(1, Ordering::Relaxed);
        self.sync()
    }

    #[cfg(test)]
    fn record(&self, e: Event) {
        if let Some(log) = self.log.get() {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        }
    }

    /// Whether this handle set the dirty bit.
    pub(crate) fn is_marked(&self) -> bool {
        self.marked.load(Ordering::SeqCst)
    }

    /// Set the dirty bit durably, once per session, before anything else
    /// is written.
    fn mark(&self) -> std::io::Result<()> {
        if self.marked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _l = self.layout();
        if self.marked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut b = [0u8; 1];
        self.file.read_exact_at(&mut b, INCOMPAT_LOW_BYTE)?;
        b[0] |= INCOMPAT_DIRTY as u8;
        self.file.write_all_at(&b, INCOMPAT_LOW_BYTE)?;
        #[cfg(test)]
        self.record(Event::Write(INCOMPAT_LOW_BYTE, b.to_vec()));
        self.barrier()?;
        self.marked.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Clear the dirty bit after everything was flushed (a clean close).
    pub(crate) fn unmark(&self) -> std::io::Result<()> {
        if !self.marked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _l = self.layout();
        self.sync()?;
        let mut b = [0u8; 1];
        self.file.read_exact_at(&mut b, INCOMPAT_LOW_BYTE)?;
        b[0] &= !(INCOMPAT_DIRTY as u8);
        self.file.write_all_at(&b, INCOMPAT_LOW_BYTE)?;
        #[cfg(test)]
        self.record(Event::Write(INCOMPAT_LOW_BYTE, b.to_vec()));
        self.sync()?;
        self.marked.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether [`Ordered::after_write`] needs the bytes of a write at
    /// `offset` (header and L1 writes; every write when tests record them),
    /// so that plain data writes go through without a copy.
    pub(crate) fn wants_bytes(&self, offset: u64, len: u64) -> bool {
        if cfg!(test) || offset < 72 {
            return true;
        }
        let l = self.layout();
        offset < l.l1_offset + l.l1_bytes && offset.saturating_add(len) > l.l1_offset
    }

    /// Before imago writes, zeroes or discards `len` bytes at `offset`.
    pub(crate) fn before_write(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mark()?;
        let end = offset.saturating_add(len);
        let (pointer, l2) = {
            let l = self.layout();
            let pointer = offset < self.cs.min(72)
                || (offset < l.l1_offset + l.l1_bytes && end > l.l1_offset);
            (pointer, l.l2.contains(&(offset - offset % self.cs)))
        };
        if pointer {
            if self.writes.load(Ordering::SeqCst) > self.synced.load(Ordering::SeqCst) {
                self.barrier()?;
            }
        } else if l2
            && self.data_writes.load(Ordering::SeqCst) > self.synced_data.load(Ordering::SeqCst)
        {
            self.barrier()?;
        }
        Ok(())
    }

    /// After imago wrote `buf` at `offset` (None: zeroes, a discard, or data
    /// whose bytes [`Ordered::wants_bytes`] did not ask for; `len` bytes).
    pub(crate) fn after_write(
        &self,
        offset: u64,
        buf: Option<&[u8]>,
        len: u64,
    ) -> std::io::Result<()> {
        #[cfg(test)]
        self.record(Event::Write(
            offset,
            buf.map_or_else(|| vec![0u8; len as usize], <[u8]>::to_vec),
        ));
        let end = offset.saturating_add(len);
        let mut header = false;
        let mut meta = false;
        {
            let mut l = self.layout();
            if offset < 72 {
                header = true;
                meta = true;
                // imago writes the 72-byte v2 header part: the L1 table may have moved.
                if let Some(b) = buf.filter(|b| offset == 0 && b.len() >= 48) {
                    l.l1_bytes = u64::from(be32(b, 36)) * 8;
                    l.l1_offset = be64(b, 40);
                }
            } else if offset < l.l1_offset + l.l1_bytes && end > l.l1_offset {
                meta = true;
                if let Some(b) = buf {
                    // L1 entries (8-byte aligned): remember the L2 tables.
                    let skip = (l.l1_offset.saturating_sub(offset)) as usize;
                    let first = offset.max(l.l1_offset);
                    let lead = ((8 - (first - l.l1_offset) % 8) % 8) as usize;
                    for c in b.get(skip + lead..).unwrap_or_default().chunks_exact(8) {
                        let o = be64(c, 0) & L1E_OFFSET_MASK;
                        if o != 0 {
                            l.l2.insert(o);
                        }
                    }
                }
            } else if l.l2.contains(&(offset - offset % self.cs)) {
                meta = true;
            }
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        if !meta {
            self.data_writes.fetch_add(1, Ordering::SeqCst);
        }
        if header {
            self.barrier()?;
        }
        Ok(())
    }
}
