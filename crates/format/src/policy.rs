//! Which backing files an image may name: the security policy for chains.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{detect_format, Error, Format, Result};

/// Default limit on how many backing files a chain may have below its top image.
pub const DEFAULT_MAX_DEPTH: u32 = 16;

/// Rules for following an image's backing chain.
///
/// A backing file name recorded in an image is resolved relative to the
/// directory of the image that names it, then canonicalised (symlinks
/// followed); the result must lie inside one of `allowed_roots`. The backing
/// format must be recorded in the image (no probing: a guest could write a
/// qcow2 header into a raw disk) unless `allow_probe` is set. At most
/// `max_depth` backing files may lie below the top image and no file may appear
/// twice in a chain.
///
/// The default policy has no allowed roots, so it refuses every backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingPolicy {
    /// Directories inside which every backing file must resolve.
    pub allowed_roots: Vec<PathBuf>,
    /// Most backing files allowed below the top image (default 16).
    pub max_depth: u32,
    /// Whether a backing file without a recorded format may be probed (default false).
    pub allow_probe: bool,
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            allowed_roots: Vec::new(),
            max_depth: DEFAULT_MAX_DEPTH,
            allow_probe: false,
        }
    }
}

impl BackingPolicy {
    /// A policy allowing backing files inside `roots`, with the default depth
    /// limit and no probing.
    pub fn within<I, P>(roots: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<PathBuf>,
    {
        BackingPolicy {
            allowed_roots: roots.into_iter().map(Into::into).collect(),
            ..BackingPolicy::default()
        }
    }

    /// A policy that allows backing files only inside the directory holding
    /// `image` (what the command-line tool does by default).
    pub fn image_dir(image: &Path) -> Self {
        let dir = match image.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        BackingPolicy::within([dir])
    }

    /// Resolve and vet the backing file `recorded` named by `image` (whose own
    /// canonical path and those of the images above it are in `chain`).
    ///
    /// Returns the backing file opened read-only, its canonical path, the path
    /// as combined from the name (what `qemu-img` calls the full backing
    /// filename), and its format.
    pub(crate) fn resolve(
        &self,
        image: &Path,
        recorded: &str,
        recorded_format: Option<&str>,
        chain: &[PathBuf],
    ) -> Result<ResolvedBacking> {
        let refuse = |reason: String| Error::BackingRefused {
            path: image.to_path_buf(),
            backing: recorded.to_string(),
            reason,
        };
        // `chain` holds the top image and every backing file above this one.
        let depth = chain.len() as u64;
        if depth > u64::from(self.max_depth) {
            return Err(refuse(format!(
                "chain depth limit exceeded: more than {} backing files",
                self.max_depth
            )));
        }
        if recorded.is_empty() {
            return Err(refuse("empty backing file name".into()));
        }
        if recorded.contains(':') && !recorded.starts_with('/') && !recorded.starts_with('.') {
            // qemu would read "proto:..." as a protocol (nbd:, http:, ...).
            if let Some((proto, _)) = recorded.split_once(':') {
                if !proto.is_empty()
                    && proto
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
                {
                    return Err(refuse(format!(
                        "protocol prefix {proto:?} is not a file name"
                    )));
                }
            }
        }
        let rec = Path::new(recorded);
        let combined = if rec.is_absolute() {
            rec.to_path_buf()
        } else {
            match image.parent() {
                Some(p) => p.join(rec),
                None => rec.to_path_buf(),
            }
        };
        let canonical = std::fs::canonicalize(&combined)
            .map_err(|e| refuse(format!("cannot resolve {}: {e}", combined.display())))?;
        if !self.inside_roots(&canonical) {
            return Err(refuse(format!(
                "{} is outside the allowed roots",
                canonical.display()
            )));
        }
        if chain.iter().any(|p| p == &canonical) {
            return Err(refuse(format!(
                "backing chain loop: {} is already in the chain",
                canonical.display()
            )));
        }
        // O_NOFOLLOW: the canonical path has no symlink; refuse one swapped in since.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&canonical)
            .map_err(|e| Error::io(&canonical, "open backing file", e))?;
        // Check what was actually opened, not what the path said a moment ago.
        if let Ok(actual) = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::unix::io::AsRawFd;
            file.as_raw_fd()
        })) {
            if !self.inside_roots(&actual) {
                return Err(refuse(format!(
                    "{} is outside the allowed roots",
                    actual.display()
                )));
            }
        }
        let meta = file
            .metadata()
            .map_err(|e| Error::io(&canonical, "stat backing file", e))?;
        if !meta.is_file() {
            return Err(refuse(format!(
                "{} is not a regular file",
                canonical.display()
            )));
        }
        let format = match recorded_format {
            Some(name) => name
                .parse::<Format>()
                .map_err(|e| refuse(format!("unsupported backing format: {e}")))?,
            None if self.allow_probe => detect_format(&canonical)?,
            None => {
                return Err(refuse(
                    "no backing format recorded (probing is not allowed)".into(),
                ))
            }
        };
        Ok(ResolvedBacking {
            file,
            canonical,
            combined,
            format,
        })
    }

    /// Whether `p` (canonical) lies inside one of the allowed roots.
    fn inside_roots(&self, p: &Path) -> bool {
        self.allowed_roots.iter().any(|root| {
            // Roots may themselves be given through symlinks (e.g. /tmp).
            let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.clone());
            p.starts_with(&root)
        })
    }
}

/// A backing file that passed the policy.
#[derive(Debug)]
pub(crate) struct ResolvedBacking {
    /// The file, opened read-only.
    pub file: File,
    /// Its canonical path.
    pub canonical: PathBuf,
    /// The recorded name combined with the naming image's directory.
    pub combined: PathBuf,
    /// Its format (recorded, or probed if the policy allows).
    pub format: Format,
}

/// A backing file as recorded in (or to be recorded in) an image: its name,
/// relative names being relative to the image's directory, and its format.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackingRef {
    /// The backing file's name or path.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
}
