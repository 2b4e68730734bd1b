//! Native snapshots: an entry's image that is an RBD snapshot of another
//! entry's image (a snapshot entry's view of its volume's image).
//!
//! ```text
//! omap n.<kind>.<id>.<name>   the view: image id, snapshot name, size, features
//! omap n.staging.<area>.<name>  a view staged in a staging area
//! RBD snapshot vmvol-snap-<area>.<name> of the viewed image (protected, so
//!                             linked images can clone it)
//! RBD image h+<rbd id>        an image kept for its snapshots after its entry
//!                             went ("held"); removed with the last of them
//! ```
//! A snapshot is taken into a staging area and committed with its entry,
//! like any staged image. The view names the image by its RBD id, which
//! survives renames: when the volume is deleted while snapshots of it
//! remain, its image is renamed to `h+<id>` instead of removed (where
//! Cinder's RBD driver refuses the delete). Order of every change, so that
//! a crash at any point leaves something recovery finishes: take — a marker
//! `l.<snap>` of the staging area (as for link snapshots), the snapshot,
//! then the staged key and the marker's removal in one op (recovery drops
//! the snapshot of a dead area's marker, and dead areas' views); commit —
//! staged keys become the entry's in the commit's fenced op; drop —
//! snapshot, then key, then the held image if that was its last snapshot.

use serde::{Deserialize, Serialize};
use vmvol_format::{BlockIo, Format};
use vmvol_pool::backend::{ExclusiveGuard, StagingArea};
use vmvol_pool::{EntryKind, Error, ImageOwner, ImageRef, ImageSummary, Result};

use super::{kind_of, kind_str, RbdBackend, POOL_OBJ, RBD_DIRECTORY};
use crate::ffi::{Errno, Image, WriteStep};
use crate::image::RbdImage;

/// Prefix of the RBD snapshots that are native snapshots.
pub(super) const NATIVE_SNAP: &str = "vmvol-snap-";
/// Prefix of held images (`h+<rbd id>`).
pub(super) const HELD: &str = "h+";
/// Value of an entry's marker once it has views (set with its first view,
/// never cleared): scans list views only of such entries, saving a read
/// per scan of every other entry.
pub(super) const HAS_VIEWS: &[u8] = b"views";

/// A view: what key `n.<kind>.<id>.<name>` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct View {
    /// RBD id of the image the snapshot is of.
    pub image_id: String,
    /// The RBD snapshot.
    pub snap: String,
    /// Virtual size at the snapshot.
    pub size: u64,
    /// The image's features (a clone of the snapshot gets them).
    pub features: u64,
    /// Format the view is labelled with (what the image was).
    pub format: Format,
}

/// A native snapshot of the pool, as [`RbdBackend::native_snapshots_of_pool`]
/// lists it (tools and tests compare it with `rbd snap ls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NativeSnapshot {
    /// The entry image it is.
    pub image: ImageRef,
    /// RBD id of the image it is a snapshot of.
    pub rbd_id: String,
    /// That image's RBD name now (`h+<id>` once held), if it exists.
    pub rbd_image: Option<String>,
    /// The RBD snapshot's name.
    pub rbd_snapshot: String,
}

/// Owner part of a staged view's key (`n.staging.<area>.<name>`).
const STAGED: &str = "staging";

pub(super) fn view_key(kind: EntryKind, id: &str, name: &str) -> String {
    format!("n.{}.{id}.{name}", kind_str(kind))
}

/// The view key of image `r` (an entry's or a staging area's).
pub(super) fn view_key_of(r: &ImageRef) -> String {
    match &r.owner {
        ImageOwner::Entry { kind, id } => view_key(*kind, id, &r.name),
        ImageOwner::Staging { area } => staged_prefix(*area) + &r.name,
    }
}

/// Key prefix of staging area `area`'s views.
pub(super) fn staged_prefix(area: uuid::Uuid) -> String {
    format!("n.{STAGED}.{}.", area.simple())
}

