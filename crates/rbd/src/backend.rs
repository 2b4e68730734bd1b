//! The pool backend on RBD: the seam's traits over one RADOS pool/namespace.
//!
//! Layout in the namespace:
//! ```text
//! vmvol.pool                 the pool object
//!   lock "vmvol.pool"        the pool lock (cls_lock, shared/exclusive, leased)
//!   xattr "epoch"            fencing token of the current exclusive tenure
//!   omap config              the pool's config record
//!   omap e.<kind>.<id>       an entry exists (its images may be damaged);
//!                            value "views" once it has native snapshots
//!   omap r.<kind>.<id>       the entry's record
//!   omap jhead, j.<offset>   the change journal
//!   omap s.<uuid>            a staging area; live while vmvol.live.<uuid> is locked
//!   omap v.<uuid>            a reservation (JSON); live likewise
//!   omap n.<kind>.<id>.<name>, n.staging.<uuid>.<name>
//!                            a native snapshot, committed or staged (see `native`)
//! vmvol.live.<uuid>          lock "live": the lease of one staging area or reservation
//! RBD image v+<kind>+<id>+<name>+<fmt>   an entry's image
//! RBD image s+<uuid>+<name>+<fmt>        a staged image
//! RBD image h+<rbd id>                   an image kept for native snapshots
//! ```
//! Names of the pool may contain '.', never '+', so image names parse back.
//! Every write of the pool object under the exclusive lock carries
//! `lock.assert_locked` and a compare of the epoch xattr in the same atomic
//! RADOS operation: a holder whose lease lapsed is refused by the OSD.
//! Image operations (RBD calls, not single-object ops) are preceded by such
//! a fenced no-op on the pool object.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmvol_format::{BlockIo, Control, Format, Prealloc};
use vmvol_pool::backend::{
    Change, ChangeJournal, ExclusiveGuard, FsStats, ImageStore, JournalCursor, JournalRead,
    Liveness, LivenessHold, PoolLock, RecordStore, Recovered, ReservationInfo, ScannedEntry,
    SharedGuard, SpaceFigures, StagingArea,
};
use vmvol_pool::{
    validate_name, AttachTarget, EntryKind, Error, ImageOwner, ImageRef, ImageSpec, ImageSummary,
    RbdSpec, Result, Wait,
};

use crate::ffi::{Errno, WriteStep};
use crate::image::RbdImage;
use crate::lease::{assert_locked_input, Kind, Lease};
use crate::Connection;

mod native;
pub use native::NativeSnapshot;
use native::{dir_string, HELD, NATIVE_SNAP};

const POOL_OBJ: &str = "vmvol.pool";
const LOCK: &str = "vmvol.pool";
const LIVE_LOCK: &str = "live";
const EPOCH: &str = "epoch";
const LINK_SNAP: &str = "vmvol-link-";
/// librbd's directory object of a namespace and the prefix of its keys
/// that map image names to ids.
const RBD_DIRECTORY: &str = "rbd_directory";
const DIR_NAME: &str = "name_";

/// Tunables of an [`RbdBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdOptions {
    /// How long a lease (pool lock, staging area, reservation) lasts without
    /// renewal; renewed every third of it while held.
    pub lease: Duration,
    /// Journal entries kept before the journal starts a new generation
    /// (readers behind it then rescan: `JournalRead::Reset`).
    pub journal_max: u64,
}

impl Default for RbdOptions {
    fn default() -> RbdOptions {
        RbdOptions {
            lease: Duration::from_secs(30),
            journal_max: 4096,
        }
    }
}

/// A pool on a Ceph RBD pool/namespace. Each instance is one cluster client
/// (like one process or host); clones of the `Arc` share it.
#[derive(Debug)]
pub struct RbdBackend {
    conn: Connection,
    location: PathBuf,
    opts: RbdOptions,
    paused: Arc<AtomicBool>,
    /// Cookies of this client's current exclusive tenures, by token.
    tenures: Arc<Mutex<HashMap<u64, String>>>,
    /// This client's session: a leased lock and a marker `c.<uuid>` with
    /// its address, so that recovery can fence it once it is dead.
    session: Option<(uuid::Uuid, Lease)>,
    /// The journal head as this client last wrote it, with the cookie of
    /// the exclusive tenure it wrote it in: nobody else appends during
    /// that tenure (the lock excludes them, the fence refuses a lapsed
    /// one), so its appends need not read the head back first.
    jhead: Mutex<Option<(String, JournalHead)>>,
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        if let Some((id, lease)) = self.session.take() {
            drop(lease);
            let k = [format!("c.{}", id.simple())];
            let _ = self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)]);
            let _ = self.conn.io.remove(&live_oid(id));
        }
    }
}

/// The hold of an exclusive tenure (the lease is released after the
/// cookie is forgotten: fields drop in order).
struct Tenure {
    token: u64,
    tenures: Arc<Mutex<HashMap<u64, String>>>,
    _lease: Lease,
}

/// A link snapshot being made for a clone in staging area `area`, or whose
/// clone is being removed by the client of session `area`. Recovery acts on
/// it only once that area's or session's lease is gone (markers written
/// before sessions were named carry the nil id: always dead).
#[derive(Serialize, Deserialize)]
struct LinkMarker {
    area: uuid::Uuid,
    base: String,
}

/// A client session's omap key (`c.<uuid>`) and id.
type SessionKey = (String, uuid::Uuid);

/// What became of a link snapshot recovery or a remove tried to drop.
#[derive(Debug, PartialEq, Eq)]
enum LinkSnap {
    /// It no longer exists (removed now or before, or its image is gone).
    Gone,
    /// A clone still depends on it: that clone's removal takes it.
    InUse,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct JournalHead {
    epoch: u64,
    len: u64,
}

fn kind_str(k: EntryKind) -> &'static str {
    k.dir_name()
}

fn kind_of(s: &str) -> Option<EntryKind> {
    EntryKind::ALL.into_iter().find(|k| k.dir_name() == s)
}

fn fmt_of(s: &str) -> Option<Format> {
    match s {
        "raw" => Some(Format::Raw),
        "qcow2" => Some(Format::Qcow2),
        _ => None,
    }
}

/// The RBD image name of an image.
fn rbd_name(r: &ImageRef) -> String {
    match &r.owner {
        ImageOwner::Entry { kind, id } => {
            format!(
                "v+{}+{id}+{}+{}",
                kind_str(*kind),
                r.name,
                r.format.as_str()
            )
        }
        ImageOwner::Staging { area } => {
            format!("s+{}+{}+{}", area.simple(), r.name, r.format.as_str())
        }
    }
}

/// The image an RBD image name stands for, if it is one of ours.
fn parse_name(n: &str) -> Option<ImageRef> {
    let parts: Vec<&str> = n.split('+').collect();
    match parts.as_slice() {
        ["v", kind, id, name, fmt] => Some(ImageRef::entry(kind_of(kind)?, id, name, fmt_of(fmt)?)),
        ["s", area, name, fmt] => Some(ImageRef {
            owner: ImageOwner::Staging {
                area: uuid::Uuid::parse_str(area).ok()?,
            },
            name: (*name).to_string(),
            format: fmt_of(fmt)?,
        }),
        _ => None,
    }
}

fn entry_key(kind: EntryKind, id: &str) -> String {
    format!("e.{}.{id}", kind_str(kind))
}

fn record_key(kind: EntryKind, id: &str) -> String {
    format!("r.{}.{id}", kind_str(kind))
}

/// Whether two client addresses (`[v2:]IP:PORT/NONCE`, as librados and
/// librbd print them) are the same client.
fn same_addr(a: &str, b: &str) -> bool {
    fn bare(a: &str) -> &str {
        let a = a.trim_matches(|c| c == '[' || c == ']');
        ["v1:", "v2:", "any:"]
            .iter()
            .find_map(|p| a.strip_prefix(p))
            .unwrap_or(a)
    }
    bare(a) == bare(b)
}

/// A failed open of `image` in the seam's terms: not found, or an I/O error.
fn open_error(image: &ImageRef, e: crate::Error) -> Error {
    match e {
        crate::Error::Ceph { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
            Error::ImageNotFound {
                image: image.to_string(),
            }
        }
        crate::Error::Ceph { object, op, source } => Error::Io {
            path: object,
            op,
            source,
        },
    }
}

fn live_oid(id: uuid::Uuid) -> String {
    format!("vmvol.live.{}", id.simple())
}

impl RbdBackend {
    /// Creates the pool's layout in `spec`'s pool/namespace (which the
    /// operator made) holding config record `config`; refused if a vmvol
    /// pool is there already.
    pub fn create(spec: &RbdSpec, config: &[u8]) -> Result<()> {
        let b = RbdBackend::connect(spec, RbdOptions::default())?;
        let kv = [
            ("config".to_string(), config.to_vec()),
            (
                "jhead".to_string(),
                serde_json::to_vec(&JournalHead { epoch: 1, len: 0 }).unwrap_or_default(),
            ),
        ];
        b.conn
            .io
            .write_op(
                POOL_OBJ,
                &[
                    WriteStep::Create { exclusive: true },
                    WriteStep::SetXattr(EPOCH, b"0"),
                    WriteStep::OmapSet(&kv),
                ],
            )
            .map_err(|e| b.err(POOL_OBJ, "create pool object", e))
    }

