//! A read-side cache of a qcow2 image's data-cluster mappings, with lock-free lookups.
//!
//! Resolving a guest offset through imago (L1 lock, a hashed LRU lookup of the
//! L2 table, entry decoding) adds some 150 ns to every read, a fifth of a
//! 4 KiB `pread` from the page cache. A VMM keeps the guest-to-host mapping of
//! hot clusters at hand instead; this is that cache, for the top layer only.
//!
//! What it may hold: data clusters whose mapping only operations covered by
//! [`MapCache::change`] can change. For a writable image those are the
//! COPIED data clusters (refcount 1): writes go to them in place (imago's
//! copy-on-write allocates only for unallocated, zero, compressed and shared
//! clusters), and only write-zeroes and discard change their L2 entries.
//! In a read-only handle nothing changes any mapping.
//!
//! Coherence is a sequence lock. An operation that may change mappings holds
//! a [`Change`] while it works: taking it marks the cache busy and bumps an
//! epoch; dropping it clears the slots of its range, bumps the epoch again
//! and ends the busy state. Readers:
//! - a hit: take the epoch (none while busy), look the slot up, read the data
//!   from the host file, and accept the data only if the epoch is unchanged;
//!   otherwise read through imago. So data is only used if no change began
//!   between the look-up and the end of the read, and no change was under
//!   way at the look-up; any change that ended before had cleared the slot.
//!   Even a freed and reused host cluster cannot leak into the result.
//! - a miss: take the epoch, ask imago, and insert the answer only if the
//!   epoch is still the same, checked under the mutex that changes take to
//!   begin and end. An answer from before a change therefore is never stored
//!   after the change began, and one stored before is cleared at its end.
//!
//! A hit thus needs no lock at all: three atomic loads (plain loads on x86)
//! around the `pread`.
//!
//! Layout: a direct-mapped table of 64-bit words indexed by the low bits of the
//! guest cluster number; each word packs a valid bit, the rest of the guest
//! cluster number (the tag) and the host cluster number, so a lookup is a
//! single atomic load. Mappings whose numbers do not fit are simply not
//! cached.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

/// At most 2^15 slots (256 KiB per open image).
const MAX_SLOT_BITS: u32 = 15;
const VALID: u64 = 1 << 63;

/// Guest cluster to host cluster cache; see the module documentation.
#[derive(Debug)]
pub(crate) struct MapCache {
    slots: Box<[AtomicU64]>,
    slot_bits: u32,
    cluster_bits: u32,
    /// Bits of the host cluster number; the tag takes bits `host_bits..63`.
    host_bits: u32,
    /// Bumped when a change begins and when it ends.
    epoch: AtomicU64,
    /// Changes under way.
    busy: AtomicU64,
    /// Held while inserting and while invalidating (see the module docs).
    update: Mutex<()>,
}

impl MapCache {
    /// A cache for an image of `virtual_size` bytes with `2^cluster_bits`
    /// byte clusters.
    pub fn new(virtual_size: u64, cluster_bits: u32) -> MapCache {
        // Bits needed to number every guest cluster.
        let last = virtual_size.saturating_sub(1) >> cluster_bits;
        let guest_bits = u64::BITS - last.leading_zeros();
        let slot_bits = guest_bits.min(MAX_SLOT_BITS);
        let tag_bits = guest_bits - slot_bits;
        let slots = (0..1usize << slot_bits)
            .map(|_| AtomicU64::new(0))
            .collect();
        MapCache {
            slots,
            slot_bits,
            cluster_bits,
            host_bits: 63u32.saturating_sub(tag_bits),
            epoch: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            update: Mutex::new(()),
        }
    }

    /// The slot for guest cluster number `cluster`, and the word that would
    /// map it to host cluster number `host` (None if they do not fit).
    fn word(&self, cluster: u64, host: u64) -> Option<(&AtomicU64, u64)> {
        let slot = self
            .slots
            .get((cluster & ((1 << self.slot_bits) - 1)) as usize)?;
        let tag = cluster >> self.slot_bits;
        if tag >> (63 - self.host_bits) != 0 || host >> self.host_bits != 0 {
            return None;
        }
        Some((slot, VALID | tag << self.host_bits | host))
    }

    /// Host offset of the start of the cluster holding guest offset `guest`, if cached.
    #[inline]
    pub fn get(&self, guest: u64) -> Option<u64> {
        let cluster = guest >> self.cluster_bits;
        let (slot, want) = self.word(cluster, 0)?;
        let w = slot.load(SeqCst);
        let host_mask = (1u64 << self.host_bits) - 1;
        // Valid and the same tag (`want` has host number 0).
        (w & !host_mask == want).then_some((w & host_mask) << self.cluster_bits)
    }

    /// The epoch to validate a hit or an insert with; None while a change is
    /// under way (the cache must not be used then).
    #[inline]
    pub fn epoch(&self) -> Option<u64> {
        let e = self.epoch.load(SeqCst);
        (self.busy.load(SeqCst) == 0).then_some(e)
    }

    /// Whether no change began (or ended) since [`MapCache::epoch`] returned `epoch`.
    #[inline]
    pub fn unchanged(&self, epoch: u64) -> bool {
        self.epoch.load(SeqCst) == epoch
    }

