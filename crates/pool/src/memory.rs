//! An in-memory backend (feature `test-utils`): records, journal, a leased
//! lock with fencing, liveness, and images that are [`BlockIo`]s over
//! memory. It lives as long as its handles in one process, so it runs the
//! pool's behaviour tests (and the volume layer's) without a filesystem,
//! and shows what a backend with leases (like RBD's) must do.
//!
//! Test hooks: [`MemoryBackend::advance_clock`] moves the lease clock (the
//! exclusive lock is a lease of [`MemoryBackend::lease_ttl`]; once it
//! expires, writes carrying its guard are refused and another holder may
//! take the lock), [`MemoryBackend::set_space`] sets the space figures, and
//! [`MemoryBackend::put_raw_record`] stores arbitrary record bytes (damage).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use vmvol_format::{BlockIo, CompactOptions, CompactReport, Control, Format, Prealloc};

use crate::backend::{
    Change, ChangeJournal, ExclusiveGuard, FsStats, ImageStore, JournalCursor, JournalRead,
    Liveness, LivenessHold, PoolLock, RecordStore, Recovered, ReservationInfo, ScannedEntry,
    SharedGuard, SpaceFigures, StagingArea,
};
use crate::error::{Error, Result};
use crate::image::{AttachTarget, ImageOwner, ImageRef, ImageSpec, ImageSummary};
use crate::lock::Wait;
use crate::name::validate_name;
use crate::record::EntryKind;

/// Allocation unit of in-memory images.
const BLOCK: u64 = 64 << 10;

/// An image held in memory: sparse blocks over an optional base.
#[derive(Debug)]
pub struct MemImage {
    format: Format,
    backing: Option<(ImageRef, Arc<MemImage>)>,
    data: RwLock<MemData>,
}

#[derive(Debug, Default)]
struct MemData {
    size: u64,
    blocks: BTreeMap<u64, Vec<u8>>,
}

fn rlock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn wlock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl MemImage {
    fn new(size: u64, format: Format, backing: Option<(ImageRef, Arc<MemImage>)>) -> MemImage {
        MemImage {
            format,
            backing,
            data: RwLock::new(MemData {
                size,
                blocks: BTreeMap::new(),
            }),
        }
    }

    fn size(&self) -> u64 {
        rlock(&self.data).size
    }

    fn host_bytes(&self) -> u64 {
        (rlock(&self.data).blocks.len() as u64).saturating_mul(BLOCK)
    }

    /// Reads what the image shows at `offset` (own blocks, else the base,
    /// else zeros).
    fn read(&self, buf: &mut [u8], offset: u64) {
        let d = rlock(&self.data);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let bi = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match d.blocks.get(&bi) {
                Some(b) => out.copy_from_slice(&b[within..within + n]),
                None => match &self.backing {
                    Some((_, base)) if pos < base.size() => {
                        let m = ((base.size() - pos) as usize).min(n);
                        base.read(&mut out[..m], pos);
                        out[m..].fill(0);
                    }
                    _ => out.fill(0),
                },
            }
            done += n;
        }
    }

    fn write(&self, buf: &[u8], offset: u64) {
        let mut d = wlock(&self.data);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let bi = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            let block = d.blocks.entry(bi).or_insert_with(|| {
                // Copy on write: the block starts as what the base shows.
                let mut fresh = vec![0u8; BLOCK as usize];
                if let Some((_, base)) = &self.backing {
                    let start = bi * BLOCK;
                    if start < base.size() {
                        let m = ((base.size() - start) as usize).min(BLOCK as usize);
                        base.read(&mut fresh[..m], start);
                    }
                }
                fresh
            });
            block[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
    }

    /// Allocates every block (preallocation).
    fn fill(&self, ctl: &Control, what: &Path) -> vmvol_format::Result<()> {
        let size = self.size();
        let nblocks = size.div_ceil(BLOCK);
        for bi in 0..nblocks {
            ctl.check(what, "preallocate")?;
            wlock(&self.data)
                .blocks
                .entry(bi)
                .or_insert_with(|| vec![0u8; BLOCK as usize]);
            ctl.report((bi + 1).saturating_mul(BLOCK).min(size), size);
        }
        Ok(())
    }
}

