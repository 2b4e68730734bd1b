//! Shared state of the service: the volume layer, the configuration, the
//! job table, and the one way handlers run storage work (on the blocking
//! pool, never on the runtime's threads).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use vmvol_format::Control;
use vmvol_volume::Volumes;

use crate::error::{ApiError, ApiResult};
use crate::model::{JobAccepted, JobState, JobView, Progress};

/// How the service behaves. [`ApiConfig::default`] is the safe choice:
/// pool `default` for `/volumes`, no import roots (imports by path
/// refused), uploads staged in the system's temporary directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ApiConfig {
    /// The pool the `/volumes` API works on.
    pub default_pool: String,
    /// Directories images and archives may be imported from by path.
    pub import_roots: Vec<PathBuf>,
    /// Where uploaded archives wait while a volume is built from them.
    pub upload_dir: PathBuf,
    /// Largest JSON body accepted, in bytes.
    pub json_limit: usize,
    /// Finished jobs kept for `GET /api/jobs/{id}` (oldest dropped first).
    pub finished_jobs_kept: usize,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            default_pool: "default".into(),
            import_roots: Vec::new(),
            upload_dir: std::env::temp_dir(),
            json_limit: 1 << 20,
            finished_jobs_kept: 1000,
        }
    }
}

/// One long operation.
struct Job {
    operation: &'static str,
    seq: u64,
    cancel: Arc<AtomicBool>,
    progress: Mutex<Progress>,
    outcome: Mutex<Option<ApiResult<serde_json::Value>>>,
}

impl Job {
    fn view(&self, id: &str) -> JobView {
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let (state, result, error) = match &*outcome {
            None => (JobState::Running, None, None),
            Some(Ok(v)) => (JobState::Succeeded, Some(v.clone()), None),
            Some(Err(e)) if e.kind == "cancelled" => {
                (JobState::Cancelled, None, Some(e.body().error))
            }
            Some(Err(e)) => (JobState::Failed, None, Some(e.body().error)),
        };
        JobView {
            id: id.to_string(),
            operation: self.operation.to_string(),
            state,
            progress: *self.progress.lock().unwrap_or_else(|e| e.into_inner()),
            result,
            error,
        }
    }