    /// Opens the pool in `spec`'s pool/namespace.
    pub fn open(spec: &RbdSpec, opts: RbdOptions) -> Result<RbdBackend> {
        let mut b = RbdBackend::connect(spec, opts)?;
        b.read_config()?;
        let id = uuid::Uuid::new_v4();
        let lease = b.take_live(id)?;
        let addr = b.conn.cluster.addrs().unwrap_or_default();
        b.put_pool_key(
            format!("c.{}", id.simple()),
            addr.into_bytes(),
            "record client session",
        )?;
        b.session = Some((id, lease));
        Ok(b)
    }

    fn connect(spec: &RbdSpec, opts: RbdOptions) -> Result<RbdBackend> {
        let conn = Connection::connect(spec).map_err(|e| match e {
            crate::Error::Ceph { object, op, source } => Error::Io {
                path: object,
                op,
                source,
            },
        })?;
        Ok(RbdBackend {
            location: conn.label(""),
            conn,
            opts,
            paused: Arc::new(AtomicBool::new(false)),
            tenures: Arc::default(),
            session: None,
            jhead: Mutex::new(None),
        })
    }

    /// The connection (to open images by RBD name, for tools and tests).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The lease duration.
    pub fn lease(&self) -> Duration {
        self.opts.lease
    }

    /// This client's address, as the cluster knows it (and blocklists it).
    pub fn client_address(&self) -> String {
        self.conn.cluster.addrs().unwrap_or_default()
    }

    /// Client sessions of the pool (this one included) whose lease is held:
    /// hosts alive, or dead less than a lease ago. Recovery fences and
    /// cleans up after the others only.
    pub fn live_clients(&self) -> Result<usize> {
        let mut n = 0;
        for (k, _) in self.omap_prefix("c.")? {
            if let Ok(id) = uuid::Uuid::parse_str(&k[2..]) {
                n += usize::from(self.live_holders(id)?);
            }
        }
        Ok(n)
    }