/// An open handle on a [`MemImage`].
#[derive(Debug)]
struct MemHandle {
    image: Arc<MemImage>,
    name: PathBuf,
    writable: bool,
}

impl MemHandle {
    fn range(&self, op: &'static str, offset: u64, len: u64) -> vmvol_format::Result<()> {
        let size = self.image.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(vmvol_format::Error::OutOfRange {
                path: self.name.clone(),
                op,
                offset,
                len,
                size,
            });
        }
        if op != "read" && !self.writable {
            return Err(vmvol_format::Error::ReadOnly {
                path: self.name.clone(),
                op,
            });
        }
        Ok(())
    }
}

impl BlockIo for MemHandle {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vmvol_format::Result<()> {
        self.range("read", offset, buf.len() as u64)?;
        self.image.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> vmvol_format::Result<()> {
        self.range("write", offset, buf.len() as u64)?;
        self.image.write(buf, offset);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> vmvol_format::Result<()> {
        self.range("write zeroes", offset, len)?;
        let zeros = vec![0u8; BLOCK as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BLOCK);
            self.image.write(&zeros[..n as usize], offset + done);
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> vmvol_format::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn flush(&self) -> vmvol_format::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        !self.writable
    }
}

#[derive(Debug, Default)]
struct MemEntry {
    record: Option<Vec<u8>>,
    images: BTreeMap<String, Arc<MemImage>>,
}

#[derive(Debug)]
struct MemStaging {
    alive: Weak<()>,
    images: BTreeMap<String, Arc<MemImage>>,
}

#[derive(Debug, Default)]
struct LockState {
    readers: usize,
    /// Current exclusive tenure: token and lease expiry (clock time).
    writer: Option<(u64, Duration)>,
}

#[derive(Debug)]
struct State {
    config: Option<Vec<u8>>,
    journal: Vec<Change>,
    journal_epoch: u64,
    entries: [BTreeMap<String, MemEntry>; 3],
    staging: HashMap<uuid::Uuid, MemStaging>,
    reservations: HashMap<uuid::Uuid, (ReservationInfo, Weak<()>)>,
    space: FsStats,
}

#[derive(Debug)]
struct Shared {
    location: PathBuf,
    state: Mutex<State>,
    lock: Mutex<LockState>,
    lock_cv: Condvar,
    /// Test clock: time since creation, advanced only by the test.
    clock: Mutex<Duration>,
    next_token: Mutex<u64>,
    lease_ttl: Duration,
}

/// The in-memory backend. Clones share one pool.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    s: Arc<Shared>,
}

fn lk<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases the exclusive tenure `token` if it is still the current one
/// (a lapsed lease may already belong to someone else).
struct WriterHold {
    s: Arc<Shared>,
    token: u64,
}

impl Drop for WriterHold {
    fn drop(&mut self) {
        let mut l = lk(&self.s.lock);
        if matches!(l.writer, Some((t, _)) if t == self.token) {
            l.writer = None;
        }
        drop(l);
        self.s.lock_cv.notify_all();
    }
}

/// A held reservation: released (removed) when dropped.
struct ReservationHold {
    s: Arc<Shared>,
    id: uuid::Uuid,
    _token: Arc<()>,
}

impl Drop for ReservationHold {
    fn drop(&mut self) {
        lk(&self.s.state).reservations.remove(&self.id);
    }
}

struct ReaderHold {
    s: Arc<Shared>,
}

impl Drop for ReaderHold {
    fn drop(&mut self) {
        let mut l = lk(&self.s.lock);
        l.readers = l.readers.saturating_sub(1);
        drop(l);
        self.s.lock_cv.notify_all();
    }
}

impl MemoryBackend {
    /// A new pool in memory holding `config` (the bytes of its config
    /// record), with 1 TiB of space of which all is free and a 30 s lease.
    pub fn new(label: &str, config: &[u8]) -> MemoryBackend {
        MemoryBackend {
            s: Arc::new(Shared {
                location: PathBuf::from(format!("memory:{label}")),
                state: Mutex::new(State {
                    config: Some(config.to_vec()),
                    journal: Vec::new(),
                    journal_epoch: 1,
                    entries: Default::default(),
                    staging: HashMap::new(),
                    reservations: HashMap::new(),
                    space: FsStats {
                        total: 1 << 40,
                        available: 1 << 40,
                        block_size: BLOCK,
                    },
                }),
                lock: Mutex::new(LockState::default()),
                lock_cv: Condvar::new(),
                clock: Mutex::new(Duration::ZERO),
                next_token: Mutex::new(1),
                lease_ttl: Duration::from_secs(30),
            }),
        }
    }

