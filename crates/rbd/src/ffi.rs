//! The hand-written binding to librados/librbd (Ceph 16.2 "Pacific"): the
//! `extern "C"` declarations of the functions vmvol uses and safe wrappers
//! around them. Every `unsafe` block of the crate is in this module.
//!
//! Handles: a [`Cluster`] (`rados_t`) is shared by [`IoCtx`]s (`rados_ioctx_t`,
//! one pool + namespace), which are shared by open [`Image`]s (`rbd_image_t`).
//! librados and librbd handles are thread-safe, so the wrappers are `Send +
//! Sync`; each keeps its parent alive through an `Arc`.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type WriteOpT = *mut c_void;
type ReadOpT = *mut c_void;
type OmapIterT = *mut c_void;
type ImageT = *mut c_void;

#[repr(C)]
struct Timeval {
    tv_sec: i64,
    tv_usec: i64,
}

#[repr(C)]
#[derive(Default)]
struct ClusterStatT {
    kb: u64,
    kb_used: u64,
    kb_avail: u64,
    num_objects: u64,
}

#[repr(C)]
struct WatcherT {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

#[repr(C)]
struct SnapInfoT {
    id: u64,
    size: u64,
    name: *const c_char,
}

#[repr(C)]
struct LinkedImageSpecT {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

#[repr(C)]
struct SnapSpecT {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

type DiffCb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

#[link(name = "rados")]
extern "C" {
    fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_cluster_stat(cluster: RadosT, result: *mut ClusterStatT) -> c_int;
    fn rados_mon_command(
        cluster: RadosT,
        cmd: *const *const c_char,
        cmdlen: usize,
        inbuf: *const c_char,
        inbuflen: usize,
        outbuf: *mut *mut c_char,
        outbuflen: *mut usize,
        outs: *mut *mut c_char,
        outslen: *mut usize,
    ) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);
    fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
    fn rados_blocklist_add(cluster: RadosT, addr: *mut c_char, expire_seconds: u32) -> c_int;
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut IoCtxT) -> c_int;
    fn rados_ioctx_destroy(io: IoCtxT);
    fn rados_ioctx_set_namespace(io: IoCtxT, nspace: *const c_char);
    fn rados_remove(io: IoCtxT, oid: *const c_char) -> c_int;
    fn rados_getxattr(
        io: IoCtxT,
        oid: *const c_char,
        name: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_create_write_op() -> WriteOpT;
    fn rados_release_write_op(op: WriteOpT);
    fn rados_write_op_create(op: WriteOpT, exclusive: c_int, category: *const c_char);
    fn rados_write_op_assert_exists(op: WriteOpT);
    fn rados_write_op_cmpxattr(
        op: WriteOpT,
        name: *const c_char,
        comparison: u8,
        value: *const c_char,
        len: usize,
    );
    fn rados_write_op_setxattr(op: WriteOpT, name: *const c_char, value: *const c_char, len: usize);
    fn rados_write_op_exec(
        op: WriteOpT,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: usize,
        prval: *mut c_int,
    );
    fn rados_write_op_omap_set(
        op: WriteOpT,
        keys: *const *const c_char,
        vals: *const *const c_char,
        lens: *const usize,
        num: usize,
    );
    fn rados_write_op_omap_rm_keys(op: WriteOpT, keys: *const *const c_char, num: usize);
    fn rados_write_op_remove(op: WriteOpT);
    fn rados_write_op_operate(
        op: WriteOpT,
        io: IoCtxT,
        oid: *const c_char,
        mtime: *mut i64,
        flags: c_int,
    ) -> c_int;
    fn rados_create_read_op() -> ReadOpT;
    fn rados_release_read_op(op: ReadOpT);
    fn rados_read_op_omap_get_vals2(
        op: ReadOpT,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut OmapIterT,
        pmore: *mut u8,
        prval: *mut c_int,
    );
    fn rados_read_op_omap_get_vals_by_keys2(
        op: ReadOpT,
        keys: *const *const c_char,
        num_keys: usize,
        key_lens: *const usize,
        iter: *mut OmapIterT,
        prval: *mut c_int,
    );
    fn rados_read(io: IoCtxT, oid: *const c_char, buf: *mut c_char, len: usize, off: u64) -> c_int;
    fn rados_read_op_operate(op: ReadOpT, io: IoCtxT, oid: *const c_char, flags: c_int) -> c_int;
    fn rados_omap_get_next2(
        iter: OmapIterT,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut usize,
        val_len: *mut usize,
    ) -> c_int;
    fn rados_omap_get_end(iter: OmapIterT);
    fn rados_lock_exclusive(
        io: IoCtxT,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        desc: *const c_char,
        duration: *mut Timeval,
        flags: u8,
    ) -> c_int;
    fn rados_lock_shared(
        io: IoCtxT,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        tag: *const c_char,
        desc: *const c_char,
        duration: *mut Timeval,
        flags: u8,
    ) -> c_int;
    fn rados_unlock(
        io: IoCtxT,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
    ) -> c_int;
    fn rados_list_lockers(
        io: IoCtxT,
        oid: *const c_char,
        name: *const c_char,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut usize,
        clients: *mut c_char,
        clients_len: *mut usize,
        cookies: *mut c_char,
        cookies_len: *mut usize,
        addrs: *mut c_char,
        addrs_len: *mut usize,
    ) -> isize;
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_create(io: IoCtxT, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_clone(
        p_io: IoCtxT,
        p_name: *const c_char,
        p_snap: *const c_char,
        c_io: IoCtxT,
        c_name: *const c_char,
        features: u64,
        c_order: *mut c_int,
    ) -> c_int;
    fn rbd_remove(io: IoCtxT, name: *const c_char) -> c_int;
    fn rbd_rename(io: IoCtxT, src: *const c_char, dst: *const c_char) -> c_int;
    fn rbd_list(io: IoCtxT, names: *mut c_char, size: *mut usize) -> c_int;
    fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    fn rbd_open_read_only(
        io: IoCtxT,
        name: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_open_by_id(
        io: IoCtxT,
        id: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_open_by_id_read_only(
        io: IoCtxT,
        id: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    fn rbd_get_id(image: ImageT, id: *mut c_char, len: usize) -> c_int;
    fn rbd_close(image: ImageT) -> c_int;
    fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    fn rbd_get_features(image: ImageT, features: *mut u64) -> c_int;
    fn rbd_resize(image: ImageT, size: u64) -> c_int;
    fn rbd_read(image: ImageT, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: ImageT, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_write_zeroes(
        image: ImageT,
        ofs: u64,
        len: usize,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> isize;
    fn rbd_flush(image: ImageT) -> c_int;
    fn rbd_copy(image: ImageT, dest_io: IoCtxT, dest: *const c_char) -> c_int;
    fn rbd_sparsify(image: ImageT, sparse_size: usize) -> c_int;
    fn rbd_snap_create(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_snap_remove(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_snap_protect(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_snap_unprotect(image: ImageT, name: *const c_char) -> c_int;
    fn rbd_snap_list(image: ImageT, snaps: *mut SnapInfoT, max: *mut c_int) -> c_int;
    fn rbd_snap_list_end(snaps: *mut SnapInfoT);
    fn rbd_watchers_list(image: ImageT, watchers: *mut WatcherT, max: *mut usize) -> c_int;
    fn rbd_watchers_list_cleanup(watchers: *mut WatcherT, num: usize);
    fn rbd_get_parent(image: ImageT, parent: *mut LinkedImageSpecT, snap: *mut SnapSpecT) -> c_int;
    fn rbd_linked_image_spec_cleanup(spec: *mut LinkedImageSpecT);
    fn rbd_snap_spec_cleanup(spec: *mut SnapSpecT);
    fn rbd_diff_iterate2(
        image: ImageT,
        from_snap: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffCb,
        arg: *mut c_void,
    ) -> c_int;
}

/// A negative errno from librados/librbd, or a string the C API cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// As an `std::io::Error` (carries the errno's text).
    pub fn io(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }
}

/// A page of omap pairs and whether more follow.
pub type OmapPage = (Vec<(String, Vec<u8>)>, bool);

/// `Result` of the binding.
pub type R<T> = std::result::Result<T, Errno>;

fn check(rc: c_int) -> R<()> {
    if rc < 0 {
        Err(Errno(-rc))
    } else {
        Ok(())
    }
}

/// A C string of `s`; EINVAL if it holds a NUL (names are validated before
/// they get here, so this only guards the invariant).
fn cs(s: &str) -> R<CString> {
    CString::new(s).map_err(|_| Errno(libc::EINVAL))
}

fn timeval(d: Duration) -> Timeval {
    Timeval {
        tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        tv_usec: i64::from(d.subsec_micros()),
    }
}

/// Splits a buffer of NUL-terminated strings.
fn split_nul(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The pairs an omap iterator holds (none unless `ok`); ends it.
fn drain_omap(iter: OmapIterT, ok: bool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if ok && !iter.is_null() {
        loop {
            let (mut k, mut v, mut kl, mut vl) = (ptr::null_mut(), ptr::null_mut(), 0, 0);
            // SAFETY: `iter` came from a successful operate and is ended
            // below; the returned pointers are valid until the next call.
            let r = unsafe { rados_omap_get_next2(iter, &mut k, &mut v, &mut kl, &mut vl) };
            if r < 0 || k.is_null() {
                break;
            }
            // SAFETY: k/v point to kl/vl bytes owned by the iterator; we
            // copy them before advancing it.
            let (key, val) = unsafe {
                (
                    String::from_utf8_lossy(std::slice::from_raw_parts(k.cast::<u8>(), kl))
                        .into_owned(),
                    if v.is_null() {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(v.cast::<u8>(), vl).to_vec()
                    },
                )
            };
            out.push((key, val));
        }
    }
    if !iter.is_null() {
        // SAFETY: ends the iterator exactly once.
        unsafe { rados_omap_get_end(iter) };
    }
    out
}

/// A connection to a cluster.
#[derive(Debug)]
pub struct Cluster {
    h: RadosT,
}

// SAFETY: librados cluster handles are thread-safe once connected (the
// library's documented threading model); we never mutate config after connect.
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects as `client.<id>` with config file `conf` and extra options.
    pub fn connect(conf: &str, id: &str, options: &[(&str, &str)]) -> R<Arc<Cluster>> {
        let id = cs(id)?;
        let conf = cs(conf)?;
        let mut h: RadosT = ptr::null_mut();
        // SAFETY: `h` is a valid out pointer; `id` is a NUL-terminated string
        // that outlives the call.
        check(unsafe { rados_create(&mut h, id.as_ptr()) })?;
        // From here `h` is owned by `c`, whose Drop shuts it down.
        let c = Cluster { h };
        // SAFETY: `c.h` is a created, not yet connected handle; `conf` is valid.
        check(unsafe { rados_conf_read_file(c.h, conf.as_ptr()) })?;
        for (k, v) in options {
            let (k, v) = (cs(k)?, cs(v)?);
            // SAFETY: handle valid and not connected; strings valid for the call.
            check(unsafe { rados_conf_set(c.h, k.as_ptr(), v.as_ptr()) })?;
        }
        // SAFETY: handle valid and configured.
        check(unsafe { rados_connect(c.h) })?;
        Ok(Arc::new(c))
    }

    /// (total, used, available) bytes of the cluster's raw storage.
    pub fn stat(&self) -> R<(u64, u64, u64)> {
        let mut s = ClusterStatT::default();
        // SAFETY: connected handle; `s` is a valid out struct of the C layout.
        check(unsafe { rados_cluster_stat(self.h, &mut s) })?;
        Ok((
            s.kb.saturating_mul(1024),
            s.kb_used.saturating_mul(1024),
            s.kb_avail.saturating_mul(1024),
        ))
    }

    /// Sends a JSON command to the monitors; returns (output, status text).
    pub fn mon_command(&self, json: &str) -> R<(Vec<u8>, String)> {
        let cmd = cs(json)?;
        let cmds = [cmd.as_ptr()];
        let (mut out, mut outlen, mut st, mut stlen) =
            (ptr::null_mut(), 0usize, ptr::null_mut(), 0usize);
        // SAFETY: connected handle; one valid command string; out pointers valid.
        let rc = unsafe {
            rados_mon_command(
                self.h,
                cmds.as_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut outlen,
                &mut st,
                &mut stlen,
            )
        };
        let take = |p: *mut c_char, n: usize| -> Vec<u8> {
            if p.is_null() {
                return Vec::new();
            }
            // SAFETY: librados returned `p` with `n` valid bytes; we copy them
            // and free the buffer exactly once with the matching function.
            unsafe {
                let v = std::slice::from_raw_parts(p.cast::<u8>(), n).to_vec();
                rados_buffer_free(p);
                v
            }
        };
        let out = take(out, outlen);
        let st = String::from_utf8_lossy(&take(st, stlen)).into_owned();
        check(rc)?;
        Ok((out, st))
    }

    /// This client's addresses, as blocklisting takes them.
    pub fn addrs(&self) -> R<String> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle; `p` is a valid out pointer.
        check(unsafe { rados_getaddrs(self.h, &mut p) })?;
        if p.is_null() {
            return Ok(String::new());
        }
        // SAFETY: librados returned a NUL-terminated string allocated with
        // malloc (strdup); we copy it and free it once.
        let s = unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            s
        };
        Ok(s)
    }

    /// Blocklists client `addr` at the OSDs for `seconds` (its watches and
    /// locks are dropped, its ops refused).
    pub fn blocklist(&self, addr: &str, seconds: u32) -> R<()> {
        let a = cs(addr)?;
        // SAFETY: connected handle; librados only reads the string (the
        // `char *` in its signature is not written through).
        check(unsafe { rados_blocklist_add(self.h, a.as_ptr().cast_mut(), seconds) })
    }

    /// An I/O context on `pool`, namespace `ns` (empty: the default one).
    pub fn ioctx(self: &Arc<Cluster>, pool: &str, ns: &str) -> R<Arc<IoCtx>> {
        let p = cs(pool)?;
        let n = cs(ns)?;
        let mut io: IoCtxT = ptr::null_mut();
        // SAFETY: connected handle; valid pool name and out pointer.
        check(unsafe { rados_ioctx_create(self.h, p.as_ptr(), &mut io) })?;
        // SAFETY: `io` was just created; the namespace is set before any use.
        unsafe { rados_ioctx_set_namespace(io, n.as_ptr()) };
        Ok(Arc::new(IoCtx {
            h: io,
            _cluster: Arc::clone(self),
            counts: Counts::default(),
        }))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: every IoCtx holds an Arc of this cluster, so none is left;
        // the handle is shut down exactly once.
        unsafe { rados_shutdown(self.h) }
    }
}

/// One step of an atomic write operation on one object.
#[derive(Debug, Clone)]
pub enum WriteStep<'a> {
    /// Create the object (`exclusive`: fail with EEXIST if it exists).
    Create {
        /// Fail if it exists.
        exclusive: bool,
    },
    /// Fail with ENOENT unless the object exists.
    AssertExists,
    /// Fail with ECANCELED unless xattr `name` equals `value`.
    CmpXattrEq(&'a str, &'a [u8]),
    /// Set xattr `name`.
    SetXattr(&'a str, &'a [u8]),
    /// Call an object-class method (e.g. `lock.assert_locked`).
    Exec(&'a str, &'a str, &'a [u8]),
    /// Set omap keys.
    OmapSet(&'a [(String, Vec<u8>)]),
    /// Remove omap keys.
    OmapRm(&'a [String]),
    /// Remove the object.
    Remove,
}

/// An I/O context: one pool and namespace.
#[derive(Debug)]
pub struct IoCtx {
    h: IoCtxT,
    _cluster: Arc<Cluster>,
    /// Calls made through it, by kind.
    pub counts: Counts,
}

/// How many costly calls went through an ioctx: what an operation costs,
/// counted rather than timed (timings on a loaded machine are noise).
#[derive(Debug, Default)]
pub struct Counts {
    /// Single-object RADOS operations (one round trip each).
    pub rados_ops: AtomicU64,
    /// Listings of every image of the namespace (`rbd_list`).
    pub image_lists: AtomicU64,
    /// Image opens (each several round trips, and its parent's open).
    pub image_opens: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

// SAFETY: an ioctx may be used from several threads at once (librados is
// thread-safe); its namespace is set once, before it is shared.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: every Image holds an Arc of this ioctx; destroyed once.
        unsafe { rados_ioctx_destroy(self.h) }
    }
}

const LOCK_FLAG_MAY_RENEW: u8 = 1;
const LOCK_FLAG_MUST_RENEW: u8 = 2;

impl IoCtx {
    /// Applies `steps` to object `oid` atomically (all or none).
    pub fn write_op(&self, oid: &str, steps: &[WriteStep<'_>]) -> R<()> {
        bump(&self.counts.rados_ops);
        let oid = cs(oid)?;
        // Everything the op points into lives in `keep` until it has run.
        let mut keep_c: Vec<CString> = Vec::new();
        let mut keep_p: Vec<Vec<*const c_char>> = Vec::new();
        let mut keep_l: Vec<Vec<usize>> = Vec::new();
        let mut prvals: Vec<c_int> = vec![0; steps.len()];
        // SAFETY: creating an op has no preconditions; released below.
        let op = unsafe { rados_create_write_op() };
        if op.is_null() {
            return Err(Errno(libc::ENOMEM));
        }
        let mut built = Ok(());
        for (i, s) in steps.iter().enumerate() {
            let r: R<()> = (|| {
                match s {
                    WriteStep::Create { exclusive } => {
                        // SAFETY: valid op; null category is allowed.
                        unsafe { rados_write_op_create(op, c_int::from(*exclusive), ptr::null()) }
                    }
                    // SAFETY: valid op.
                    WriteStep::AssertExists => unsafe { rados_write_op_assert_exists(op) },
                    WriteStep::CmpXattrEq(name, value) => {
                        let n = cs(name)?;
                        // SAFETY: valid op; the name and value buffers are kept
                        // alive (name in keep_c, value borrowed for the call
                        // duration of operate below via `steps`).
                        unsafe {
                            rados_write_op_cmpxattr(
                                op,
                                n.as_ptr(),
                                1, // LIBRADOS_CMPXATTR_OP_EQ
                                value.as_ptr().cast(),
                                value.len(),
                            )
                        };
                        keep_c.push(n);
                    }
                    WriteStep::SetXattr(name, value) => {
                        let n = cs(name)?;
                        // SAFETY: as for CmpXattrEq.
                        unsafe {
                            rados_write_op_setxattr(
                                op,
                                n.as_ptr(),
                                value.as_ptr().cast(),
                                value.len(),
                            )
                        };
                        keep_c.push(n);
                    }
                    WriteStep::Exec(cls, method, input) => {
                        let (c, m) = (cs(cls)?, cs(method)?);
                        // SAFETY: valid op; strings kept in keep_c, input
                        // borrowed from `steps`; prvals[i] outlives operate.
                        unsafe {
                            rados_write_op_exec(
                                op,
                                c.as_ptr(),
                                m.as_ptr(),
                                input.as_ptr().cast(),
                                input.len(),
                                &mut prvals[i],
                            )
                        };
                        keep_c.push(c);
                        keep_c.push(m);
                    }
                    WriteStep::OmapSet(kv) => {
                        let mut ks = Vec::with_capacity(kv.len());
                        let mut vs = Vec::with_capacity(kv.len());
                        let mut ls = Vec::with_capacity(kv.len());
                        for (k, v) in kv.iter() {
                            let k = cs(k)?;
                            ks.push(k.as_ptr());
                            vs.push(v.as_ptr().cast::<c_char>());
                            ls.push(v.len());
                            keep_c.push(k);
                        }
                        // SAFETY: valid op; the arrays have kv.len() entries
                        // each and are kept (with the strings) until after
                        // operate; values are borrowed from `steps`.
                        unsafe {
                            rados_write_op_omap_set(
                                op,
                                ks.as_ptr(),
                                vs.as_ptr(),
                                ls.as_ptr(),
                                kv.len(),
                            )
                        };
                        keep_p.push(ks);
                        keep_p.push(vs);
                        keep_l.push(ls);
                    }
                    WriteStep::OmapRm(keys) => {
                        let mut ks = Vec::with_capacity(keys.len());
                        for k in keys.iter() {
                            let k = cs(k)?;
                            ks.push(k.as_ptr());
                            keep_c.push(k);
                        }
                        // SAFETY: valid op; the key array is kept until after operate.
                        unsafe { rados_write_op_omap_rm_keys(op, ks.as_ptr(), keys.len()) };
                        keep_p.push(ks);
                    }
                    // SAFETY: valid op.
                    WriteStep::Remove => unsafe { rados_write_op_remove(op) },
                }
                Ok(())
            })();
            if r.is_err() {
                built = r;
                break;
            }
        }
        let rc = match built {
            // SAFETY: a fully built op on a valid ioctx; every buffer it points
            // to (keep_*, `steps`, prvals) is alive until this returns.
            Ok(()) => unsafe {
                rados_write_op_operate(op, self.h, oid.as_ptr(), ptr::null_mut(), 0)
            },
            Err(Errno(e)) => -e,
        };
        // SAFETY: the op was created above and is released exactly once.
        unsafe { rados_release_write_op(op) };
        drop((keep_c, keep_p, keep_l));
        check(rc)?;
        match prvals.iter().find(|&&v| v < 0) {
            Some(&v) => Err(Errno(-v)),
            None => Ok(()),
        }
    }

    /// Up to `max` omap pairs of `oid` after key `after` whose keys start
    /// with `prefix`; the flag says whether more follow.
    pub fn omap_get(&self, oid: &str, after: &str, prefix: &str, max: u64) -> R<OmapPage> {
        bump(&self.counts.rados_ops);
        let (o, a, p) = (cs(oid)?, cs(after)?, cs(prefix)?);
        // SAFETY: no preconditions; released below.
        let op = unsafe { rados_create_read_op() };
        if op.is_null() {
            return Err(Errno(libc::ENOMEM));
        }
        let mut iter: OmapIterT = ptr::null_mut();
        let mut more = 0u8;
        let mut prval: c_int = 0;
        // SAFETY: valid op; strings and out pointers live until after operate.
        let rc = unsafe {
            rados_read_op_omap_get_vals2(
                op,
                a.as_ptr(),
                p.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            );
            rados_read_op_operate(op, self.h, o.as_ptr(), 0)
        };
        let out = drain_omap(iter, rc >= 0 && prval >= 0);
        // SAFETY: created above, released once (after the iterator).
        unsafe { rados_release_read_op(op) };
        check(rc)?;
        check(prval)?;
        Ok((out, more != 0))
    }

    /// The omap values of `keys` of `oid` (keys it lacks are left out).
    pub fn omap_get_keys(&self, oid: &str, keys: &[&str]) -> R<Vec<(String, Vec<u8>)>> {
        bump(&self.counts.rados_ops);
        let o = cs(oid)?;
        let ks = keys.iter().map(|k| cs(k)).collect::<R<Vec<CString>>>()?;
        let kp: Vec<*const c_char> = ks.iter().map(|k| k.as_ptr()).collect();
        let kl: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        // SAFETY: no preconditions; released below.
        let op = unsafe { rados_create_read_op() };
        if op.is_null() {
            return Err(Errno(libc::ENOMEM));
        }
        let mut iter: OmapIterT = ptr::null_mut();
        let mut prval: c_int = 0;
        // SAFETY: valid op; the key arrays (and the strings they point to)
        // and the out pointers live until after operate.
        let rc = unsafe {
            rados_read_op_omap_get_vals_by_keys2(
                op,
                kp.as_ptr(),
                kp.len(),
                kl.as_ptr(),
                &mut iter,
                &mut prval,
            );
            rados_read_op_operate(op, self.h, o.as_ptr(), 0)
        };
        let out = drain_omap(iter, rc >= 0 && prval >= 0);
        // SAFETY: created above, released once (after the iterator).
        unsafe { rados_release_read_op(op) };
        check(rc)?;
        check(prval)?;
        Ok(out)
    }

    /// Up to `len` bytes of object `oid` from its start.
    pub fn read(&self, oid: &str, len: usize) -> R<Vec<u8>> {
        bump(&self.counts.rados_ops);
        let o = cs(oid)?;
        let mut buf = vec![0u8; len];
        // SAFETY: valid ioctx and string; `buf` is writable for `len` bytes.
        let rc = unsafe { rados_read(self.h, o.as_ptr(), buf.as_mut_ptr().cast(), len, 0) };
        check(rc)?;
        buf.truncate(usize::try_from(rc).unwrap_or(0));
        Ok(buf)
    }

    /// Every omap pair of `oid` whose key starts with `prefix`.
    pub fn omap_all(&self, oid: &str, prefix: &str) -> R<Vec<(String, Vec<u8>)>> {
        let mut all: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let after = all.last().map(|(k, _)| k.clone()).unwrap_or_default();
            let (page, more) = self.omap_get(oid, &after, prefix, 1000)?;
            let empty = page.is_empty();
            all.extend(page);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    /// The value of xattr `name` of `oid`.
    pub fn getxattr(&self, oid: &str, name: &str) -> R<Vec<u8>> {
        bump(&self.counts.rados_ops);
        let (o, n) = (cs(oid)?, cs(name)?);
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: valid ioctx and strings; `buf` is writable for its length.
            let rc = unsafe {
                rados_getxattr(
                    self.h,
                    o.as_ptr(),
                    n.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if rc == -libc::ERANGE && buf.len() < (1 << 20) {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            check(rc)?;
            buf.truncate(usize::try_from(rc).unwrap_or(0));
            return Ok(buf);
        }
    }

    /// Removes object `oid`.
    pub fn remove(&self, oid: &str) -> R<()> {
        bump(&self.counts.rados_ops);
        let o = cs(oid)?;
        // SAFETY: valid ioctx and string.
        check(unsafe { rados_remove(self.h, o.as_ptr()) })
    }

    /// Takes (or, with `renew`, renews) the exclusive lock `name` on `oid`
    /// for `duration` under `cookie`. EBUSY: someone else holds it.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        duration: Duration,
        renew: bool,
    ) -> R<()> {
        bump(&self.counts.rados_ops);
        let (o, n, c, d) = (cs(oid)?, cs(name)?, cs(cookie)?, cs("vmvol")?);
        let mut tv = timeval(duration);
        let flags = if renew { LOCK_FLAG_MUST_RENEW } else { 0 };
        // SAFETY: valid ioctx; strings and the timeval live for the call.
        check(unsafe {
            rados_lock_exclusive(
                self.h,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                &mut tv,
                flags,
            )
        })
    }

    /// Takes or renews a shared lock `name` on `oid` for `duration`.
    pub fn lock_shared(&self, oid: &str, name: &str, cookie: &str, duration: Duration) -> R<()> {
        bump(&self.counts.rados_ops);
        let (o, n, c, t, d) = (cs(oid)?, cs(name)?, cs(cookie)?, cs("")?, cs("vmvol")?);
        let mut tv = timeval(duration);
        // SAFETY: valid ioctx; strings and the timeval live for the call.
        check(unsafe {
            rados_lock_shared(
                self.h,
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                t.as_ptr(),
                d.as_ptr(),
                &mut tv,
                LOCK_FLAG_MAY_RENEW,
            )
        })
    }

    /// Releases lock `name` on `oid` held under `cookie`.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> R<()> {
        bump(&self.counts.rados_ops);
        let (o, n, c) = (cs(oid)?, cs(name)?, cs(cookie)?);
        // SAFETY: valid ioctx and strings.
        check(unsafe { rados_unlock(self.h, o.as_ptr(), n.as_ptr(), c.as_ptr()) })
    }

    /// The cookies of the current (unexpired) holders of lock `name` on `oid`.
    pub fn lockers(&self, oid: &str, name: &str) -> R<Vec<String>> {
        bump(&self.counts.rados_ops);
        let (o, n) = (cs(oid)?, cs(name)?);
        let mut cap = 1024usize;
        loop {
            let mut excl: c_int = 0;
            let (mut tag, mut cl, mut co, mut ad) = (
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
                vec![0u8; cap],
            );
            let (mut tl, mut cll, mut col, mut adl) = (cap, cap, cap, cap);
            // SAFETY: valid ioctx and strings; each buffer is writable for the
            // length passed beside it.
            let rc = unsafe {
                rados_list_lockers(
                    self.h,
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut excl,
                    tag.as_mut_ptr().cast(),
                    &mut tl,
                    cl.as_mut_ptr().cast(),
                    &mut cll,
                    co.as_mut_ptr().cast(),
                    &mut col,
                    ad.as_mut_ptr().cast(),
                    &mut adl,
                )
            };
            if rc == -(libc::ERANGE as isize) && cap < (1 << 22) {
                cap = cap.max(tl).max(cll).max(col).max(adl).max(cap * 2);
                continue;
            }
            if rc == -(libc::ENOENT as isize) {
                return Ok(Vec::new());
            }
            if rc < 0 {
                return Err(Errno(i32::try_from(-rc).unwrap_or(libc::EIO)));
            }
            return Ok(split_nul(co.get(..col).unwrap_or(&co)));
        }
    }

    /// Names of every RBD image in this pool/namespace.
    pub fn rbd_list(&self) -> R<Vec<String>> {
        bump(&self.counts.image_lists);
        let mut cap = 4096usize;
        loop {
            let mut buf = vec![0u8; cap];
            let mut size = cap;
            // SAFETY: valid ioctx; `buf` is writable for `size` bytes.
            let rc = unsafe { rbd_list(self.h, buf.as_mut_ptr().cast(), &mut size) };
            if rc == -libc::ERANGE && cap < (1 << 26) {
                cap = size.max(cap * 2);
                continue;
            }
            if rc == -libc::ENOENT {
                return Ok(Vec::new());
            }
            check(rc)?;
            return Ok(split_nul(buf.get(..size).unwrap_or(&buf)));
        }
    }

    /// Creates an RBD image (cluster default format and features).
    pub fn rbd_create(&self, name: &str, size: u64) -> R<()> {
        let n = cs(name)?;
        let mut order: c_int = 0;
        // SAFETY: valid ioctx, string and out pointer.
        check(unsafe { rbd_create(self.h, n.as_ptr(), size, &mut order) })
    }

    /// Clones snapshot `snap` of `parent` as image `child` (same ioctx).
    pub fn rbd_clone(&self, parent: &str, snap: &str, child: &str, features: u64) -> R<()> {
        let (p, s, c) = (cs(parent)?, cs(snap)?, cs(child)?);
        let mut order: c_int = 0;
        // SAFETY: valid ioctx (used as parent and child context) and strings.
        check(unsafe {
            rbd_clone(
                self.h,
                p.as_ptr(),
                s.as_ptr(),
                self.h,
                c.as_ptr(),
                features,
                &mut order,
            )
        })
    }

    /// Removes an RBD image (EBUSY/ENOTEMPTY while it has snapshots or watchers).
    pub fn rbd_remove(&self, name: &str) -> R<()> {
        let n = cs(name)?;
        // SAFETY: valid ioctx and string.
        check(unsafe { rbd_remove(self.h, n.as_ptr()) })
    }

    /// Renames an RBD image.
    pub fn rbd_rename(&self, from: &str, to: &str) -> R<()> {
        let (f, t) = (cs(from)?, cs(to)?);
        // SAFETY: valid ioctx and strings.
        check(unsafe { rbd_rename(self.h, f.as_ptr(), t.as_ptr()) })
    }
}

/// An open RBD image.
#[derive(Debug)]
pub struct Image {
    h: ImageT,
    io: Arc<IoCtx>,
}

// SAFETY: librbd image handles are thread-safe for I/O and metadata calls.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle is open and closed exactly once.
        unsafe { rbd_close(self.h) };
    }
}

extern "C" fn diff_cb(ofs: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&mut Vec` passed by `Image::extents`, alive for
    // the duration of rbd_diff_iterate2, which calls this synchronously.
    let v = unsafe { &mut *arg.cast::<Vec<(u64, u64, bool)>>() };
    v.push((ofs, len as u64, exists != 0));
    0
}

impl Image {
    /// Opens image `name` (read-only: no exclusive lock, no writes).
    pub fn open(io: &Arc<IoCtx>, name: &str, read_only: bool) -> R<Image> {
        bump(&io.counts.image_opens);
        let n = cs(name)?;
        let mut h: ImageT = ptr::null_mut();
        // SAFETY: valid ioctx, string and out pointer; null snap = the head.
        let rc = unsafe {
            if read_only {
                rbd_open_read_only(io.h, n.as_ptr(), &mut h, ptr::null())
            } else {
                rbd_open(io.h, n.as_ptr(), &mut h, ptr::null())
            }
        };
        check(rc)?;
        Ok(Image {
            h,
            io: Arc::clone(io),
        })
    }

    /// Opens the image of RBD id `id` (whatever its name now), at
    /// snapshot `snap` (read-only then) or at its head.
    pub fn open_by_id(io: &Arc<IoCtx>, id: &str, snap: Option<&str>, read_only: bool) -> R<Image> {
        bump(&io.counts.image_opens);
        let i = cs(id)?;
        let sn = snap.map(cs).transpose()?;
        let sp = sn.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        let mut h: ImageT = ptr::null_mut();
        // SAFETY: valid ioctx, strings (or null: the head) and out pointer.
        let rc = unsafe {
            if read_only || snap.is_some() {
                rbd_open_by_id_read_only(io.h, i.as_ptr(), &mut h, sp)
            } else {
                rbd_open_by_id(io.h, i.as_ptr(), &mut h, sp)
            }
        };
        check(rc)?;
        Ok(Image {
            h,
            io: Arc::clone(io),
        })
    }

    /// The image's RBD id (stable across renames).
    pub fn id(&self) -> R<String> {
        let mut buf = vec![0u8; 64];
        // SAFETY: open image; `buf` has room for `len` bytes.
        let rc = unsafe { rbd_get_id(self.h, buf.as_mut_ptr().cast(), buf.len()) };
        check(rc)?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned())
    }

    /// Virtual size.
    pub fn size(&self) -> R<u64> {
        let mut s = 0u64;
        // SAFETY: open image, valid out pointer.
        check(unsafe { rbd_get_size(self.h, &mut s) })?;
        Ok(s)
    }

    /// Feature bits.
    pub fn features(&self) -> R<u64> {
        let mut f = 0u64;
        // SAFETY: open image, valid out pointer.
        check(unsafe { rbd_get_features(self.h, &mut f) })?;
        Ok(f)
    }

    /// Reads exactly `buf.len()` bytes at `ofs` (zeros past written data).
    pub fn read(&self, buf: &mut [u8], ofs: u64) -> R<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: open image; `rest` is writable for its length.
            let n = unsafe {
                rbd_read(
                    self.h,
                    ofs + done as u64,
                    rest.len(),
                    rest.as_mut_ptr().cast(),
                )
            };
            if n < 0 {
                return Err(Errno(i32::try_from(-n).unwrap_or(libc::EIO)));
            }
            if n == 0 {
                return Err(Errno(libc::EIO));
            }
            done += n.unsigned_abs();
        }
        Ok(())
    }

    /// Writes all of `buf` at `ofs`.
    pub fn write(&self, buf: &[u8], ofs: u64) -> R<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: open image; `rest` is readable for its length.
            let n =
                unsafe { rbd_write(self.h, ofs + done as u64, rest.len(), rest.as_ptr().cast()) };
            if n < 0 {
                return Err(Errno(i32::try_from(-n).unwrap_or(libc::EIO)));
            }
            if n == 0 {
                return Err(Errno(libc::EIO));
            }
            done += n.unsigned_abs();
        }
        Ok(())
    }

    /// Writes zeros over a range (deallocating where possible).
    pub fn write_zeroes(&self, ofs: u64, len: u64) -> R<()> {
        let len = usize::try_from(len).map_err(|_| Errno(libc::EINVAL))?;
        // SAFETY: open image.
        let n = unsafe { rbd_write_zeroes(self.h, ofs, len, 0, 0) };
        if n < 0 {
            return Err(Errno(i32::try_from(-n).unwrap_or(libc::EIO)));
        }
        Ok(())
    }

    /// Flushes written data to the cluster.
    pub fn flush(&self) -> R<()> {
        // SAFETY: open image.
        check(unsafe { rbd_flush(self.h) })
    }

    /// Resizes the image.
    pub fn resize(&self, size: u64) -> R<()> {
        // SAFETY: open image.
        check(unsafe { rbd_resize(self.h, size) })
    }

    /// Copies what the image shows (parent data included) into a new image.
    pub fn copy_to(&self, dest: &str) -> R<()> {
        let d = cs(dest)?;
        // SAFETY: open image; the destination is in the image's own ioctx.
        check(unsafe { rbd_copy(self.h, self.io.h, d.as_ptr()) })
    }

    /// Deallocates zero-filled runs of `sparse_size` bytes.
    pub fn sparsify(&self, sparse_size: usize) -> R<()> {
        // SAFETY: open image.
        check(unsafe { rbd_sparsify(self.h, sparse_size) })
    }

    /// Creates snapshot `name`.
    pub fn snap_create(&self, name: &str) -> R<()> {
        let n = cs(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd_snap_create(self.h, n.as_ptr()) })
    }

    /// Protects snapshot `name` (clones need it).
    pub fn snap_protect(&self, name: &str) -> R<()> {
        let n = cs(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd_snap_protect(self.h, n.as_ptr()) })
    }

    /// Unprotects snapshot `name` (EBUSY while clones of it exist).
    pub fn snap_unprotect(&self, name: &str) -> R<()> {
        let n = cs(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd_snap_unprotect(self.h, n.as_ptr()) })
    }

    /// Removes snapshot `name`.
    pub fn snap_remove(&self, name: &str) -> R<()> {
        let n = cs(name)?;
        // SAFETY: open image, valid string.
        check(unsafe { rbd_snap_remove(self.h, n.as_ptr()) })
    }

    /// Names of the image's snapshots.
    pub fn snap_list(&self) -> R<Vec<String>> {
        Ok(self.snaps()?.into_iter().map(|(n, _)| n).collect())
    }

    /// The image's snapshots: (name, size).
    pub fn snaps(&self) -> R<Vec<(String, u64)>> {
        let mut max: c_int = 16;
        loop {
            let cap = usize::try_from(max).unwrap_or(16);
            let mut v: Vec<SnapInfoT> = (0..cap)
                .map(|_| SnapInfoT {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: open image; `v` has room for `max` entries.
            let rc = unsafe { rbd_snap_list(self.h, v.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE && max < 1 << 16 {
                max = max.max(16) * 2;
                continue;
            }
            check(rc)?;
            let n = usize::try_from(rc).unwrap_or(0).min(cap);
            let names = v[..n]
                .iter()
                .filter(|s| !s.name.is_null())
                .map(|s| {
                    // SAFETY: librbd filled `name` with NUL-terminated strings
                    // that stay valid until rbd_snap_list_end below.
                    let name = unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned();
                    (name, s.size)
                })
                .collect();
            // SAFETY: frees the names filled in above, once.
            unsafe { rbd_snap_list_end(v.as_mut_ptr()) };
            return Ok(names);
        }
    }

    /// The extents of `[ofs, ofs+len)` that hold data (`include_parent`:
    /// the parent's too; `whole_object`: object granularity, fast with the
    /// object map). Each: (offset, length, exists).
    pub fn extents(
        &self,
        ofs: u64,
        len: u64,
        include_parent: bool,
        whole_object: bool,
    ) -> R<Vec<(u64, u64, bool)>> {
        let mut v: Vec<(u64, u64, bool)> = Vec::new();
        // SAFETY: open image; the callback gets `&mut v` back as `arg` and is
        // only called during this call.
        check(unsafe {
            rbd_diff_iterate2(
                self.h,
                ptr::null(),
                ofs,
                len,
                u8::from(include_parent),
                u8::from(whole_object),
                diff_cb,
                (&mut v as *mut Vec<(u64, u64, bool)>).cast(),
            )
        })?;
        Ok(v)
    }

    /// The addresses of the clients watching the image (this handle's
    /// own client among them).
    pub fn watchers(&self) -> R<Vec<String>> {
        let mut max = 8usize;
        loop {
            let mut v: Vec<WatcherT> = (0..max)
                .map(|_| WatcherT {
                    addr: ptr::null_mut(),
                    id: 0,
                    cookie: 0,
                })
                .collect();
            let mut n = max;
            // SAFETY: open image; `v` has room for `n` entries.
            let rc = unsafe { rbd_watchers_list(self.h, v.as_mut_ptr(), &mut n) };
            if rc == -libc::ERANGE && n > max && n < 1 << 16 {
                max = n;
                continue;
            }
            check(rc)?;
            let n = n.min(max);
            let addrs = v[..n]
                .iter()
                .filter(|w| !w.addr.is_null())
                .map(|w| {
                    // SAFETY: librbd filled `addr` with a NUL-terminated
                    // string that stays valid until the cleanup below.
                    unsafe { CStr::from_ptr(w.addr) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: frees the strings filled in above, once.
            unsafe { rbd_watchers_list_cleanup(v.as_mut_ptr(), n) };
            return Ok(addrs);
        }
    }

    /// The image's parent (image name, snapshot name) if it is a clone.
    pub fn parent(&self) -> R<Option<(String, String)>> {
        let mut p = LinkedImageSpecT {
            pool_id: 0,
            pool_name: ptr::null_mut(),
            pool_namespace: ptr::null_mut(),
            image_id: ptr::null_mut(),
            image_name: ptr::null_mut(),
            trash: false,
        };
        let mut s = SnapSpecT {
            id: 0,
            namespace_type: 0,
            name: ptr::null_mut(),
        };
        // SAFETY: open image; both out structs have the C layout.
        let rc = unsafe { rbd_get_parent(self.h, &mut p, &mut s) };
        if rc == -libc::ENOENT {
            return Ok(None);
        }
        check(rc)?;
        let text = |c: *mut c_char| {
            if c.is_null() {
                String::new()
            } else {
                // SAFETY: librbd filled it with a NUL-terminated string that
                // lives until the cleanup calls below.
                unsafe { CStr::from_ptr(c) }.to_string_lossy().into_owned()
            }
        };
        let out = (text(p.image_name), text(s.name));
        // SAFETY: frees what rbd_get_parent allocated, once each.
        unsafe {
            rbd_linked_image_spec_cleanup(&mut p);
            rbd_snap_spec_cleanup(&mut s);
        }
        Ok(Some(out))
    }
}