    fn finished(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// State every handler sees.
pub(crate) struct AppState {
    pub(crate) vols: Arc<Volumes>,
    pub(crate) cfg: ApiConfig,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    seq: AtomicU64,
    /// Directories whose names must not appear in messages.
    hidden: Vec<(String, &'static str)>,
}

/// Sets the flag when dropped unless disarmed: a request whose client went
/// away cancels its work, so the library removes what it was writing.
struct CancelOnDrop(Arc<AtomicBool>, bool);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl AppState {
    pub(crate) fn new(vols: Volumes, cfg: ApiConfig) -> AppState {
        let mut hidden = Vec::new();
        let root = vols.registry().root().to_string_lossy().into_owned();
        if !root.is_empty() {
            hidden.push((root, "<registry>"));
        }
        let up = cfg.upload_dir.to_string_lossy().into_owned();
        if !up.is_empty() {
            hidden.push((up, "<upload>"));
        }
        // Longest first, so a directory inside another is replaced whole.
        hidden.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        AppState {
            vols: Arc::new(vols),
            cfg,
            jobs: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            hidden,
        }
    }

    /// `e` with the registry and upload directories replaced by a name.
    pub(crate) fn redact(&self, mut e: ApiError) -> ApiError {
        for (p, name) in &self.hidden {
            if e.message.contains(p.as_str()) {
                e.message = e.message.replace(p.as_str(), name);
            }
        }
        e
    }

    /// Runs `f` on the blocking pool and waits for it. A client that goes
    /// away cancels the work (through `Control`); a panic becomes a 500.
    pub(crate) async fn blocking<T, F>(self: &Arc<Self>, f: F) -> ApiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Volumes, &Control) -> ApiResult<T> + Send + 'static,
    {
        let flag = Arc::new(AtomicBool::new(false));
        let mut guard = CancelOnDrop(flag.clone(), true);
        let vols = self.vols.clone();
        let ctl = Control::new().with_cancel(flag);
        let res = tokio::task::spawn_blocking(move || f(&vols, &ctl)).await;
        guard.1 = false;
        match res {
            Ok(r) => r.map_err(|e| self.redact(e)),
            Err(e) if e.is_panic() => Err(ApiError::internal(
                "internal error: the operation panicked (nothing was committed by it)",
            )),
            Err(_) => Err(ApiError::internal(
                "internal error: the operation was aborted",
            )),
        }
    }

    /// Runs `f` as a job (`run_async`: answer 202 with its id at once) or
    /// waits for it and answers `ok` with its result.
    pub(crate) async fn run<T, F>(
        self: &Arc<Self>,
        operation: &'static str,
        run_async: bool,
        ok: StatusCode,
        f: F,
    ) -> ApiResult<Response>
    where
        T: Serialize + Send + 'static,
        F: FnOnce(&Volumes, &Control) -> ApiResult<T> + Send + 'static,
    {
        if !run_async {
            let v = self.blocking(f).await?;
            return Ok((ok, Json(v)).into_response());
        }
        let id = uuid::Uuid::new_v4().to_string();
        let job = Arc::new(Job {
            operation,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            cancel: Arc::new(AtomicBool::new(false)),
            progress: Mutex::new(Progress {
                done: 0,
                total: 0,
                phase: 0,
            }),
            outcome: Mutex::new(None),
        });
        self.insert_job(&id, job.clone());
        let j = job.clone();
        let ctl = Control::new()
            .with_cancel(job.cancel.clone())
            .with_progress(move |done, total| {
                let mut p = j.progress.lock().unwrap_or_else(|e| e.into_inner());
                // The library reports each step of an operation (make the
                // image, copy into it) from zero: a drop starts a new phase.
                if p.phase == 0 || done < p.done || total != p.total {
                    p.phase += 1;
                }
                p.done = done;
                p.total = total;
            });
        let vols = self.vols.clone();
        let st = self.clone();
        tokio::spawn(async move {
            let res = tokio::task::spawn_blocking(move || {
                f(&vols, &ctl).and_then(|v| {
                    serde_json::to_value(v)
                        .map_err(|e| ApiError::internal(format!("encoding the result: {e}")))
                })
            })
            .await;
            let out = match res {
                Ok(r) => r.map_err(|e| st.redact(e)),
                Err(_) => Err(ApiError::internal(
                    "internal error: the operation panicked (nothing was committed by it)",
                )),
            };
            if out.is_ok() {
                // A finished job shows its whole size as done.
                let mut p = job.progress.lock().unwrap_or_else(|e| e.into_inner());
                p.done = p.total;
            }
            *job.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(out);
        });
        Ok((StatusCode::ACCEPTED, Json(JobAccepted { job_id: id })).into_response())
    }

    fn insert_job(&self, id: &str, job: Arc<Job>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let finished: Vec<(u64, String)> = jobs
            .iter()
            .filter(|(_, j)| j.finished())
            .map(|(k, j)| (j.seq, k.clone()))
            .collect();
        if finished.len() >= self.cfg.finished_jobs_kept {
            let mut finished = finished;
            finished.sort();
            let excess = finished.len() + 1 - self.cfg.finished_jobs_kept.max(1);
            for (_, k) in finished.into_iter().take(excess) {
                jobs.remove(&k);
            }
        }
        jobs.insert(id.to_string(), job);
    }

    /// A job's view.
    pub(crate) fn job(&self, id: &str) -> ApiResult<JobView> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.get(id)
            .map(|j| j.view(id))
            .ok_or_else(|| ApiError::not_found(format!("job {id}: get job: not found")))
    }

    /// Asks job `id` to stop; the library removes what it was writing.
    pub(crate) fn cancel(&self, id: &str) -> ApiResult<JobView> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let j = jobs
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("job {id}: cancel job: not found")))?;
        j.cancel.store(true, Ordering::SeqCst);
        Ok(j.view(id))
    }

    /// Sets every unfinished job's cancel flag; how many there were.
    pub(crate) fn cancel_all(&self) -> usize {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for j in jobs.values().filter(|j| !j.finished()) {
            j.cancel.store(true, Ordering::SeqCst);
            n += 1;
        }
        n
    }

    /// `path` resolved and checked to lie under an import root.
    pub(crate) fn import_path(&self, what: &str, path: &str) -> ApiResult<PathBuf> {
        let refuse = || {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "refused",
                format!(
                    "{what} {path:?}: import: refused, not under a directory the operator allowed"
                ),
            )
        };
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(ApiError::invalid(format!(
                "{what} {path:?}: import: the path must be absolute"
            )));
        }
        // Resolving symlinks first: a link under a root may point outside it.
        let real = std::fs::canonicalize(p).map_err(|_| refuse())?;
        for root in &self.cfg.import_roots {
            if let Ok(r) = std::fs::canonicalize(root) {
                if real.starts_with(&r) {
                    return Ok(real);
                }
            }
        }
        Err(refuse())
    }
}
