//! Progress reporting and cancellation for long operations.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{Error, Result};

/// Progress callback: `(bytes_done, bytes_total)`.
pub type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// How a caller watches and stops a long operation (copy, convert, compact,
/// raw preallocation, populate).
///
/// The default reports nothing and never cancels. A cancelled operation
/// returns [`Error::Cancelled`] and leaves nothing behind.
#[derive(Clone, Default)]
pub struct Control {
    progress: Option<Arc<ProgressFn>>,
    cancel: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .finish()
    }
}

impl Control {
    /// A control that reports nothing and never cancels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Report progress to `f` as `(done, total)` bytes.
    pub fn with_progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Cancel the operation when `flag` becomes `true`.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Report progress.
    pub fn report(&self, done: u64, total: u64) {
        if let Some(f) = &self.progress {
            f(done, total);
        }
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// `Err(Error::Cancelled)` if cancellation was requested.
    pub fn check(&self, path: &Path, op: &'static str) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled {
                path: path.to_path_buf(),
                op,
            })
        } else {
            Ok(())
        }
    }
}