    /// A new, inactive pool `name` in memory with the given policy (what
    /// [`Registry::define`](crate::Registry::define) makes on disk).
    pub fn define(
        name: &str,
        capacity: crate::CapacityPolicy,
        overcommit_ratio: f64,
    ) -> Result<MemoryBackend> {
        let label = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        let cfg = crate::PoolConfig::new(
            name,
            crate::BackendSpec::Memory {
                label: label.clone(),
            },
            capacity,
            overcommit_ratio,
        )?;
        let bytes = crate::Record::new(cfg).to_bytes(Path::new(&label))?;
        Ok(MemoryBackend::new(&label, &bytes))
    }

    /// How long an exclusive lease lasts on the test clock.
    pub fn lease_ttl(&self) -> Duration {
        self.s.lease_ttl
    }

    /// Moves the test clock forward (leases older than their ttl lapse).
    pub fn advance_clock(&self, by: Duration) {
        *lk(&self.s.clock) += by;
        self.s.lock_cv.notify_all();
    }

    /// Sets the space figures (`total`, `available`).
    pub fn set_space(&self, total: u64, available: u64) {
        let mut st = lk(&self.s.state);
        st.space.total = total;
        st.space.available = available;
    }

    /// Stores `bytes` as the record of entry `kind/id` (created if missing),
    /// bypassing every check: for damaged-record tests.
    pub fn put_raw_record(&self, kind: EntryKind, id: &str, bytes: Option<&[u8]>) {
        let mut st = lk(&self.s.state);
        let e = st.entries[kind.idx()].entry(id.to_string()).or_default();
        e.record = bytes.map(<[u8]>::to_vec);
        st.journal.push(Change::Entry(kind, id.to_string()));
    }

    fn now(&self) -> Duration {
        *lk(&self.s.clock)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lk(&self.s.state)
    }

    fn missing(&self, what: String, op: &'static str) -> Error {
        Error::io(
            &self.s.location.join(what),
            op,
            std::io::ErrorKind::NotFound.into(),
        )
    }

    fn find_image(&self, st: &State, image: &ImageRef) -> Result<Arc<MemImage>> {
        let found = match &image.owner {
            ImageOwner::Entry { kind, id } => st.entries[kind.idx()]
                .get(id)
                .and_then(|e| e.images.get(&image.name)),
            ImageOwner::Staging { area } => {
                st.staging.get(area).and_then(|a| a.images.get(&image.name))
            }
        };
        match found {
            Some(i) if i.format == image.format => Ok(Arc::clone(i)),
            _ => Err(Error::ImageNotFound {
                image: image.to_string(),
            }),
        }
    }