/// The image a view key stands for.
fn parse_view_key(k: &str, format: Format) -> Option<ImageRef> {
    let mut parts = k.strip_prefix("n.")?.splitn(3, '.');
    let (owner, id, name) = (parts.next()?, parts.next()?, parts.next()?);
    if owner == STAGED {
        return Some(ImageRef {
            owner: ImageOwner::Staging {
                area: uuid::Uuid::parse_str(id).ok()?,
            },
            name: name.to_string(),
            format,
        });
    }
    Some(ImageRef::entry(kind_of(owner)?, id, name, format))
}

/// Decodes a librbd directory value (u32 length, then the string).
pub(super) fn dir_string(v: &[u8]) -> Option<String> {
    let len = v
        .get(..4)
        .and_then(|l| <[u8; 4]>::try_from(l).ok())
        .map(u32::from_le_bytes)?;
    let s = v.get(4..)?;
    (len as usize == s.len()).then(|| String::from_utf8_lossy(s).into_owned())
}

impl RbdBackend {
    fn decode_view(&self, bytes: &[u8]) -> Result<View> {
        serde_json::from_slice(bytes).map_err(|e| self.json_err(e))
    }

    /// The view `image` stands for, if it is one (one read).
    pub(super) fn view_of(&self, image: &ImageRef) -> Result<Option<View>> {
        match self.omap_one(&view_key_of(image))? {
            Some(v) => Ok(Some(self.decode_view(&v)?)),
            None => Ok(None),
        }
    }

    /// The views of entry `kind/id`: (key, image, view).
    pub(super) fn entry_views(
        &self,
        kind: EntryKind,
        id: &str,
    ) -> Result<Vec<(String, ImageRef, View)>> {
        let mut out = Vec::new();
        for (k, bytes) in self.omap_prefix(&format!("n.{}.{id}.", kind_str(kind)))? {
            let v = self.decode_view(&bytes)?;
            if let Some(r) = parse_view_key(&k, v.format) {
                out.push((k, r, v));
            }
        }
        Ok(out)
    }

    /// The views staged in `area`: (key, image, view).
    pub(super) fn area_views(&self, area: uuid::Uuid) -> Result<Vec<(String, ImageRef, View)>> {
        let mut out = Vec::new();
        for (k, bytes) in self.omap_prefix(&staged_prefix(area))? {
            let v = self.decode_view(&bytes)?;
            if let Some(r) = parse_view_key(&k, v.format) {
                out.push((k, r, v));
            }
        }
        Ok(out)
    }

    /// Every view of the pool (undecodable ones skipped).
    pub(super) fn all_views(&self) -> Result<Vec<(String, ImageRef, View)>> {
        Ok(self
            .omap_prefix("n.")?
            .into_iter()
            .filter_map(|(k, bytes)| {
                let v: View = serde_json::from_slice(&bytes).ok()?;
                let r = parse_view_key(&k, v.format)?;
                Some((k, r, v))
            })
            .collect())
    }

    /// The RBD name of the image of id `image_id`, if it exists.
    pub(super) fn name_of_id(&self, image_id: &str) -> Result<Option<String>> {
        let key = format!("id_{image_id}");
        match self.conn.io.omap_get_keys(RBD_DIRECTORY, &[&key]) {
            Ok(kv) => Ok(kv
                .into_iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| dir_string(&v))),
            Err(Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(self.err(RBD_DIRECTORY, "look up image id", e)),
        }
    }