    /// Test hook: stops (or resumes) renewing every lease of this client, as
    /// a stalled host would; after [`RbdBackend::lease`] they lapse.
    pub fn pause_renewals(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// The RBD image name of `image` (for `rbd export` and friends).
    pub fn image_name(image: &ImageRef) -> String {
        rbd_name(image)
    }

    fn err(&self, what: &str, op: &'static str, e: Errno) -> Error {
        if e.0 == libc::ESHUTDOWN {
            // EBLOCKLISTED: another host's recovery fenced this client.
            return Error::Fenced {
                location: self.location.clone(),
                op,
                reason: format!(
                    "this client's lease lapsed and another host's recovery blocklisted it: \
                     the cluster refuses its operations ({}, errno {})",
                    self.conn.label(what).display(),
                    e.0
                ),
            };
        }
        Error::Io {
            path: self.conn.label(what),
            op,
            source: e.io(),
        }
    }

    fn image_err(&self, image: &ImageRef, op: &'static str, e: Errno) -> Error {
        if e.0 == libc::ENOENT {
            return Error::ImageNotFound {
                image: image.to_string(),
            };
        }
        self.err(&rbd_name(image), op, e)
    }

    /// The fence steps of a write under `guard`: the lock is still ours
    /// (unexpired) and the epoch is still our token.
    fn fence_input(&self, guard: &ExclusiveGuard) -> Result<(Vec<u8>, String)> {
        let cookie = lk(&self.tenures)
            .get(&guard.token())
            .cloned()
            .ok_or_else(|| Error::Fenced {
                location: self.location.clone(),
                op: "write",
                reason: format!(
                    "the exclusive lease of tenure {} is not held by this client \
                     (released, or lapsed and expired)",
                    guard.token()
                ),
            })?;
        Ok((
            assert_locked_input(LOCK, &cookie),
            guard.token().to_string(),
        ))
    }

    /// Applies `steps` to the pool object together with the fence; maps a
    /// refusal by the cluster to [`Error::Fenced`].
    fn fenced(
        &self,
        guard: &ExclusiveGuard,
        op: &'static str,
        steps: &[WriteStep<'_>],
    ) -> Result<()> {
        let (input, token) = self.fence_input(guard)?;
        let mut all = vec![
            WriteStep::Exec("lock", "assert_locked", &input),
            WriteStep::CmpXattrEq(EPOCH, token.as_bytes()),
        ];
        all.extend_from_slice(steps);
        match self.conn.io.write_op(POOL_OBJ, &all) {
            Ok(()) => Ok(()),
            Err(Errno(e)) if e == libc::EBUSY || e == libc::ENOENT || e == libc::ECANCELED => {
                Err(Error::Fenced {
                    location: self.location.clone(),
                    op,
                    reason: format!(
                        "the cluster refused the write: the exclusive lease of tenure {} lapsed \
                         or expired and passed on (errno {e} from lock.assert_locked/epoch check)",
                        guard.token()
                    ),
                })
            }
            Err(e) => Err(self.err(POOL_OBJ, op, e)),
        }
    }

    fn omap_one(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let (vals, _) = self
            .conn
            .io
            .omap_get(POOL_OBJ, "", key, 4)
            .map_err(|e| self.err(POOL_OBJ, "read pool object", e))?;
        Ok(vals.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
    }

    fn omap_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.conn
            .io
            .omap_all(POOL_OBJ, prefix)
            .map_err(|e| self.err(POOL_OBJ, "read pool object", e))
    }

    /// Every image name of the namespace, as `rbd ls` shows them (images
    /// whose removal was interrupted included: librbd lists them from its
    /// trash until a remove finishes them).
    fn all_names(&self) -> Result<Vec<String>> {
        self.conn
            .io
            .rbd_list()
            .map_err(|e| self.err("", "list images", e))
    }

    /// Our images whose RBD name starts with `prefix`, read from librbd's
    /// directory object (its omap keys are `name_<image>`): one read per
    /// 1000 names of that prefix, where `rbd_list` reads every name of the
    /// namespace — scanning each entry that way made a pool's open O(N²).
    fn images_prefixed(&self, prefix: &str) -> Result<Vec<(String, ImageRef)>> {
        Ok(self
            .images_with_ids(prefix)?
            .into_iter()
            .map(|(n, r, _)| (n, r))
            .collect())
    }

    /// [`RbdBackend::images_prefixed`] with each image's RBD id (empty if
    /// the directory's value does not decode).
    fn images_with_ids(&self, prefix: &str) -> Result<Vec<(String, ImageRef, String)>> {
        Ok(self
            .directory(prefix)?
            .into_iter()
            .filter_map(|(n, id)| parse_name(&n).map(|r| (n, r, id)))
            .collect())
    }

    /// Every image of librbd's directory whose name starts with `prefix`:
    /// (name, RBD id; empty if the directory's value does not decode).
    fn directory(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let keys = match self
            .conn
            .io
            .omap_all(RBD_DIRECTORY, &format!("{DIR_NAME}{prefix}"))
        {
            Ok(kv) => kv,
            // No directory yet: no image was ever made in the namespace.
            Err(Errno(libc::ENOENT)) => Vec::new(),
            Err(e) => return Err(self.err(RBD_DIRECTORY, "list images", e)),
        };
        Ok(keys
            .into_iter()
            .filter_map(|(k, v)| {
                let n = k.strip_prefix(DIR_NAME)?.to_string();
                Some((n, dir_string(&v).unwrap_or_default()))
            })
            .collect())
    }

    /// The images of entry `kind/id`, with their RBD ids.
    fn entry_images(&self, kind: EntryKind, id: &str) -> Result<Vec<(String, ImageRef, String)>> {
        let owner = ImageOwner::Entry {
            kind,
            id: id.to_string(),
        };
        Ok(self
            .images_with_ids(&format!("v+{}+{id}+", kind_str(kind)))?
            .into_iter()
            .filter(|(_, r, _)| r.owner == owner)
            .collect())
    }

    /// [`RbdBackend::summary`] without the base, from the image's header
    /// and object map when they allow (see `figures`), else by opening it.
    fn quick_summary(&self, image: &ImageRef, rbd_id: &str) -> ImageSummary {
        match crate::figures::quick_figures(&self.conn.io, rbd_id) {
            Some((size, held)) => ImageSummary {
                image: image.clone(),
                virtual_size: Some(size),
                host_bytes: held,
                backing: None,
                error: None,
            },
            None => self.summary(image, false),
        }
    }

    /// The images of staging area `area`.
    fn area_images(&self, area: uuid::Uuid) -> Result<Vec<(String, ImageRef)>> {
        let owner = ImageOwner::Staging { area };
        Ok(self
            .images_prefixed(&format!("s+{}+", area.simple()))?
            .into_iter()
            .filter(|(_, r)| r.owner == owner)
            .collect())
    }

    /// Opens an entry's or staged image; a native snapshot read-only.
    fn open_raw(&self, image: &ImageRef, writable: bool) -> Result<RbdImage> {
        if let Some(v) = self.view_of(image)? {
            if writable {
                return Err(Error::InvalidImage {
                    image: image.to_string(),
                    reason: "a snapshot is read-only".into(),
                });
            }
            return self.open_view(image, &v);
        }
        self.open_plain(image, writable)
    }

    /// Opens the RBD image named after `image` (no native snapshot).
    fn open_plain(&self, image: &ImageRef, writable: bool) -> Result<RbdImage> {
        let name = rbd_name(image);
        RbdImage::open(&self.conn.io, &name, self.conn.label(&name), writable)
            .map_err(|e| open_error(image, e))
    }

    fn summary(&self, image: &ImageRef, with_base: bool) -> ImageSummary {
        let mut s = ImageSummary {
            image: image.clone(),
            virtual_size: None,
            host_bytes: 0,
            backing: None,
            error: None,
        };
        match self.open_raw(image, false) {
            Ok(io) => {
                s.virtual_size = Some(io.size());
                s.host_bytes = io.allocated().unwrap_or(0);
                if with_base {
                    if let Ok(Some((parent, _))) = io.raw().parent() {
                        s.backing = parse_name(&parent);
                    }
                }
            }
            Err(e) => s.error = Some(e.to_string()),
        }
        s
    }

    /// The id whose liveness covers this client's own markers: its session.
    fn session_id(&self) -> uuid::Uuid {
        self.session
            .as_ref()
            .map_or(uuid::Uuid::nil(), |(id, _)| *id)
    }

    /// Records marker `l.<snap>` (snapshot `snap` of image `base`) for the
    /// staging area or session `owner`.
    fn mark_link(&self, snap: &str, base: &str, owner: uuid::Uuid) -> Result<String> {
        let mk = LinkMarker {
            area: owner,
            base: base.to_string(),
        };
        let value = serde_json::to_vec(&mk).map_err(|e| self.json_err(e))?;
        self.put_pool_key(format!("l.{snap}"), value, "record link snapshot")
    }

    /// Sets one key of the pool object (which must exist) and returns it.
    fn put_pool_key(&self, key: String, value: Vec<u8>, op: &'static str) -> Result<String> {
        let kv = [(key, value)];
        self.conn
            .io
            .write_op(
                POOL_OBJ,
                &[WriteStep::AssertExists, WriteStep::OmapSet(&kv)],
            )
            .map_err(|e| self.err(POOL_OBJ, op, e))?;
        let [(k, _)] = kv;
        Ok(k)
    }

    /// Unprotects and removes link snapshot `snap` of image `base`. If
    /// `base` is gone by that name (moved since the marker was written),
    /// the image holding a snapshot of that (unique) name is found by a
    /// scan. Every outcome but an error is final, so a repeat is harmless.
    fn drop_link_snapshot(&self, base: &str, snap: &str) -> std::result::Result<LinkSnap, Errno> {
        let io = match crate::ffi::Image::open(&self.conn.io, base, false) {
            Ok(io) => io,
            Err(Errno(libc::ENOENT)) => match self.find_snapshot(snap)? {
                Some(io) => io,
                None => return Ok(LinkSnap::Gone),
            },
            Err(e) => return Err(e),
        };
        match io.snap_unprotect(snap) {
            // Unprotected now, not protected, or no such snapshot.
            Ok(()) | Err(Errno(libc::EINVAL | libc::ENOENT)) => {}
            Err(Errno(libc::EBUSY)) => return Ok(LinkSnap::InUse),
            Err(e) => return Err(e),
        }
        match io.snap_remove(snap) {
            Ok(()) | Err(Errno(libc::ENOENT)) => Ok(LinkSnap::Gone),
            Err(e) => Err(e),
        }
    }

    /// The image (opened writable) holding a snapshot named `snap`.
    fn find_snapshot(&self, snap: &str) -> std::result::Result<Option<crate::ffi::Image>, Errno> {
        for name in self.conn.io.rbd_list()? {
            let Ok(io) = crate::ffi::Image::open(&self.conn.io, &name, false) else {
                continue;
            };
            if io.snap_list().is_ok_and(|l| l.iter().any(|s| s == snap)) {
                return Ok(Some(io));
            }
        }
        Ok(None)
    }

    /// Removes an image and the link snapshot it holds on its parent;
    /// refused while clones depend on one of its snapshots. An image that
    /// native snapshots still view is kept (renamed `h+<id>`) instead.
    fn remove_rbd(&self, image: &ImageRef) -> Result<()> {
        self.remove_named(&rbd_name(image), &image.to_string())
    }

    /// [`RbdBackend::remove_rbd`] of RBD image `name` (`what` in messages).
    fn remove_named(&self, name: &str, what: &str) -> Result<()> {
        let opened = crate::ffi::Image::open(&self.conn.io, name, false);
        let parent = match opened {
            Ok(io) => {
                if self.hold_if_viewed(name, &io)? {
                    return Ok(());
                }
                self.drop_snapshots(what, &io, true)?;
                io.parent().ok().flatten()
            }
            // A remove that died half way leaves a listed image that no
            // longer opens (its header gone): librbd's remove finishes it,
            // and may say ENOENT when it did.
            Err(e) => {
                let err = if e.0 == libc::ENOENT {
                    Error::ImageNotFound {
                        image: what.to_string(),
                    }
                } else {
                    self.err(name, "open image", e)
                };
                return match self.conn.io.rbd_remove(name) {
                    Ok(()) => Ok(()),
                    Err(Errno(libc::ENOENT))
                        if self.all_names().is_ok_and(|l| l.iter().all(|n| n != name)) =>
                    {
                        Ok(())
                    }
                    Err(_) => Err(err),
                };
            }
        };
        // The clone goes before its link snapshot: until the snapshot is
        // gone a marker of this client's session names it, so the recovery
        // after a crash in between (or a failure to drop the snapshot)
        // removes it once no clone depends on it.
        let link = parent.filter(|(_, snap)| snap.starts_with(LINK_SNAP));
        let marker = match &link {
            Some((p, snap)) => Some(self.mark_link(snap, p, self.session_id())?),
            None => None,
        };
        let removed = self.conn.io.rbd_remove(name).map_err(|e| {
            if e.0 == libc::ENOENT {
                Error::ImageNotFound {
                    image: what.to_string(),
                }
            } else {
                self.err(name, "remove image", e)
            }
        });
        if let (Some((p, snap)), Some(k)) = (&link, marker) {
            // If the clone is still there the snapshot stays (in use). The
            // marker is kept when dropping failed: the next recovery retries.
            if self.drop_link_snapshot(p, snap).is_ok() {
                let k = [k];
                let _ = self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)]);
            }
        }
        removed
    }

    /// Removes the image's link snapshots (and native ones if `native`:
    /// those no view names) whose clones are gone; refused (nothing
    /// removed that matters) if a clone depends on one.
    fn drop_snapshots(&self, what: &str, io: &crate::ffi::Image, native: bool) -> Result<()> {
        let snaps = io
            .snap_list()
            .map_err(|e| self.err(what, "list snapshots", e))?;
        for s in snaps {
            if !native && s.starts_with(NATIVE_SNAP) {
                continue;
            }
            match io.snap_unprotect(&s) {
                Ok(()) => {}
                // Not protected; or half removed (a remove killed midway
                // leaves it listed): the remove below finishes it.
                Err(Errno(libc::EINVAL | libc::ENOENT)) => {}
                Err(Errno(libc::EBUSY)) => {
                    return Err(Error::InvalidImage {
                        image: what.to_string(),
                        reason: format!(
                            "linked images depend on it (clones of its snapshot {s}); \
                             remove them first"
                        ),
                    })
                }
                Err(e) => return Err(self.err(what, "unprotect snapshot", e)),
            }
            match io.snap_remove(&s) {
                Ok(()) | Err(Errno(libc::ENOENT)) => {}
                Err(e) => return Err(self.err(what, "remove snapshot", e)),
            }
        }
        Ok(())
    }

    fn live_holders(&self, id: uuid::Uuid) -> Result<bool> {
        let oid = live_oid(id);
        self.conn
            .io
            .lockers(&oid, LIVE_LOCK)
            .map(|l| !l.is_empty())
            .map_err(|e| self.err(&oid, "list lockers", e))
    }

    fn take_live(&self, id: uuid::Uuid) -> Result<Lease> {
        let oid = live_oid(id);
        Lease::try_take(
            &self.conn.io,
            &oid,
            LIVE_LOCK,
            Kind::Exclusive,
            self.opts.lease,
            &self.paused,
        )
        .map_err(|e| self.err(&oid, "take liveness lease", e))
    }

    fn acquire(&self, wait: Wait, op: &'static str, kind: Kind) -> Result<Lease> {
        let start = Instant::now();
        let mut nap = Duration::from_millis(5);
        loop {
            match Lease::try_take(
                &self.conn.io,
                POOL_OBJ,
                LOCK,
                kind,
                self.opts.lease,
                &self.paused,
            ) {
                Ok(l) => return Ok(l),
                Err(Errno(e)) if e == libc::EBUSY || e == libc::EEXIST => {}
                Err(e) => return Err(self.err(POOL_OBJ, "lock pool", e)),
            }
            let waited = start.elapsed();
            let limit = match wait {
                Wait::Block => Duration::MAX,
                Wait::FailFast => Duration::ZERO,
                Wait::Timeout(d) => d,
            };
            if waited >= limit {
                return Err(Error::Busy {
                    path: self.location.clone(),
                    op,
                    waited,
                });
            }
            std::thread::sleep(nap.min(limit.saturating_sub(waited)));
            nap = (nap * 2).min(Duration::from_millis(100));
        }
    }

    fn remove_staged_images(&self, area: uuid::Uuid, out: Option<&mut Vec<Recovered>>) -> bool {
        // Native snapshots first (a staged snapshot of a staged image).
        for (k, r, v) in self.area_views(area).unwrap_or_default() {
            let _ = self.drop_view(None, &k, &r, &v);
        }
        let mut left: Vec<(String, ImageRef)> = self.area_images(area).unwrap_or_default();
        // Clones before their bases: retry while something goes.
        let mut removed = Vec::new();
        while !left.is_empty() {
            let before = left.len();
            left.retain(|(n, r)| {
                if self.remove_rbd(r).is_ok() {
                    removed.push(n.clone());
                    false
                } else {
                    true
                }
            });
            if left.len() == before {
                break;
            }
        }
        if let Some(out) = out {
            for n in removed {
                out.push(Recovered {
                    path: self.conn.label(&n),
                    what: "image of a staging area left by a dead operation".into(),
                });
            }
        }
        left.is_empty()
    }
}