    fn put_staged(
        &self,
        area: &StagingArea,
        name: &str,
        img: Arc<MemImage>,
        format: Format,
    ) -> Result<ImageRef> {
        validate_name(name)?;
        let r = ImageRef {
            owner: ImageOwner::Staging { area: area.id },
            name: name.to_string(),
            format,
        };
        let mut st = self.state();
        let a = st
            .staging
            .get_mut(&area.id)
            .ok_or_else(|| self.missing(area.id.simple().to_string(), "use staging area"))?;
        if a.images.contains_key(name) {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: "an image of that name already exists".into(),
            });
        }
        a.images.insert(name.to_string(), img);
        Ok(r)
    }

    fn take_exclusive(&self, l: &mut LockState) -> Option<(u64, Duration)> {
        let now = self.now();
        let free = match l.writer {
            None => true,
            // The holder's lease lapsed: the lock is free again.
            Some((_, expiry)) => now >= expiry,
        };
        if free && l.readers == 0 {
            let mut t = lk(&self.s.next_token);
            let token = *t;
            *t += 1;
            let tenure = (token, now + self.s.lease_ttl);
            l.writer = Some(tenure);
            return Some(tenure);
        }
        None
    }

    fn take_shared(&self, l: &mut LockState) -> bool {
        let now = self.now();
        let free = match l.writer {
            None => true,
            Some((_, expiry)) => now >= expiry,
        };
        if free {
            l.writer = None;
            l.readers += 1;
        }
        free
    }

    fn acquire<T>(
        &self,
        wait: Wait,
        op: &'static str,
        mut take: impl FnMut(&mut LockState) -> Option<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let mut l = lk(&self.s.lock);
        loop {
            if let Some(t) = take(&mut l) {
                return Ok(t);
            }
            let waited = start.elapsed();
            let limit = match wait {
                Wait::Block => Duration::from_millis(50),
                Wait::FailFast => Duration::ZERO,
                Wait::Timeout(d) => d.saturating_sub(waited),
            };
            if limit.is_zero() {
                return Err(Error::Busy {
                    path: self.s.location.clone(),
                    op,
                    waited,
                });
            }
            // Bounded naps: a lease may lapse without anyone notifying.
            let nap = limit.min(Duration::from_millis(50));
            l = self
                .s
                .lock_cv
                .wait_timeout(l, nap)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl PoolLock for MemoryBackend {
    fn location(&self) -> &Path {
        &self.s.location
    }

    fn lock_shared(&self, wait: Wait, op: &'static str) -> Result<SharedGuard> {
        self.acquire(wait, op, |l| self.take_shared(l).then_some(()))?;
        Ok(SharedGuard::new(ReaderHold {
            s: Arc::clone(&self.s),
        }))
    }

    fn lock_exclusive(&self, wait: Wait, op: &'static str) -> Result<ExclusiveGuard> {
        let (token, _) = self.acquire(wait, op, |l| self.take_exclusive(l))?;
        Ok(ExclusiveGuard::new(
            token,
            WriterHold {
                s: Arc::clone(&self.s),
                token,
            },
        ))
    }

    fn check_fence(&self, guard: &ExclusiveGuard, op: &'static str) -> Result<()> {
        let now = self.now();
        let l = lk(&self.s.lock);
        let reason = match l.writer {
            Some((t, expiry)) if t == guard.token() => {
                if now < expiry {
                    return Ok(());
                }
                format!(
                    "the exclusive lease of tenure {t} expired at {expiry:?} (now {now:?}); \
                     another holder may have taken the pool"
                )
            }
            Some((t, _)) => format!(
                "the exclusive lease of tenure {} lapsed and tenure {t} holds the pool now",
                guard.token()
            ),
            None => format!(
                "the exclusive lease of tenure {} lapsed and the pool is not locked",
                guard.token()
            ),
        };
        Err(Error::Fenced {
            location: self.s.location.clone(),
            op,
            reason,
        })
    }
}

impl ChangeJournal for MemoryBackend {
    fn journal_append(&self, guard: &ExclusiveGuard, change: &Change) -> Result<JournalCursor> {
        self.check_fence(guard, "append to journal")?;
        let mut st = self.state();
        st.journal.push(change.clone());
        Ok(JournalCursor {
            epoch: st.journal_epoch,
            offset: st.journal.len() as u64,
        })
    }

    fn journal_read(&self, since: JournalCursor) -> Result<JournalRead> {
        let st = self.state();
        let now = JournalCursor {
            epoch: st.journal_epoch,
            offset: st.journal.len() as u64,
        };
        if since.epoch != now.epoch || since.offset > now.offset {
            return Ok(JournalRead::Reset(now));
        }
        let from = usize::try_from(since.offset).unwrap_or(usize::MAX);
        Ok(JournalRead::Changes(
            st.journal.get(from..).unwrap_or(&[]).to_vec(),
            now,
        ))
    }
}

fn summary_of(image: ImageRef, img: &MemImage) -> ImageSummary {
    ImageSummary {
        virtual_size: Some(img.size()),
        host_bytes: img.host_bytes(),
        backing: img.backing.as_ref().map(|(r, _)| r.clone()),
        error: None,
        image,
    }
}

impl RecordStore for MemoryBackend {
    fn config_path(&self) -> PathBuf {
        self.s.location.join("config")
    }

    fn read_config(&self) -> Result<Vec<u8>> {
        self.state()
            .config
            .clone()
            .ok_or_else(|| self.missing("config".into(), "read pool config"))
    }

    fn write_config(&self, guard: &ExclusiveGuard, bytes: &[u8]) -> Result<()> {
        self.check_fence(guard, "write pool config")?;
        self.state().config = Some(bytes.to_vec());
        Ok(())
    }

    fn list_ids(&self, kind: EntryKind) -> Result<Vec<String>> {
        Ok(self.state().entries[kind.idx()].keys().cloned().collect())
    }

    fn scan_entry(
        &self,
        kind: EntryKind,
        id: &str,
        _clean: Option<&ExclusiveGuard>,
    ) -> Result<Option<ScannedEntry>> {
        let st = self.state();
        let Some(e) = st.entries[kind.idx()].get(id) else {
            return Ok(None);
        };
        let images: Vec<ImageSummary> = e
            .images
            .iter()
            .map(|(name, img)| {
                let mut s = summary_of(ImageRef::entry(kind, id, name, img.format), img);
                s.backing = None; // scans do not resolve bases
                s
            })
            .collect();
        let rec_len = e.record.as_ref().map_or(0, |r| r.len() as u64);
        Ok(Some(ScannedEntry {
            record_path: self.s.location.join(format!(
                "{}/{id}/{}",
                kind.dir_name(),
                kind.record_file()
            )),
            record: e
                .record
                .clone()
                .ok_or_else(|| "record file missing".to_string()),
            physical: images
                .iter()
                .fold(rec_len, |a, i| a.saturating_add(i.host_bytes)),
            images,
            removed: Vec::new(),
        }))
    }

    fn write_record(
        &self,
        guard: &ExclusiveGuard,
        kind: EntryKind,
        id: &str,
        bytes: &[u8],
    ) -> Result<()> {
        self.check_fence(guard, "write record")?;
        let mut st = self.state();
        match st.entries[kind.idx()].get_mut(id) {
            Some(e) => {
                e.record = Some(bytes.to_vec());
                Ok(())
            }
            None => Err(self.missing(format!("{}/{id}", kind.dir_name()), "write record")),
        }
    }

    fn commit_staging(
        &self,
        guard: &ExclusiveGuard,
        area: &StagingArea,
        kind: EntryKind,
        id: &str,
        record: &[u8],
    ) -> Result<()> {
        self.check_fence(guard, "commit entry")?;
        let mut st = self.state();
        if st.entries[kind.idx()].contains_key(id) {
            return Err(Error::io(
                &self.s.location.join(format!("{}/{id}", kind.dir_name())),
                "move staged entry into place",
                std::io::ErrorKind::AlreadyExists.into(),
            ));
        }
        let a = st
            .staging
            .remove(&area.id)
            .ok_or_else(|| self.missing(area.id.simple().to_string(), "commit entry"))?;
        st.entries[kind.idx()].insert(
            id.to_string(),
            MemEntry {
                record: Some(record.to_vec()),
                images: a.images,
            },
        );
        Ok(())
    }

    fn remove_entry(&self, guard: &ExclusiveGuard, kind: EntryKind, id: &str) -> Result<()> {
        self.check_fence(guard, "remove entry")?;
        match self.state().entries[kind.idx()].remove(id) {
            Some(_) => Ok(()),
            None => Err(self.missing(format!("{}/{id}", kind.dir_name()), "remove entry")),
        }
    }

    fn destroy(&self, guard: ExclusiveGuard, _remove_dir: bool) -> Result<()> {
        self.check_fence(&guard, "undefine pool")?;
        let mut st = self.state();
        st.config = None;
        st.staging.clear();
        st.reservations.clear();
        Ok(())
    }
}

impl Liveness for MemoryBackend {
    fn create_staging(&self) -> Result<StagingArea> {
        let id = uuid::Uuid::new_v4();
        let token = Arc::new(());
        self.state().staging.insert(
            id,
            MemStaging {
                alive: Arc::downgrade(&token),
                images: BTreeMap::new(),
            },
        );
        Ok(StagingArea {
            id,
            hold: LivenessHold::new(token),
        })
    }

    fn discard_staging(&self, area: &StagingArea) {
        self.state().staging.remove(&area.id);
    }

    fn live_staging(&self) -> Result<usize> {
        Ok(self
            .state()
            .staging
            .values()
            .filter(|a| a.alive.strong_count() > 0)
            .count())
    }

    fn recover(&self, guard: &ExclusiveGuard) -> Result<Vec<Recovered>> {
        self.check_fence(guard, "recover pool")?;
        let mut st = self.state();
        let mut out = Vec::new();
        let dead: Vec<uuid::Uuid> = st
            .staging
            .iter()
            .filter(|(_, a)| a.alive.strong_count() == 0)
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            st.staging.remove(&k);
            out.push(Recovered {
                path: self.s.location.join(format!("staging/{}", k.simple())),
                what: "staging area left by a dead operation".into(),
            });
        }
        let dead: Vec<uuid::Uuid> = st
            .reservations
            .iter()
            .filter(|(_, (_, w))| w.strong_count() == 0)
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            if let Some((info, _)) = st.reservations.remove(&k) {
                out.push(Recovered {
                    path: self.s.location.join(format!("reservations/{}", k.simple())),
                    what: format!(
                        "reservation of {} bytes left by a dead operation",
                        info.bytes
                    ),
                });
            }
        }
        Ok(out)
    }

    fn create_reservation(
        &self,
        guard: &ExclusiveGuard,
        info: &ReservationInfo,
    ) -> Result<LivenessHold> {
        self.check_fence(guard, "reserve")?;
        let token = Arc::new(());
        self.state()
            .reservations
            .insert(info.id, (info.clone(), Arc::downgrade(&token)));
        Ok(LivenessHold::new(ReservationHold {
            s: Arc::clone(&self.s),
            id: info.id,
            _token: token,
        }))
    }

    fn live_reservations(&self, prune: Option<&ExclusiveGuard>) -> Result<Vec<ReservationInfo>> {
        let mut st = self.state();
        if prune.is_some() {
            st.reservations.retain(|_, (_, w)| w.strong_count() > 0);
        }
        Ok(st
            .reservations
            .values()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(i, _)| i.clone())
            .collect())
    }
}

