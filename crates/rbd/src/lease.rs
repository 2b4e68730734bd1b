//! RADOS locks with a lease: taken with a duration and renewed by a
//! background thread while their hold lives. A holder that stalls (SIGSTOP,
//! a hung host) stops renewing; once the duration passes, the cluster's lock
//! class drops it, another client may take the lock, and every write that
//! asserts the lock (`lock.assert_locked` in the same RADOS operation) fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ffi::{Errno, IoCtx};

/// Shared (readers) or exclusive (one writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Shared,
    Exclusive,
}

/// A held lease; renewed until dropped (then released) or lost.
#[derive(Debug)]
pub(crate) struct Lease {
    io: Arc<IoCtx>,
    oid: String,
    name: String,
    pub(crate) cookie: String,
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    /// Tries once to take lock `name` on `oid` (EBUSY: held by another).
    /// `paused` stops renewals while set (a test hook that lets a lease lapse).
    pub(crate) fn try_take(
        io: &Arc<IoCtx>,
        oid: &str,
        name: &str,
        kind: Kind,
        ttl: Duration,
        paused: &Arc<AtomicBool>,
    ) -> Result<Lease, Errno> {
        let cookie = uuid::Uuid::new_v4().simple().to_string();
        match kind {
            Kind::Exclusive => io.lock_exclusive(oid, name, &cookie, ttl, false)?,
            Kind::Shared => io.lock_shared(oid, name, &cookie, ttl)?,
        }
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let thread = {
            let (io, oid, name, cookie) = (
                Arc::clone(io),
                oid.to_string(),
                name.to_string(),
                cookie.clone(),
            );
            let (stop, paused) = (Arc::clone(&stop), Arc::clone(paused));
            std::thread::Builder::new()
                .name("vmvol-rbd-lease".into())
                .spawn(move || {
                    // Renew at a third of the lease so two missed beats are survivable.
                    let beat = ttl / 3;
                    let mut next = Instant::now() + beat;
                    loop {
                        let (m, cv) = &*stop;
                        let mut s = m.lock().unwrap_or_else(|e| e.into_inner());
                        while !*s && Instant::now() < next {
                            let left = next.saturating_duration_since(Instant::now());
                            s = cv
                                .wait_timeout(s, left)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|e| e.into_inner().0);
                        }
                        if *s {
                            return;
                        }
                        drop(s);
                        next = Instant::now() + beat;
                        if paused.load(Ordering::SeqCst) {
                            continue;
                        }
                        let r = match kind {
                            Kind::Exclusive => io.lock_exclusive(&oid, &name, &cookie, ttl, true),
                            Kind::Shared => io.lock_shared(&oid, &name, &cookie, ttl),
                        };
                        if r.is_err() {
                            // Expired (and maybe taken by another): the
                            // holder's fenced writes fail from now on.
                            return;
                        }
                    }
                })
                .ok()
        };
        Ok(Lease {
            io: Arc::clone(io),
            oid: oid.to_string(),
            name: name.to_string(),
            cookie,
            stop,
            thread,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Best effort: a lapsed lease is already gone (ENOENT).
        let _ = self.io.unlock(&self.oid, &self.name, &self.cookie);
    }
}

/// The input of `lock.assert_locked` (Ceph's `cls_lock_assert_op`):
/// versioned struct {name, type, cookie, tag}, little-endian, strings as
/// u32 length + bytes.
pub(crate) fn assert_locked_input(name: &str, cookie: &str) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, name);
    body.push(1); // LOCK_EXCLUSIVE
    string(&mut body, cookie);
    string(&mut body, ""); // tag
    let mut out = vec![1u8, 1u8]; // struct_v, compat
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}