/// Releases the tenure's lease and forgets its cookie.
impl Drop for Tenure {
    fn drop(&mut self) {
        lk(&self.tenures).remove(&self.token);
    }
}

fn lk<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PoolLock for RbdBackend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn lock_shared(&self, wait: Wait, op: &'static str) -> Result<SharedGuard> {
        Ok(SharedGuard::new(self.acquire(wait, op, Kind::Shared)?))
    }

    fn lock_exclusive(&self, wait: Wait, op: &'static str) -> Result<ExclusiveGuard> {
        let lease = self.acquire(wait, op, Kind::Exclusive)?;
        // A new tenure: bump the epoch under the lock just taken.
        let old = self
            .conn
            .io
            .getxattr(POOL_OBJ, EPOCH)
            .map_err(|e| self.err(POOL_OBJ, "read lease epoch", e))?;
        let old_n: u64 = String::from_utf8_lossy(&old).trim().parse().unwrap_or(0);
        let token = old_n.saturating_add(1);
        let input = assert_locked_input(LOCK, &lease.cookie);
        let t = token.to_string();
        self.conn
            .io
            .write_op(
                POOL_OBJ,
                &[
                    WriteStep::Exec("lock", "assert_locked", &input),
                    WriteStep::CmpXattrEq(EPOCH, &old),
                    WriteStep::SetXattr(EPOCH, t.as_bytes()),
                ],
            )
            .map_err(|e| self.err(POOL_OBJ, "advance lease epoch", e))?;
        lk(&self.tenures).insert(token, lease.cookie.clone());
        Ok(ExclusiveGuard::new(
            token,
            Tenure {
                token,
                tenures: Arc::clone(&self.tenures),
                _lease: lease,
            },
        ))
    }

    fn check_fence(&self, guard: &ExclusiveGuard, op: &'static str) -> Result<()> {
        self.fenced(guard, op, &[])
    }
}

impl ChangeJournal for RbdBackend {
    fn journal_append(&self, guard: &ExclusiveGuard, change: &Change) -> Result<JournalCursor> {
        // Taken: a failure below leaves no cached head.
        let cookie = lk(&self.tenures).get(&guard.token()).cloned();
        let cached = lk(&self.jhead)
            .take()
            .filter(|(c, _)| Some(c) == cookie.as_ref())
            .map(|(_, h)| h);
        let mut head = match cached {
            Some(h) => h,
            None => self.journal_head()?,
        };
        if head.len >= self.opts.journal_max {
            // Compaction: a new generation; readers of the old one rescan.
            let old: Vec<String> = self
                .omap_prefix("j.")?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            head = JournalHead {
                epoch: head.epoch.wrapping_add(1),
                len: 0,
            };
            let kv = [(
                "jhead".to_string(),
                serde_json::to_vec(&head).map_err(|e| self.json_err(e))?,
            )];
            self.fenced(
                guard,
                "compact journal",
                &[WriteStep::OmapRm(&old), WriteStep::OmapSet(&kv)],
            )?;
        }
        let next = JournalHead {
            epoch: head.epoch,
            len: head.len + 1,
        };
        let kv = [
            (
                format!("j.{:016x}", head.len),
                serde_json::to_vec(change).map_err(|e| self.json_err(e))?,
            ),
            (
                "jhead".to_string(),
                serde_json::to_vec(&next).map_err(|e| self.json_err(e))?,
            ),
        ];
        self.fenced(guard, "append to journal", &[WriteStep::OmapSet(&kv)])?;
        if let Some(c) = cookie {
            *lk(&self.jhead) = Some((c, next));
        }
        Ok(JournalCursor {
            epoch: next.epoch,
            offset: next.len,
        })
    }

    fn journal_read(&self, since: JournalCursor) -> Result<JournalRead> {
        let head = self.journal_head()?;
        let now = JournalCursor {
            epoch: head.epoch,
            offset: head.len,
        };
        if since.epoch != now.epoch || since.offset > now.offset {
            return Ok(JournalRead::Reset(now));
        }
        if since.offset == now.offset {
            return Ok(JournalRead::Changes(Vec::new(), now));
        }
        let after = match since.offset {
            0 => String::new(),
            n => format!("j.{:016x}", n - 1),
        };
        let mut out = Vec::new();
        let mut from = after;
        loop {
            let (page, more) = self
                .conn
                .io
                .omap_get(POOL_OBJ, &from, "j.", 1000)
                .map_err(|e| self.err(POOL_OBJ, "read journal", e))?;
            let Some(last) = page.last().map(|(k, _)| k.clone()) else {
                break;
            };
            for (k, v) in page {
                let off = u64::from_str_radix(k.trim_start_matches("j."), 16).unwrap_or(u64::MAX);
                if off >= now.offset {
                    continue;
                }
                match serde_json::from_slice::<Change>(&v) {
                    Ok(c) => out.push(c),
                    Err(_) => return Ok(JournalRead::Reset(now)),
                }
            }
            if !more {
                break;
            }
            from = last;
        }
        Ok(JournalRead::Changes(out, now))
    }
}

impl RbdBackend {
    /// Clients whose session lease lapsed (dead, or stalled past their
    /// lease): their session keys and their addresses, with `extra` (the
    /// addresses of dead staging areas, whose session may be forgotten
    /// already); never this client's own address.
    fn dead_clients(&self, extra: &[String]) -> Result<(Vec<SessionKey>, Vec<String>)> {
        let own = self.conn.cluster.addrs().unwrap_or_default();
        let mut keys = Vec::new();
        let mut addrs: Vec<String> = extra.to_vec();
        for (k, v) in self.omap_prefix("c.")? {
            let Ok(id) = uuid::Uuid::parse_str(&k[2..]) else {
                continue;
            };
            if !self.live_holders(id)? {
                keys.push((k, id));
                addrs.push(String::from_utf8_lossy(&v).into_owned());
            }
        }
        addrs.retain(|a| !a.is_empty() && !same_addr(a, &own));
        addrs.sort_unstable();
        addrs.dedup();
        Ok((keys, addrs))
    }

    /// Blocklists `addrs` at the OSDs: their watches go (else removing an
    /// image a dead client had open waits for the OSDs' watch timeout),
    /// librbd may break the image locks they held, and anything they still
    /// send is refused. librados returns once its OSD map carries the
    /// blocklist. Whether all were blocklisted.
    fn blocklist(&self, addrs: &[String], out: Option<&mut Vec<Recovered>>) -> bool {
        let mut all = true;
        let mut done = Vec::new();
        for a in addrs {
            match self.conn.cluster.blocklist(a, 3600) {
                Ok(()) => done.push(a),
                Err(_) => all = false,
            }
        }
        if let Some(out) = out {
            out.extend(done.into_iter().map(|a| {
                Recovered {
                    path: PathBuf::from(a),
                    what: "client of a lapsed lease blocklisted (its watches and image locks go \
                       with it)"
                        .into(),
                }
            }));
        }
        all
    }