    /// Held images: (RBD name, RBD id).
    pub(super) fn held_images(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .directory(HELD)?
            .into_iter()
            .filter(|(_, id)| !id.is_empty())
            .collect())
    }

    /// What a scan reports of a view: from its key, no image opened. Its
    /// blocks are the viewed image's (RBD charges the image, not the
    /// snapshot), so it holds no host bytes of its own.
    pub(super) fn view_summary(image: &ImageRef, v: &View) -> ImageSummary {
        ImageSummary {
            image: image.clone(),
            virtual_size: Some(v.size),
            host_bytes: 0,
            backing: None,
            error: None,
        }
    }

    /// Opens a view (read-only: the image at its snapshot).
    pub(super) fn open_view(&self, image: &ImageRef, v: &View) -> Result<RbdImage> {
        let label = self.conn.label(&format!("{}@{}", v.image_id, v.snap));
        RbdImage::open_snapshot(&self.conn.io, &v.image_id, &v.snap, label)
            .map_err(|e| super::open_error(image, e))
    }

    /// The seam's `snapshot_image`: a snapshot of `image` as view `name`
    /// of staging area `area`. A marker of the area names the snapshot
    /// until the view's key exists (key set and marker dropped in one op),
    /// so recovery drops the snapshot of an area that died in between; the
    /// view itself goes with its area unless committed.
    pub(super) fn take_snapshot(
        &self,
        area: &StagingArea,
        name: &str,
        image: &ImageRef,
    ) -> Result<ImageRef> {
        vmvol_pool::validate_name(name)?;
        let to = ImageRef {
            owner: ImageOwner::Staging { area: area.id },
            name: name.to_string(),
            format: image.format,
        };
        if self.view_of(&to)?.is_some() {
            return Err(Error::InvalidImage {
                image: to.to_string(),
                reason: "an image of that name already exists".into(),
            });
        }
        self.refuse_existing(&to)?;
        let io = self.open_plain(image, true)?;
        let raw = io.raw();
        let v = View {
            image_id: raw
                .id()
                .map_err(|e| self.image_err(image, "read image id", e))?,
            snap: format!("{NATIVE_SNAP}{}.{name}", area.id.simple()),
            size: io.size(),
            features: raw
                .features()
                .map_err(|e| self.image_err(image, "read features", e))?,
            format: image.format,
        };
        let bytes = serde_json::to_vec(&v).map_err(|e| self.json_err(e))?;
        let base = super::rbd_name(image);
        let marker = [self.mark_link(&v.snap, &base, area.id)?];
        let made = self.make_view_snap(raw, &to, &v.snap).and_then(|()| {
            self.conn
                .io
                .write_op(
                    POOL_OBJ,
                    &[
                        WriteStep::AssertExists,
                        WriteStep::OmapSet(&[(view_key_of(&to), bytes)]),
                        WriteStep::OmapRm(&marker),
                    ],
                )
                .map_err(|e| self.err(POOL_OBJ, "record snapshot", e))
        });
        if let Err(e) = made {
            // Undo now if we can; else the marker lets recovery do it.
            drop(io);
            if self.drop_link_snapshot(&base, &v.snap).is_ok() {
                let _ = self
                    .conn
                    .io
                    .write_op(POOL_OBJ, &[WriteStep::OmapRm(&marker)]);
            }
            return Err(e);
        }
        Ok(to)
    }

    /// Creates and protects snapshot `snap` of `img` unless done already.
    fn make_view_snap(&self, img: &Image, to: &ImageRef, snap: &str) -> Result<()> {
        match img.snap_create(snap) {
            Ok(()) | Err(Errno(libc::EEXIST)) => {}
            Err(e) => return Err(self.image_err(to, "create snapshot", e)),
        }
        match img.snap_protect(snap) {
            // EBUSY: protected already.
            Ok(()) | Err(Errno(libc::EBUSY)) => Ok(()),
            Err(e) => Err(self.image_err(to, "protect snapshot", e)),
        }
    }

    /// A clone of view `base` as staged image `r` (`size` at least the
    /// view's): the view's own snapshot is the clone's parent.
    pub(super) fn link_view(
        &self,
        r: &ImageRef,
        base: &ImageRef,
        v: &View,
        size: Option<u64>,
    ) -> Result<ImageRef> {
        let size = size.unwrap_or(v.size);
        if size < v.size {
            return Err(Error::InvalidImage {
                image: r.to_string(),
                reason: format!("size {size} is smaller than its base's {} bytes", v.size),
            });
        }
        let parent = self
            .name_of_id(&v.image_id)?
            .ok_or_else(|| Error::ImageNotFound {
                image: base.to_string(),
            })?;
        let child = super::rbd_name(r);
        let clone = || self.conn.io.rbd_clone(&parent, &v.snap, &child, v.features);
        match clone() {
            Ok(()) => {}
            // Not protected (a refused removal unprotected it): again.
            Err(Errno(libc::EINVAL)) => {
                self.protect_view(base, v)?;
                clone().map_err(|e| self.image_err(r, "clone image", e))?;
            }
            Err(e) => return Err(self.image_err(r, "clone image", e)),
        }
        if size > v.size {
            self.grow_any(r, size)?;
        }
        Ok(r.clone())
    }

    /// Protects a view's snapshot again (a refused removal may have
    /// unprotected it); for links.
    pub(super) fn protect_view(&self, image: &ImageRef, v: &View) -> Result<()> {
        let img = Image::open_by_id(&self.conn.io, &v.image_id, None, false)
            .map_err(|e| self.image_err(image, "open snapshotted image", e))?;
        match img.snap_protect(&v.snap) {
            Ok(()) | Err(Errno(libc::EBUSY)) => Ok(()),
            Err(e) => Err(self.image_err(image, "protect snapshot", e)),
        }
    }

    /// Unprotects a view's snapshot: refused while linked images (clones of
    /// it) exist. Nothing is removed, so a refusal leaves all usable.
    pub(super) fn unprotect_view(&self, image: &ImageRef, v: &View) -> Result<()> {
        match Image::open_by_id(&self.conn.io, &v.image_id, None, false) {
            Ok(img) => self.unprotect_snap(&img, image, v),
            Err(Errno(libc::ENOENT)) => Ok(()),
            Err(e) => Err(self.image_err(image, "open snapshotted image", e)),
        }
    }

    fn unprotect_snap(&self, img: &Image, image: &ImageRef, v: &View) -> Result<()> {
        match img.snap_unprotect(&v.snap) {
            Ok(()) | Err(Errno(libc::EINVAL | libc::ENOENT)) => Ok(()),
            Err(Errno(libc::EBUSY)) => Err(Error::InvalidImage {
                image: image.to_string(),
                reason: format!(
                    "linked images depend on it (clones of RBD snapshot {}); remove them first",
                    v.snap
                ),
            }),
            Err(e) => Err(self.image_err(image, "unprotect snapshot", e)),
        }
    }

    /// Drops a view: its RBD snapshot, then its key (fenced under `guard`
    /// while its entry lives; a key of no entry is anyone's to drop), then
    /// the held image if that was its last snapshot. Each step idempotent;
    /// one open of the image (each open is a watch a crash can strand).
    pub(super) fn drop_view(
        &self,
        guard: Option<&ExclusiveGuard>,
        key: &str,
        image: &ImageRef,
        v: &View,
    ) -> Result<()> {
        match Image::open_by_id(&self.conn.io, &v.image_id, None, false) {
            Ok(img) => {
                self.unprotect_snap(&img, image, v)?;
                match img.snap_remove(&v.snap) {
                    Ok(()) | Err(Errno(libc::ENOENT)) => {}
                    Err(e) => return Err(self.image_err(image, "remove snapshot", e)),
                }
            }
            Err(Errno(libc::ENOENT)) => {}
            Err(e) => return Err(self.image_err(image, "open snapshotted image", e)),
        }
        let k = [key.to_string()];
        match guard {
            Some(g) => self.fenced(g, "remove snapshot", &[WriteStep::OmapRm(&k)])?,
            None => self
                .conn
                .io
                .write_op(POOL_OBJ, &[WriteStep::OmapRm(&k)])
                .map_err(|e| self.err(POOL_OBJ, "remove snapshot", e))?,
        }
        self.release_held(&v.image_id)
    }

    /// Removes held image `image_id` once no view names it.
    pub(super) fn release_held(&self, image_id: &str) -> Result<()> {
        let Some(name) = self.name_of_id(image_id)? else {
            return Ok(());
        };
        if !name.starts_with(HELD) || self.viewed(image_id)? {
            return Ok(());
        }
        self.remove_named(&name, &name)
    }

    /// Whether a view names the image of id `image_id`.
    pub(super) fn viewed(&self, image_id: &str) -> Result<bool> {
        Ok(self
            .all_views()?
            .iter()
            .any(|(_, _, v)| v.image_id == image_id))
    }

    /// If views name `img` (open as `name`), renames it to `h+<id>` (kept
    /// for them) and says so; else the caller removes it.
    pub(super) fn hold_if_viewed(&self, name: &str, img: &Image) -> Result<bool> {
        let snaps = img
            .snap_list()
            .map_err(|e| self.err(name, "list snapshots", e))?;
        if !snaps.iter().any(|s| s.starts_with(NATIVE_SNAP)) {
            return Ok(false);
        }
        let id = img.id().map_err(|e| self.err(name, "read image id", e))?;
        if !self.viewed(&id)? {
            return Ok(false);
        }
        if !name.starts_with(HELD) {
            let to = format!("{HELD}{id}");
            let rename = || self.conn.io.rbd_rename(name, &to);
            match rename() {
                Ok(()) => {}
                Err(Errno(libc::EEXIST)) if self.clear_stale_id_object(&to, &id)? => {
                    rename().map_err(|e| self.err(name, "keep image for its snapshots", e))?
                }
                Err(e) => return Err(self.err(name, "keep image for its snapshots", e)),
            }
        }
        Ok(true)
    }

    /// A rename killed midway leaves the destination's id object
    /// (`rbd_id.<name>`) behind, and librbd then refuses that name. `h+<id>`
    /// is only ever this image's: if no image has that name and the object
    /// names this image's id, it is removed (true: retry).
    fn clear_stale_id_object(&self, to: &str, id: &str) -> Result<bool> {
        let key = format!("{}{to}", super::DIR_NAME);
        let named = match self.conn.io.omap_get_keys(RBD_DIRECTORY, &[&key]) {
            Ok(kv) => kv.iter().any(|(k, _)| *k == key),
            Err(Errno(libc::ENOENT)) => false,
            Err(e) => return Err(self.err(RBD_DIRECTORY, "look up image name", e)),
        };
        let oid = format!("rbd_id.{to}");
        let stale = !named
            && match self.conn.io.read(&oid, 256) {
                Ok(b) => dir_string(&b).as_deref() == Some(id),
                Err(Errno(libc::ENOENT)) => false,
                Err(e) => return Err(self.err(&oid, "read image id object", e)),
            };
        if stale {
            match self.conn.io.remove(&oid) {
                Ok(()) | Err(Errno(libc::ENOENT)) => {}
                Err(e) => return Err(self.err(&oid, "remove stale image id object", e)),
            }
        }
        Ok(stale)
    }

    /// Every native snapshot of the pool, with the RBD image and snapshot
    /// behind it (for tools and tests; `rbd snap ls` shows the same).
    pub fn native_snapshots_of_pool(&self) -> Result<Vec<NativeSnapshot>> {
        let mut out = Vec::new();
        for (_, image, v) in self.all_views()? {
            out.push(NativeSnapshot {
                image,
                rbd_image: self.name_of_id(&v.image_id)?,
                rbd_id: v.image_id,
                rbd_snapshot: v.snap,
            });
        }
        Ok(out)
    }
}