impl ImageStore for MemoryBackend {
    fn create_image(
        &self,
        area: &StagingArea,
        name: &str,
        spec: &ImageSpec,
        ctl: &Control,
    ) -> Result<ImageRef> {
        if spec.format == Format::Qcow2 && spec.prealloc != Prealloc::Off {
            return Err(Error::InvalidImage {
                image: format!("staging {} image {name}", area.id.simple()),
                reason: "preallocation applies to raw images only; qcow2 images are thin".into(),
            });
        }
        let img = Arc::new(MemImage::new(spec.size, spec.format, None));
        if spec.prealloc != Prealloc::Off {
            let what = self.s.location.join(name);
            img.fill(ctl, &what).map_err(|e| Error::Image {
                image: name.to_string(),
                op: "preallocate image",
                source: e,
            })?;
        }
        self.put_staged(area, name, img, spec.format)
    }

    fn create_linked(
        &self,
        area: &StagingArea,
        name: &str,
        base: &ImageRef,
        size: Option<u64>,
    ) -> Result<ImageRef> {
        if matches!(&base.owner, ImageOwner::Staging { area: a } if *a != area.id) {
            return Err(Error::InvalidImage {
                image: base.to_string(),
                reason: "a linked image's base must be committed or in the same staging area"
                    .into(),
            });
        }
        let b = self.find_image(&self.state(), base)?;
        let size = size.unwrap_or(b.size());
        if size < b.size() {
            return Err(Error::InvalidImage {
                image: name.to_string(),
                reason: format!("size {size} is smaller than its base's {} bytes", b.size()),
            });
        }
        let img = Arc::new(MemImage::new(size, Format::Qcow2, Some((base.clone(), b))));
        self.put_staged(area, name, img, Format::Qcow2)
    }