    /// Waits until none of `dead` watches any of `images`, blocklisting
    /// them again meanwhile (each blocklist is a new OSD map, and an OSD
    /// drops blocklisted watchers when it takes one that adds entries; it
    /// seems to check the newest map of a batch only, and RBD snapshots
    /// make maps all the time). Gives up after 3 s: what is still watched
    /// then is left for the next recovery. A watch the OSD recorded after
    /// its client's connection was gone (a kill while the watch op was in
    /// flight) has no timer and is not seen by the blocklist check until
    /// the OSD reloads that object's context: no client can remove it.
    fn wait_unwatched(&self, images: &[String], dead: &[String], out: &mut Vec<Recovered>) {
        let watchers = |name: &String| {
            crate::ffi::Image::open(&self.conn.io, name, true).and_then(|io| io.watchers())
        };
        let until = Instant::now() + Duration::from_secs(3);
        let mut left: Vec<&String> = images.iter().collect();
        let mut rounds = 0;
        loop {
            left.retain(|n| {
                watchers(n).is_ok_and(|w| w.iter().any(|a| dead.iter().any(|d| same_addr(a, d))))
            });
            if left.is_empty() || Instant::now() >= until {
                break;
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(50));
            self.blocklist(dead, None);
        }
        for n in left {
            out.push(Recovered {
                path: self.conn.label(n),
                what: format!(
                    "still watched by a blocklisted client after {rounds} more blocklists: {:?}",
                    watchers(n)
                ),
            });
        }
        if rounds > 0 {
            out.push(Recovered {
                path: self.conn.label(""),
                what: format!(
                    "dead clients blocklisted {rounds} more times until their watches went"
                ),
            });
        }
    }

    /// Forgets dead sessions (after they were fenced).
    fn forget_sessions(&self, guard: &ExclusiveGuard, keys: &[SessionKey]) -> Result<()> {
        for (k, id) in keys {
            self.fenced(
                guard,
                "recover pool",
                &[WriteStep::OmapRm(std::slice::from_ref(k))],
            )?;
            let _ = self.conn.io.remove(&live_oid(*id));
        }
        Ok(())
    }

    fn journal_head(&self) -> Result<JournalHead> {
        match self.omap_one("jhead")? {
            Some(b) => serde_json::from_slice(&b).map_err(|e| Error::Damaged {
                path: self.conn.label("vmvol.pool#jhead"),
                reason: e.to_string(),
            }),
            None => Ok(JournalHead { epoch: 1, len: 0 }),
        }
    }

    fn json_err(&self, e: serde_json::Error) -> Error {
        Error::Damaged {
            path: self.location.clone(),
            reason: e.to_string(),
        }
    }

    /// Stores raw record bytes (or removes the record) of entry `kind/id`
    /// behind the API's back: a test hook for damaged records.
    pub fn put_raw_record(&self, kind: EntryKind, id: &str, bytes: Option<&[u8]>) -> Result<()> {
        let r = match bytes {
            Some(b) => {
                let kv = [(record_key(kind, id), b.to_vec())];
                self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapSet(&kv)])
            }
            None => {
                let k = [record_key(kind, id)];
                self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)])
            }
        };
        r.map_err(|e| self.err(POOL_OBJ, "store raw record", e))
    }
}

impl RecordStore for RbdBackend {
    fn config_path(&self) -> PathBuf {
        self.conn.label("vmvol.pool#config")
    }

    fn read_config(&self) -> Result<Vec<u8>> {
        match self.omap_one("config") {
            Ok(Some(b)) => Ok(b),
            Ok(None) => Err(self.err("vmvol.pool#config", "read pool config", Errno(libc::ENOENT))),
            Err(e) => Err(e),
        }
    }

    fn write_config(&self, guard: &ExclusiveGuard, bytes: &[u8]) -> Result<()> {
        let kv = [("config".to_string(), bytes.to_vec())];
        self.fenced(guard, "write pool config", &[WriteStep::OmapSet(&kv)])
    }

    fn list_ids(&self, kind: EntryKind) -> Result<Vec<String>> {
        let prefix = format!("e.{}.", kind_str(kind));
        Ok(self
            .omap_prefix(&prefix)?
            .into_iter()
            .map(|(k, _)| k[prefix.len()..].to_string())
            .collect())
    }

    fn scan_entry(
        &self,
        kind: EntryKind,
        id: &str,
        _clean: Option<&ExclusiveGuard>,
    ) -> Result<Option<ScannedEntry>> {
        // Entry marker and record in one read.
        let (ek, rk) = (entry_key(kind, id), record_key(kind, id));
        let kv = self
            .conn
            .io
            .omap_get_keys(POOL_OBJ, &[&ek, &rk])
            .map_err(|e| self.err(POOL_OBJ, "read pool object", e))?;
        let Some(has_views) = kv
            .iter()
            .find(|(k, _)| *k == ek)
            .map(|(_, v)| v.as_slice() == native::HAS_VIEWS)
        else {
            return Ok(None);
        };
        let record = kv
            .into_iter()
            .find(|(k, _)| *k == rk)
            .map(|(_, v)| v)
            .ok_or_else(|| "record missing".to_string());
        let mut images: Vec<ImageSummary> = self
            .entry_images(kind, id)?
            .into_iter()
            .map(|(_, r, rbd_id)| self.quick_summary(&r, &rbd_id))
            .collect();
        if has_views {
            images.extend(
                self.entry_views(kind, id)?
                    .iter()
                    .map(|(_, r, v)| RbdBackend::view_summary(r, v)),
            );
        }
        images.sort_by(|a, b| a.image.name.cmp(&b.image.name));
        let rec_len = record.as_ref().map_or(0, |r| r.len() as u64);
        Ok(Some(ScannedEntry {
            record_path: self
                .conn
                .label(&format!("vmvol.pool#{}", record_key(kind, id))),
            record,
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
        if self.omap_one(&entry_key(kind, id))?.is_none() {
            return Err(self.err(
                &format!("vmvol.pool#{}", entry_key(kind, id)),
                "write record",
                Errno(libc::ENOENT),
            ));
        }
        let kv = [(record_key(kind, id), bytes.to_vec())];
        self.fenced(guard, "write record", &[WriteStep::OmapSet(&kv)])
    }

    fn commit_staging(
        &self,
        guard: &ExclusiveGuard,
        area: &StagingArea,
        kind: EntryKind,
        id: &str,
        record: &[u8],
    ) -> Result<()> {
        if self.omap_one(&entry_key(kind, id))?.is_some() {
            return Err(self.err(
                &format!("vmvol.pool#{}", entry_key(kind, id)),
                "move staged entry into place",
                Errno(libc::EEXIST),
            ));
        }
        // Images first: a crash before the record leaves entry-named images
        // with no entry, which recovery removes. A stale holder is stopped
        // before it renames any (an empty area needs only the fenced write).
        let staged = self.area_images(area.id)?;
        if !staged.is_empty() {
            self.check_fence(guard, "commit entry")?;
        }
        for (name, r) in staged {
            let to = rbd_name(&r.committed(kind, id));
            self.conn
                .io
                .rbd_rename(&name, &to)
                .map_err(|e| self.image_err(&r, "move staged image into place", e))?;
        }
        // Staged native snapshots move by their keys, in the commit's op.
        let views = self.area_views(area.id)?;
        let mut kv = vec![
            (
                entry_key(kind, id),
                if views.is_empty() {
                    Vec::new()
                } else {
                    native::HAS_VIEWS.to_vec()
                },
            ),
            (record_key(kind, id), record.to_vec()),
        ];
        let mut rm = vec![format!("s.{}", area.id.simple())];
        for (k, r, v) in views {
            let bytes = serde_json::to_vec(&v).map_err(|e| self.json_err(e))?;
            kv.push((native::view_key_of(&r.committed(kind, id)), bytes));
            rm.push(k);
        }
        self.fenced(
            guard,
            "commit entry",
            &[WriteStep::OmapSet(&kv), WriteStep::OmapRm(&rm)],
        )
    }

    fn remove_entry(&self, guard: &ExclusiveGuard, kind: EntryKind, id: &str) -> Result<()> {
        if self.omap_one(&entry_key(kind, id))?.is_none() {
            return Err(self.err(
                &format!("vmvol.pool#{}", entry_key(kind, id)),
                "remove entry",
                Errno(libc::ENOENT),
            ));
        }
        self.check_fence(guard, "remove entry")?;
        let mine: Vec<ImageRef> = self
            .entry_images(kind, id)?
            .into_iter()
            .map(|(_, r, _)| r)
            .collect();
        let views = self.entry_views(kind, id)?;
        // Refuse before removing anything if a clone depends on an image
        // or on a native snapshot (native snapshots of the entry's images
        // are other entries': they stay).
        for r in &mine {
            let io = self.open_plain(r, true)?;
            self.drop_snapshots(&r.to_string(), io.raw(), false)?;
        }
        for (_, r, v) in &views {
            self.unprotect_view(r, v)?;
        }
        // The entry goes first (atomically); a crash or failure after it
        // leaves images and snapshots of no entry, which recovery removes.
        let rm = [entry_key(kind, id), record_key(kind, id)];
        self.fenced(guard, "remove entry", &[WriteStep::OmapRm(&rm)])?;
        for r in &mine {
            let _ = self.remove_rbd(r);
        }
        for (k, r, v) in &views {
            let _ = self.drop_view(None, k, r, v);
        }
        Ok(())
    }

    fn destroy(&self, guard: ExclusiveGuard, _remove_dir: bool) -> Result<()> {
        for (k, _) in self.omap_prefix("s.")? {
            if let Ok(id) = uuid::Uuid::parse_str(&k[2..]) {
                self.remove_staged_images(id, None);
                let _ = self.conn.io.remove(&live_oid(id));
            }
        }
        self.fenced(&guard, "undefine pool", &[WriteStep::Remove])
    }
}

/// A staging area's or reservation's lease; dropping it releases the
/// lease, removes the marker and the liveness object.
struct LiveHold {
    backend_io: Arc<crate::ffi::IoCtx>,
    key: String,
    id: uuid::Uuid,
    lease: Option<Lease>,
}

impl Drop for LiveHold {
    fn drop(&mut self) {
        drop(self.lease.take());
        if !self.key.is_empty() {
            let k = [self.key.clone()];
            let _ = self.backend_io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)]);
        }
        let _ = self.backend_io.remove(&live_oid(self.id));
    }
}