    /// Remember that the guest cluster holding offset `guest` starts at host
    /// offset `host`, as looked up after [`MapCache::epoch`] returned `epoch`.
    pub fn insert(&self, guest: u64, host: u64, epoch: u64) {
        if host & ((1 << self.cluster_bits) - 1) != 0 {
            return;
        }
        let Some((slot, w)) = self.word(guest >> self.cluster_bits, host >> self.cluster_bits)
        else {
            return;
        };
        let _guard = self.lock();
        if self.epoch.load(SeqCst) == epoch {
            slot.store(w, SeqCst);
        }
    }

    /// Begin an operation that may change the mappings of guest range
    /// `offset..offset + len`; the cache is bypassed until the returned
    /// guard is dropped, which forgets the range.
    pub fn change(&self, offset: u64, len: u64) -> Change<'_> {
        let _guard = self.lock();
        self.busy.fetch_add(1, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
        Change {
            cache: self,
            offset,
            len,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is the slots and the epoch; `()` carries no state
        // a panic could have torn.
        self.update.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        let mask = (1u64 << self.slot_bits) - 1;
        if last - first >= mask {
            for s in self.slots.iter() {
                s.store(0, SeqCst);
            }
        } else {
            for c in first..=last {
                if let Some(s) = self.slots.get((c & mask) as usize) {
                    s.store(0, SeqCst);
                }
            }
        }
    }
}

/// An operation changing mappings, under way; see [`MapCache::change`].
#[must_use = "the change ends when this is dropped"]
pub(crate) struct Change<'a> {
    cache: &'a MapCache,
    offset: u64,
    len: u64,
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        let c = self.cache;
        let _guard = c.lock();
        c.forget(self.offset, self.len);
        c.epoch.fetch_add(1, SeqCst);
        c.busy.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn hit_miss_and_tags() {
        // 1 GiB, 64 KiB clusters: one slot per cluster, no tag.
        let c = MapCache::new(1 << 30, 16);
        assert_eq!(c.slots.len(), 1 << 14);
        let e = c.epoch().unwrap();
        c.insert(5 << 16 | 123, 9 << 16, e);
        assert_eq!(c.get(5 << 16), Some(9 << 16));
        assert_eq!(c.get((5 << 16) + 4095), Some(9 << 16));
        assert_eq!(c.get(6 << 16), None);
        // Unaligned host offsets are refused.
        c.insert(7 << 16, (9 << 16) + 512, e);
        assert_eq!(c.get(7 << 16), None);

        // 1 TiB: guest clusters share slots, told apart by the tag.
        let c = MapCache::new(1 << 40, 16);
        let e = c.epoch().unwrap();
        let a = 3u64 << 16;
        let b = a + (1 << (15 + 16)); // same slot, other tag
        c.insert(a, 1 << 16, e);
        assert_eq!(c.get(a), Some(1 << 16));
        assert_eq!(c.get(b), None);
        c.insert(b, 2 << 16, e);
        assert_eq!(c.get(a), None);
        assert_eq!(c.get(b), Some(2 << 16));
        // Past the size it was made for (a grown image): not cached.
        let far = 1u64 << 41;
        c.insert(far, 1 << 16, e);
        assert_eq!(c.get(far), None);
    }

    #[test]
    fn huge_images_and_tiny_clusters() {
        // 2^62 bytes with 512-byte clusters: 53 guest bits, 38 of them tag.
        let c = MapCache::new(1 << 62, 9);
        let e = c.epoch().unwrap();
        assert_eq!(c.host_bits, 25);
        let g = (1u64 << 62) - 512;
        c.insert(g, 1 << 20, e);
        assert_eq!(c.get(g), Some(1 << 20));
        assert_eq!(c.get(g - (1 << (15 + 9))), None);
        // Largest host cluster number that fits, and one that does not.
        let big = ((1u64 << 25) - 1) << 9;
        c.insert(0, big, e);
        assert_eq!(c.get(0), Some(big));
        c.insert(512, big + 512, e);
        assert_eq!(c.get(512), None);
        // Tiny image: one slot.
        let c = MapCache::new(512, 9);
        let e = c.epoch().unwrap();
        c.insert(0, 4096, e);
        assert_eq!(c.get(100), Some(4096));
    }

    #[test]
    fn invalidation() {
        let c = MapCache::new(1 << 30, 16);
        let e = c.epoch().unwrap();
        for i in 0..10u64 {
            c.insert(i << 16, (i + 100) << 16, e);
        }
        let ch = c.change((2 << 16) + 100, 1);
        assert_eq!(c.epoch(), None, "no use while a change is under way");
        // An insert based on a lookup from before the change is refused.
        c.insert(2 << 16, 102 << 16, e);
        assert!(!c.unchanged(e));
        drop(ch);
        assert_eq!(c.get(2 << 16), None);
        assert_eq!(c.get(1 << 16), Some(101 << 16));
        assert_eq!(c.get(3 << 16), Some(103 << 16));
        c.insert(2 << 16, 102 << 16, e);
        assert_eq!(c.get(2 << 16), None);
        // Whole-range changes clear everything.
        drop(c.change(0, 1 << 30));
        assert!((0..10u64).all(|i| c.get(i << 16).is_none()));
        let e = c.epoch().unwrap();
        c.insert(4 << 16, 7 << 16, e);
        assert_eq!(c.get(4 << 16), Some(7 << 16));
        drop(c.change(0, 0));
        assert_eq!(c.get(4 << 16), Some(7 << 16));
        assert!(!c.unchanged(e));
    }
}