    fn copy_full(
        &self,
        area: &StagingArea,
        name: &str,
        src: &ImageRef,
        format: Format,
        ctl: &Control,
    ) -> Result<ImageRef> {
        let s = self.find_image(&self.state(), src)?;
        let size = s.size();
        let img = Arc::new(MemImage::new(size, format, None));
        let mut buf = vec![0u8; BLOCK as usize];
        let what = self.s.location.join(name);
        let mut off = 0u64;
        while off < size {
            ctl.check(&what, "copy image").map_err(|e| Error::Image {
                image: src.to_string(),
                op: "copy image",
                source: e,
            })?;
            let n = (size - off).min(BLOCK) as usize;
            s.read(&mut buf[..n], off);
            if buf[..n].iter().any(|&b| b != 0) {
                img.write(&buf[..n], off);
            }
            off += n as u64;
            ctl.report(off, size);
        }
        self.put_staged(area, name, img, format)
    }

    fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        let img = self.find_image(&self.state(), image)?;
        Ok(Box::new(MemHandle {
            image: img,
            name: self.s.location.join(image.to_string()),
            writable,
        }))
    }

    fn grow_image(&self, guard: &ExclusiveGuard, image: &ImageRef, new_size: u64) -> Result<()> {
        self.check_fence(guard, "grow image")?;
        self.grow_any(image, new_size)
    }

    fn grow_staged(&self, area: &StagingArea, image: &ImageRef, new_size: u64) -> Result<()> {
        image.require_staged_in(area.id)?;
        self.grow_any(image, new_size)
    }

    fn compact_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        opts: &CompactOptions,
        ctl: &Control,
    ) -> Result<CompactReport> {
        self.check_fence(guard, "compact image")?;
        crate::local::require_qcow2(image)?;
        let img = self.find_image(&self.state(), image)?;
        let what = self.s.location.join(image.to_string());
        let ierr = |source| Error::Image {
            image: image.to_string(),
            op: "compact image",
            source,
        };
        let before = img.host_bytes();
        // Where the base shows through: a dropped block there must stay
        // allocated (as zeros) to keep hiding it.
        let base_size = img.backing.as_ref().map_or(0, |(_, b)| b.size());
        let mut rep = CompactReport {
            bytes_before: before,
            ..CompactReport::default()
        };
        let mut d = wlock(&img.data);
        let keys: Vec<u64> = d.blocks.keys().copied().collect();
        let total = keys.len() as u64;
        for (n, bi) in keys.into_iter().enumerate() {
            ctl.check(&what, "compact image").map_err(ierr)?;
            let start = bi * BLOCK;
            let Some(block) = d.blocks.get_mut(&bi) else {
                continue;
            };
            for r in &opts.unused_ranges {
                let lo = r.offset.max(start);
                let hi = r.end().min(start + BLOCK);
                if lo < hi {
                    block[(lo - start) as usize..(hi - start) as usize].fill(0);
                }
            }
            if block.iter().all(|&b| b == 0) {
                rep.dropped_clusters += 1;
                if start < base_size {
                    rep.zero_clusters += 1;
                } else {
                    d.blocks.remove(&bi);
                }
            } else {
                rep.data_clusters += 1;
            }
            ctl.report(n as u64 + 1, total);
        }
        drop(d);
        // Memory blocks are never stored compressed.
        rep.bytes_after = img.host_bytes();
        Ok(rep)
    }

    fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary> {
        let img = self.find_image(&self.state(), image)?;
        Ok(summary_of(image.clone(), &img))
    }

    fn remove_image(&self, guard: &ExclusiveGuard, image: &ImageRef) -> Result<()> {
        self.check_fence(guard, "remove image")?;
        let mut st = self.state();
        let removed = match &image.owner {
            ImageOwner::Entry { kind, id } => st.entries[kind.idx()]
                .get_mut(id)
                .and_then(|e| e.images.remove(&image.name)),
            ImageOwner::Staging { area } => st
                .staging
                .get_mut(area)
                .and_then(|a| a.images.remove(&image.name)),
        };
        removed.map(|_| ()).ok_or_else(|| Error::ImageNotFound {
            image: image.to_string(),
        })
    }

    fn attach_target(&self, image: &ImageRef) -> Result<AttachTarget> {
        self.find_image(&self.state(), image)?;
        Ok(AttachTarget::BlockIo {
            image: image.clone(),
        })
    }

    fn move_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef> {
        self.check_fence(guard, "move image")?;
        validate_name(name)?;
        let to = ImageRef::entry(kind, id, name, image.format);
        let mut st = self.state();
        let img = self.find_image(&st, image)?;
        match st.entries[kind.idx()].get(id) {
            None => {
                return Err(Error::InvalidImage {
                    image: to.to_string(),
                    reason: "the destination entry does not exist".into(),
                })
            }
            Some(e) if e.images.contains_key(name) => {
                return Err(Error::InvalidImage {
                    image: to.to_string(),
                    reason: "an image of that name already exists".into(),
                })
            }
            Some(_) => {}
        }
        match &image.owner {
            ImageOwner::Entry { kind: k, id: i } => {
                if let Some(e) = st.entries[k.idx()].get_mut(i) {
                    e.images.remove(&image.name);
                }
            }
            ImageOwner::Staging { area } => {
                if let Some(a) = st.staging.get_mut(area) {
                    a.images.remove(&image.name);
                }
            }
        }
        if let Some(e) = st.entries[kind.idx()].get_mut(id) {
            e.images.insert(name.to_string(), img);
        }
        Ok(to)
    }
}

impl MemoryBackend {
    fn grow_any(&self, image: &ImageRef, new_size: u64) -> Result<()> {
        let img = self.find_image(&self.state(), image)?;
        let mut d = wlock(&img.data);
        if new_size < d.size {
            return Err(Error::Image {
                image: image.to_string(),
                op: "grow image",
                source: vmvol_format::Error::Shrink {
                    path: self.s.location.join(image.to_string()),
                    current: d.size,
                    requested: new_size,
                },
            });
        }
        d.size = new_size;
        Ok(())
    }
}

impl SpaceFigures for MemoryBackend {
    fn fs_stats(&self) -> Result<FsStats> {
        Ok(self.state().space)
    }

    fn base_physical(&self) -> Result<u64> {
        let st = self.state();
        let staged = st
            .staging
            .values()
            .flat_map(|a| a.images.values())
            .fold(0u64, |a, i| a.saturating_add(i.host_bytes()));
        Ok(staged.saturating_add(st.config.as_ref().map_or(0, |c| c.len() as u64)))
    }
}