impl Liveness for RbdBackend {
    fn create_staging(&self) -> Result<StagingArea> {
        let id = uuid::Uuid::new_v4();
        let lease = self.take_live(id)?;
        // Our address, so that recovery can fence us if we die holding
        // images open (their watches would block removal for minutes).
        let addr = self.conn.cluster.addrs().unwrap_or_default();
        self.put_pool_key(
            format!("s.{}", id.simple()),
            addr.into_bytes(),
            "record staging area",
        )?;
        Ok(StagingArea {
            id,
            // The marker stays until commit or recovery; the hold only
            // releases the lease.
            hold: LivenessHold::new(LiveHold {
                backend_io: Arc::clone(&self.conn.io),
                key: String::new(),
                id,
                lease: Some(lease),
            }),
        })
    }

    fn discard_staging(&self, area: &StagingArea) {
        self.remove_staged_images(area.id, None);
        let k = [format!("s.{}", area.id.simple())];
        let _ = self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)]);
    }

    fn live_staging(&self) -> Result<usize> {
        let mut n = 0;
        for (k, _) in self.omap_prefix("s.")? {
            if let Ok(id) = uuid::Uuid::parse_str(&k[2..]) {
                if self.live_holders(id)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn recover(&self, guard: &ExclusiveGuard) -> Result<Vec<Recovered>> {
        self.check_fence(guard, "recover pool")?;
        let mut out = Vec::new();
        // First what dead operations left, touching nothing.
        let mut live_areas = std::collections::HashSet::new();
        let mut dead_areas = Vec::new();
        for (k, v) in self.omap_prefix("s.")? {
            let Ok(id) = uuid::Uuid::parse_str(&k[2..]) else {
                continue;
            };
            if self.live_holders(id)? {
                live_areas.insert(id);
            } else {
                dead_areas.push((k, id, String::from_utf8_lossy(&v).into_owned()));
            }
        }
        // Link snapshots of operations that died before their clone existed
        // or while removing it (their staging area's or session's lease is
        // gone).
        let mut markers = Vec::new();
        for (k, v) in self.omap_prefix("l.")? {
            let Ok(m) = serde_json::from_slice::<LinkMarker>(&v) else {
                continue;
            };
            if !live_areas.contains(&m.area) && !self.live_holders(m.area)? {
                markers.push((k, m));
            }
        }
        // Images of no live staging area and of no entry: a crash between
        // creating or renaming them and the commit or cleanup.
        let entries: std::collections::HashSet<String> = self
            .omap_prefix("e.")?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let names = self.all_names()?;
        let mut strays: Vec<(String, ImageRef)> = names
            .iter()
            .filter_map(|n| parse_name(n).map(|r| (n.clone(), r)))
            .filter(|(_, r)| match &r.owner {
                ImageOwner::Staging { area } => !live_areas.contains(area),
                ImageOwner::Entry { kind, id } => !entries.contains(&entry_key(*kind, id)),
            })
            .collect();
        // Native snapshots of no entry (a crash after their entry went) and
        // held images that no snapshot views any more.
        let views = self.all_views()?;
        let is_orphan = |r: &ImageRef| match &r.owner {
            ImageOwner::Entry { kind, id } => !entries.contains(&entry_key(*kind, id)),
            ImageOwner::Staging { area } => !live_areas.contains(area),
        };
        let kept: std::collections::HashSet<String> = views
            .iter()
            .filter(|(_, r, _)| !is_orphan(r))
            .map(|(_, _, v)| v.image_id.clone())
            .collect();
        let orphan_views: Vec<_> = views.into_iter().filter(|(_, r, _)| is_orphan(r)).collect();
        // From the listing, not the directory: a held image whose removal
        // was interrupted is only in librbd's trash.
        let released: Vec<(String, String)> = names
            .iter()
            .filter_map(|n| Some((n.clone(), n.strip_prefix(HELD)?.to_string())))
            .filter(|(_, id)| !kept.contains(id))
            .collect();
        let mut fenced_sessions = Vec::new();
        if !dead_areas.is_empty()
            || !markers.is_empty()
            || !strays.is_empty()
            || !orphan_views.is_empty()
            || !released.is_empty()
        {
            // The dead clients may still hold those images open (their
            // watches outlive them by the OSDs' watch timeout) or locked:
            // fence them before touching anything.
            let area_addrs: Vec<String> = dead_areas.iter().map(|(_, _, a)| a.clone()).collect();
            let (keys, addrs) = self.dead_clients(&area_addrs)?;
            if self.blocklist(&addrs, Some(&mut out)) {
                fenced_sessions = keys;
            }
            let mut touch: Vec<String> = strays.iter().map(|(n, _)| n.clone()).collect();
            touch.extend(markers.iter().map(|(_, m)| m.base.clone()));
            for (_, _, v) in &orphan_views {
                touch.extend(self.name_of_id(&v.image_id)?);
            }
            touch.extend(released.iter().map(|(n, _)| n.clone()));
            touch.sort_unstable();
            touch.dedup();
            self.wait_unwatched(&touch, &addrs, &mut out);
        }
        // Snapshots before the strays: a stray an orphan snapshot views is
        // removed rather than held.
        let mut view_left = false;
        for (k, r, v) in &orphan_views {
            let at = self.conn.label(&format!("{}@{}", v.image_id, v.snap));
            match self.drop_view(None, k, r, v) {
                Ok(()) => out.push(Recovered {
                    path: at,
                    what: "snapshot of no entry left by a crashed operation".into(),
                }),
                Err(e) => {
                    view_left = true;
                    out.push(Recovered {
                        path: at,
                        what: format!("snapshot left for the next recovery: {e}"),
                    });
                }
            }
        }
        let mut last_err = HashMap::new();
        // Clones before their bases: passes while something goes. What
        // stays (a clone of it is not a stray) is retried by the next
        // recovery.
        while !strays.is_empty() {
            let before = strays.len();
            strays.retain(|(n, r)| match self.remove_rbd(r) {
                Ok(()) => {
                    out.push(Recovered {
                        path: self.conn.label(n),
                        what: match r.owner {
                            ImageOwner::Staging { .. } => {
                                "image of a staging area left by a dead operation".into()
                            }
                            ImageOwner::Entry { .. } => {
                                "image of no entry left by a crashed operation".into()
                            }
                        },
                    });
                    false
                }
                Err(e) => {
                    last_err.insert(n.clone(), e.to_string());
                    true
                }
            });
            if strays.len() == before {
                break;
            }
        }
        for (n, _) in &strays {
            out.push(Recovered {
                path: self.conn.label(n),
                what: format!(
                    "left for the next recovery: {}",
                    last_err.get(n).map_or("", String::as_str)
                ),
            });
        }
        // Held images whose last snapshot went before their release.
        for (name, id) in &released {
            if self.viewed(id)? || !self.all_names()?.contains(name) {
                continue; // viewed again, or released with an orphan snapshot
            }
            match self.remove_named(name, name) {
                Ok(()) => out.push(Recovered {
                    path: self.conn.label(name),
                    what: "image kept for snapshots that are gone".into(),
                }),
                Err(e) => {
                    view_left = true;
                    out.push(Recovered {
                        path: self.conn.label(name),
                        what: format!("held image left for the next recovery: {e}"),
                    });
                }
            }
        }
        // After the strays and held images: removing a clone may have
        // dropped a marker's snapshot already. A marker goes once its snapshot is
        // gone or a clone depends on it (that clone's removal takes it);
        // on an error it stays for the next recovery.
        let mut marker_left = false;
        for (k, m) in markers {
            let snap = &k[2..];
            match self.drop_link_snapshot(&m.base, snap) {
                Ok(state) => {
                    if state == LinkSnap::Gone {
                        out.push(Recovered {
                            path: self.conn.label(&format!("{}@{snap}", m.base)),
                            what: "link snapshot left by a dead operation".into(),
                        });
                    }
                    self.fenced(
                        guard,
                        "recover pool",
                        &[WriteStep::OmapRm(std::slice::from_ref(&k))],
                    )?;
                }
                Err(e) => {
                    marker_left = true;
                    out.push(Recovered {
                        path: self.conn.label(&format!("{}@{snap}", m.base)),
                        what: format!(
                            "link snapshot left for the next recovery: errno {} ({})",
                            e.0,
                            e.io()
                        ),
                    })
                }
            }
        }
        // The fenced sessions are forgotten once nothing of theirs is left
        // (else the next recovery blocklists them again).
        if strays.is_empty() && !marker_left && !view_left {
            self.forget_sessions(guard, &fenced_sessions)?;
        }
        // A dead area goes once none of its images is left.
        for (k, id, _) in dead_areas {
            if strays
                .iter()
                .any(|(_, r)| r.owner == (ImageOwner::Staging { area: id }))
            {
                continue;
            }
            self.fenced(
                guard,
                "recover pool",
                &[WriteStep::OmapRm(std::slice::from_ref(&k))],
            )?;
            let _ = self.conn.io.remove(&live_oid(id));
            out.push(Recovered {
                path: self.conn.label(&format!("staging/{}", id.simple())),
                what: "staging area left by a dead operation".into(),
            });
        }
        for (k, v) in self.omap_prefix("v.")? {
            let Ok(id) = uuid::Uuid::parse_str(&k[2..]) else {
                continue;
            };
            if self.live_holders(id)? {
                continue;
            }
            self.fenced(
                guard,
                "recover pool",
                &[WriteStep::OmapRm(std::slice::from_ref(&k))],
            )?;
            let _ = self.conn.io.remove(&live_oid(id));
            let bytes = serde_json::from_slice::<ReservationInfo>(&v).map_or(0, |i| i.bytes);
            out.push(Recovered {
                path: self.conn.label(&format!("reservations/{}", id.simple())),
                what: format!("reservation of {bytes} bytes left by a dead operation"),
            });
        }
        Ok(out)
    }

    fn create_reservation(
        &self,
        guard: &ExclusiveGuard,
        info: &ReservationInfo,
    ) -> Result<LivenessHold> {
        let lease = self.take_live(info.id)?;
        let key = format!("v.{}", info.id.simple());
        let kv = [(
            key.clone(),
            serde_json::to_vec(info).map_err(|e| self.json_err(e))?,
        )];
        let hold = LiveHold {
            backend_io: Arc::clone(&self.conn.io),
            key,
            id: info.id,
            lease: Some(lease),
        };
        self.fenced(guard, "reserve", &[WriteStep::OmapSet(&kv)])?;
        Ok(LivenessHold::new(hold))
    }

    fn live_reservations(&self, prune: Option<&ExclusiveGuard>) -> Result<Vec<ReservationInfo>> {
        let mut live = Vec::new();
        for (k, v) in self.omap_prefix("v.")? {
            let Ok(id) = uuid::Uuid::parse_str(&k[2..]) else {
                continue;
            };
            if self.live_holders(id)? {
                if let Ok(i) = serde_json::from_slice::<ReservationInfo>(&v) {
                    live.push(i);
                }
            } else if let Some(g) = prune {
                self.fenced(
                    g,
                    "prune reservations",
                    &[WriteStep::OmapRm(std::slice::from_ref(&k))],
                )?;
                let _ = self.conn.io.remove(&live_oid(id));
            }
        }
        Ok(live)
    }
}

/// A link snapshot of `base` (open as `b`, `size` bytes) that a new clone
/// may share instead of taking a snapshot of its own (snapshot create and
/// protect are most of a linked create's time): only for images of
/// templates and snapshots, which never change once committed, and only a
/// snapshot of the image's current size. A volume's image changes, so
/// each link to it gets its own snapshot.
fn shared_link(base: &ImageRef, b: &RbdImage, size: u64) -> Option<String> {
    let immutable = matches!(
        base.owner,
        ImageOwner::Entry {
            kind: EntryKind::Template | EntryKind::Snapshot,
            ..
        }
    );
    if !immutable {
        return None;
    }
    b.raw()
        .snaps()
        .ok()?
        .into_iter()
        .rev()
        .find(|(n, s)| n.starts_with(LINK_SNAP) && *s == size)
        .map(|(n, _)| n)
}

fn staged_ref(area: &StagingArea, name: &str, format: Format) -> Result<ImageRef> {
    validate_name(name)?;
    Ok(ImageRef {
        owner: ImageOwner::Staging { area: area.id },
        name: name.to_string(),
        format,
    })
}

impl RbdBackend {
    fn refuse_existing(&self, r: &ImageRef) -> Result<()> {
        let name = rbd_name(r);
        if self.images_prefixed(&name)?.iter().any(|(n, _)| *n == name) {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: "an image of that name already exists".into(),
            });
        }
        Ok(())
    }

    fn grow_any(&self, image: &ImageRef, new_size: u64) -> Result<()> {
        let io = self.open_raw(image, true)?;
        if new_size < io.size() {
            return Err(Error::Image {
                image: image.to_string(),
                op: "grow image",
                source: vmvol_format::Error::Shrink {
                    path: io.label().to_path_buf(),
                    current: io.size(),
                    requested: new_size,
                },
            });
        }
        io.resize(new_size).map_err(|e| Error::Image {
            image: image.to_string(),
            op: "grow image",
            source: e,
        })
    }
}

