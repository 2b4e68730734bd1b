//! The pool lock: one lock file per pool, `flock`-style via std's
//! `File::lock`/`lock_shared`/`try_lock`, exclusive for mutations and shared
//! for reads.
//!
//! Every acquisition opens the lock file anew. `flock` locks belong to an
//! open file description, so a fresh descriptor per acquisition makes threads
//! of one process exclude each other exactly like separate processes do. The
//! kernel drops the lock when the holder dies, so a crashed process never
//! leaves the pool locked.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How long to wait for a lock that someone else holds. The caller chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Wait {
    /// Wait as long as it takes.
    #[default]
    Block,
    /// Fail at once with [`Error::Busy`].
    FailFast,
    /// Wait at most this long, then fail with [`Error::Busy`].
    Timeout(Duration),
}

/// Shared (reads) or exclusive (mutations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    /// Many holders at once; excludes exclusive holders.
    Shared,
    /// One holder; excludes everyone else.
    Exclusive,
}

/// A held lock on a lock file; released on drop (closing the descriptor).
#[derive(Debug)]
pub struct FileLock {
    // Kept open only to hold the lock; closing it releases.
    _file: File,
    mode: LockMode,
}

impl FileLock {
    /// The mode held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The locked file.
    pub(crate) fn file(&self) -> &File {
        &self._file
    }
}

/// Locks `path` (created if missing) in `mode`, waiting per `wait`.
/// `op` names the operation for the `Busy` error.
pub fn lock_file(path: &Path, mode: LockMode, wait: Wait, op: &'static str) -> Result<FileLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, "open lock file", e))?;
    match wait {
        Wait::Block => {
            match mode {
                LockMode::Shared => file.lock_shared(),
                LockMode::Exclusive => file.lock(),
            }
            .map_err(|e| Error::io(path, "lock", e))?;
        }
        Wait::FailFast => {
            if !try_once(&file, mode, path)? {
                return Err(busy(path, op, Duration::ZERO));
            }
        }
        Wait::Timeout(limit) => {
            // std has no timed flock; poll with a short, growing sleep so an
            // uncontended lock costs one syscall and a contended one reacts
            // within a few milliseconds.
            let start = Instant::now();
            let mut nap = Duration::from_micros(200);
            loop {
                if try_once(&file, mode, path)? {
                    break;
                }
                let waited = start.elapsed();
                if waited >= limit {
                    return Err(busy(path, op, waited));
                }
                std::thread::sleep(nap.min(limit.saturating_sub(waited)));
                nap = (nap * 2).min(Duration::from_millis(10));
            }
        }
    }
    Ok(FileLock { _file: file, mode })
}

fn try_once(file: &File, mode: LockMode, path: &Path) -> Result<bool> {
    let r = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    match r {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, "try lock", e)),
    }
}

fn busy(path: &Path, op: &'static str, waited: Duration) -> Error {
    Error::Busy {
        path: PathBuf::from(path),
        op,
        waited,
    }
}

/// Whether someone holds a lock on `file` (opened by us on a file another
/// holder may have locked). Used to tell live staging areas and reservations
/// from those of dead processes: the kernel released a dead holder's lock.
/// On success the probe's own lock is kept until `file` is closed.
pub(crate) fn is_held_by_other(file: &File, path: &Path) -> Result<bool> {
    // Owners hold their lock exclusively; probing with a shared lock lets
    // two probers of a dead owner's file both see it as dead.
    try_once(file, LockMode::Shared, path).map(|got| !got)
}