impl RbdBackend {
    /// RBD is thin: preallocation writes the zeros for real.
    fn preallocate(&self, r: &ImageRef, size: u64, ctl: &Control) -> Result<()> {
        let wrap = |e| Error::Image {
            image: r.to_string(),
            op: "preallocate image",
            source: e,
        };
        let io = self.open_raw(r, true)?;
        let chunk = vec![0u8; 4 << 20];
        let mut off = 0u64;
        while off < size {
            ctl.check(io.label(), "preallocate").map_err(wrap)?;
            let len = (size - off).min(chunk.len() as u64) as usize;
            io.write_at(&chunk[..len], off).map_err(wrap)?;
            off += len as u64;
            ctl.report(off, size);
        }
        io.flush().map_err(wrap)
    }
}

impl ImageStore for RbdBackend {
    /// RBD images are raw to their users; links are RBD clones of them.
    fn linked_format(&self) -> Format {
        Format::Raw
    }

    fn create_image(
        &self,
        area: &StagingArea,
        name: &str,
        spec: &ImageSpec,
        ctl: &Control,
    ) -> Result<ImageRef> {
        // Stored raw whatever was asked: the ref says what it is.
        let r = staged_ref(area, name, Format::Raw)?;
        if spec.format == Format::Qcow2 && spec.prealloc != Prealloc::Off {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: "preallocation applies to raw images only; qcow2 images are thin".into(),
            });
        }
        self.refuse_existing(&r)?;
        let n = rbd_name(&r);
        self.conn
            .io
            .rbd_create(&n, spec.size)
            .map_err(|e| self.image_err(&r, "create image", e))?;
        if spec.prealloc != Prealloc::Off {
            if let Err(e) = self.preallocate(&r, spec.size, ctl) {
                // Cancelled or failed: leave nothing behind.
                let _ = self.conn.io.rbd_remove(&n);
                return Err(e);
            }
        }
        Ok(r)
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
        let r = staged_ref(area, name, Format::Raw)?;
        self.refuse_existing(&r)?;
        if let Some(v) = self.view_of(base)? {
            return self.link_view(&r, base, &v, size);
        }
        let b = self.open_plain(base, true)?;
        let bsize = b.size();
        let size = size.unwrap_or(bsize);
        if size < bsize {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: format!("size {size} is smaller than its base's {bsize} bytes"),
            });
        }
        let features = b
            .raw()
            .features()
            .map_err(|e| self.image_err(base, "read features", e))?;
        if let Some(shared) = shared_link(base, &b, bsize) {
            // Anything but a clean clone (the snapshot went meanwhile, or
            // is not protected): make one of our own below.
            let cloned = self
                .conn
                .io
                .rbd_clone(&rbd_name(base), &shared, &rbd_name(&r), features);
            if cloned.is_ok() {
                drop(b);
                if size > bsize {
                    self.grow_any(&r, size)?;
                }
                return Ok(r);
            }
        }
        // A protected snapshot for this link: removing the last clone of it
        // removes it. Until the clone exists a marker names the snapshot,
        // so recovery can remove it if this process dies in between.
        let snap = format!("{LINK_SNAP}{}", uuid::Uuid::new_v4().simple());
        let marker = self.mark_link(&snap, &rbd_name(base), area.id)?;
        let unmark = || {
            let k = [marker.clone()];
            let _ = self.conn.io.write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)]);
        };
        let made = b
            .raw()
            .snap_create(&snap)
            .map_err(|e| self.image_err(base, "create snapshot", e))
            .and_then(|()| {
                b.raw()
                    .snap_protect(&snap)
                    .map_err(|e| self.image_err(base, "protect snapshot", e))
            })
            .and_then(|()| {
                self.conn
                    .io
                    .rbd_clone(&rbd_name(base), &snap, &rbd_name(&r), features)
                    .map_err(|e| self.image_err(&r, "clone image", e))
            });
        if let Err(e) = made {
            // The marker stays if the snapshot could not be dropped: the
            // recovery after this area's end retries.
            drop(b);
            if self.drop_link_snapshot(&rbd_name(base), &snap).is_ok() {
                unmark();
            }
            return Err(e);
        }
        unmark();
        if size > bsize {
            self.grow_any(&r, size)?;
        }
        Ok(r)
    }

    fn native_snapshots(&self) -> bool {
        true
    }

    fn snapshot_image(&self, area: &StagingArea, name: &str, image: &ImageRef) -> Result<ImageRef> {
        self.take_snapshot(area, name, image)
    }

    fn copy_full(
        &self,
        area: &StagingArea,
        name: &str,
        src: &ImageRef,
        _format: Format,
        ctl: &Control,
    ) -> Result<ImageRef> {
        // Stored raw whatever was asked: the ref says what it is.
        let r = staged_ref(area, name, Format::Raw)?;
        self.refuse_existing(&r)?;
        let s = self.open_raw(src, false)?;
        ctl.check(s.label(), "copy image")
            .map_err(|e| Error::Image {
                image: src.to_string(),
                op: "copy image",
                source: e,
            })?;
        // librbd's copy reads through the parent chain: the result stands alone.
        s.raw()
            .copy_to(&rbd_name(&r))
            .map_err(|e| self.image_err(&r, "copy image", e))?;
        ctl.report(s.size(), s.size());
        Ok(r)
    }

    fn open_image(&self, image: &ImageRef, writable: bool) -> Result<Box<dyn BlockIo>> {
        Ok(Box::new(self.open_raw(image, writable)?))
    }

    fn grow_image(&self, guard: &ExclusiveGuard, image: &ImageRef, new_size: u64) -> Result<()> {
        self.check_fence(guard, "grow image")?;
        self.grow_any(image, new_size)
    }

    fn grow_staged(&self, area: &StagingArea, image: &ImageRef, new_size: u64) -> Result<()> {
        if image.owner != (ImageOwner::Staging { area: area.id }) {
            return Err(Error::InvalidImage {
                image: image.to_string(),
                reason: "not in this staging area".into(),
            });
        }
        self.grow_any(image, new_size)
    }

    fn image_summary(&self, image: &ImageRef) -> Result<ImageSummary> {
        if let Some(v) = self.view_of(image)? {
            return Ok(RbdBackend::view_summary(image, &v));
        }
        let s = self.summary(image, true);
        if s.virtual_size.is_none() {
            // Not found and other open failures are errors here.
            self.open_raw(image, false)?;
        }
        Ok(s)
    }

    /// RBD stores no qcow2: compaction here is the issue's "discard what
    /// the filesystem does not use, then sparsify": the unused ranges are
    /// zeroed (whole objects deallocated, partial ones written as zeros,
    /// a clone's parent stays hidden), then `rbd_sparsify` drops every
    /// all-zero 4 KiB block. `compression` does not apply (the cluster
    /// compresses, if configured, per pool).
    fn compact_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        opts: &vmvol_format::CompactOptions,
        ctl: &Control,
    ) -> Result<vmvol_format::CompactReport> {
        self.check_fence(guard, "compact image")?;
        let img = self.open_raw(image, true)?;
        let ierr = |source| Error::Image {
            image: image.to_string(),
            op: "compact image",
            source,
        };
        let what = PathBuf::from(image.to_string());
        let before = img.allocated().map_err(ierr)?;
        let size = img.size();
        for r in &opts.unused_ranges {
            ctl.check(&what, "compact image").map_err(ierr)?;
            let end = r.end().min(size);
            if r.offset < end {
                img.discard(r.offset, end - r.offset).map_err(ierr)?;
            }
        }
        img.sparsify(4096).map_err(ierr)?;
        img.flush().map_err(ierr)?;
        let after = img.allocated().map_err(ierr)?;
        Ok(vmvol_format::CompactReport {
            bytes_before: before,
            bytes_after: after,
            dropped_clusters: before.saturating_sub(after) / 4096,
            ..vmvol_format::CompactReport::default()
        })
    }

    fn remove_image(&self, guard: &ExclusiveGuard, image: &ImageRef) -> Result<()> {
        self.check_fence(guard, "remove image")?;
        if let Some(v) = self.view_of(image)? {
            return self.drop_view(Some(guard), &native::view_key_of(image), image, &v);
        }
        self.remove_rbd(image)
    }

    fn attach_target(&self, image: &ImageRef) -> Result<AttachTarget> {
        let (name, snapshot) = match self.view_of(image)? {
            Some(v) => {
                self.open_view(image, &v)?;
                let name = self
                    .name_of_id(&v.image_id)?
                    .ok_or_else(|| Error::ImageNotFound {
                        image: image.to_string(),
                    })?;
                (name, Some(v.snap))
            }
            None => {
                self.open_plain(image, false)?;
                (rbd_name(image), None)
            }
        };
        // What qemu's rbd driver opens; the image is raw to the guest
        // whatever its label (a linked image is an RBD clone).
        let spec = self.conn.spec();
        Ok(AttachTarget::Rbd(vmvol_pool::RbdTarget {
            pool: spec.pool.clone(),
            namespace: spec.namespace.clone(),
            image: name,
            snapshot,
            conf: spec.conf.clone(),
            user: Some(spec.id.clone()).filter(|id| !id.is_empty()),
        }))
    }

    fn move_image(
        &self,
        guard: &ExclusiveGuard,
        image: &ImageRef,
        kind: EntryKind,
        id: &str,
        name: &str,
    ) -> Result<ImageRef> {
        validate_name(name)?;
        let to = ImageRef::entry(kind, id, name, image.format);
        if self.omap_one(&entry_key(kind, id))?.is_none() {
            return Err(Error::InvalidImage {
                image: to.to_string(),
                reason: "the destination entry does not exist".into(),
            });
        }
        self.refuse_existing(&to)?;
        if let Some(v) = self.view_of(image)? {
            // A native snapshot moves by its key, in one fenced step.
            let from = [native::view_key_of(image)];
            let bytes = serde_json::to_vec(&v).map_err(|e| self.json_err(e))?;
            let kv = [
                (native::view_key(kind, id, name), bytes),
                (entry_key(kind, id), native::HAS_VIEWS.to_vec()),
            ];
            self.fenced(
                guard,
                "move image",
                &[WriteStep::OmapRm(&from), WriteStep::OmapSet(&kv)],
            )?;
            return Ok(to);
        }
        self.check_fence(guard, "move image")?;
        self.conn
            .io
            .rbd_rename(&rbd_name(image), &rbd_name(&to))
            .map_err(|e| self.image_err(image, "move image", e))?;
        Ok(to)
    }
}

/// One pool of `osd pool ls detail` (a monitor command: it works without a
/// mgr, unlike `get-quota` and `df`).
#[derive(Deserialize)]
struct PoolWire {
    pool_name: String,
    #[serde(default)]
    quota_max_bytes: u64,
}

impl SpaceFigures for RbdBackend {
    fn fs_stats(&self) -> Result<FsStats> {
        let pool = &self.conn.spec().pool;
        let cmd = r#"{"prefix": "osd pool ls", "detail": "detail", "format": "json"}"#;
        let (out, _) = self
            .conn
            .cluster
            .mon_command(cmd)
            .map_err(|e| self.err("", "read pool quota (osd pool ls detail)", e))?;
        let quota = serde_json::from_slice::<Vec<PoolWire>>(&out)
            .map_err(|e| self.json_err(e))?
            .into_iter()
            .find(|p| p.pool_name == *pool)
            .map_or(0, |p| p.quota_max_bytes);
        let (total, _used, avail) = self.conn.cluster.stat().unwrap_or((0, 0, 0));
        // Bytes our images hold (RBD's own accounting); the cluster's
        // figures need a mgr and are zero without one.
        let held: u64 = self
            .held_images()?
            .iter()
            .filter_map(|(_, id)| crate::figures::quick_figures(&self.conn.io, id))
            .map(|(_, bytes)| bytes)
            .fold(0u64, u64::saturating_add);
        let used = self
            .images_with_ids("")?
            .iter()
            .map(|(_, r, id)| self.quick_summary(r, id).host_bytes)
            .fold(held, u64::saturating_add);
        let (total, available) = match (quota, total) {
            (q, t) if q > 0 && t > 0 => (q, q.saturating_sub(used).min(avail)),
            (q, _) if q > 0 => (q, q.saturating_sub(used)),
            (_, t) => (t, avail),
        };
        Ok(FsStats {
            total,
            available,
            block_size: 4 << 20,
        })
    }

    fn base_physical(&self) -> Result<u64> {
        let staged = self
            .images_with_ids("s+")?
            .iter()
            .filter(|(_, r, _)| matches!(r.owner, ImageOwner::Staging { .. }))
            .map(|(_, r, id)| self.quick_summary(r, id).host_bytes)
            .fold(0u64, u64::saturating_add);
        Ok(staged.saturating_add(self.read_config()?.len() as u64))
    }
}
