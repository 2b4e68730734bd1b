//! vmvol's HTTP service: an [`axum`] router over the volume layer.
//!
//! - Seed 004's endpoints by their paths (`POST /api/create-volume`,
//!   `…/delete-volume`, `…/list-volumes`, `…/describe-volume`,
//!   `…/resize-volume`, `…/clone-volume`, `…/compress-volume`) and the same
//!   style for pools, templates and snapshots; JSON in and out, sizes as
//!   bytes or `"10G"`.
//! - The `/volumes` API of the VM manager seed 000 describes, on the pool
//!   named `default` (JSON, or `multipart/form-data` with a tar.gz).
//! - Long work as jobs: `"async": true` answers 202 with a job id;
//!   `GET /api/jobs/{id}` shows progress; `POST /api/cancel-job` cancels, and
//!   the library removes what it was writing.
//! - Errors as `{"error": {"kind", "message"}}`, the status chosen by the
//!   library's [`ErrorKind`](vmvol_volume::ErrorKind) (see [`status_of`]).
//! - `GET /openapi.json`, generated from the code ([`ApiDoc`]).
//!
//! Storage work runs on tokio's blocking pool, never on the runtime's
//! threads. By default the service listens on a Unix socket of mode 0600
//! ([`bind_unix`]); TCP is for [`require_token`]-wrapped routers only.
//!
//! ```
//! use std::future::IntoFuture;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use vmvol_api::{bind_unix, router, ApiConfig};
//! use vmvol_pool::Registry;
//! use vmvol_volume::Volumes;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let vols = Volumes::new(Registry::open(dir.path().join("registry"))?);
//! let sock = dir.path().join("vmvol.sock");
//! let rt = tokio::runtime::Runtime::new()?;
//! rt.block_on(async {
//!     let listener = bind_unix(&sock)?;
//!     tokio::spawn(axum::serve(listener, router(vols, ApiConfig::default())).into_future());
//!
//!     let mut s = tokio::net::UnixStream::connect(&sock).await?;
//!     let body = r#"{"name": "default", "quota": "1G", "activate": true}"#;
//!     s.write_all(format!("POST /api/define-pool HTTP/1.1\r\nHost: vmvol\r\n\
//!         Content-Type: application/json\r\nContent-Length: {}\r\n\
//!         Connection: close\r\n\r\n{body}", body.len()).as_bytes()).await?;
//!     let mut answer = String::new();
//!     s.read_to_string(&mut answer).await?;
//!     assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```

mod error;
mod extract;
mod listen;
mod model;
mod openapi;
mod routes;
mod state;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use vmvol_volume::Volumes;

pub use error::{status_of, ApiError, ApiResult, ErrorBody, ErrorDetail};
pub use listen::{bind_unix, require_token};
pub use model::*;
pub use openapi::{openapi, ApiDoc};
pub use state::ApiConfig;

use state::AppState;

/// The service's router over `vols`: every endpoint, `GET /openapi.json`,
/// JSON bodies limited to `cfg.json_limit`, a panicking handler answered
/// with a 500. Mount it in an orchestrator's own server or serve it with
/// [`axum::serve()`] on [`bind_unix`]'s listener.
pub fn router(vols: Volumes, cfg: ApiConfig) -> Router {
    service(vols, cfg).0
}

/// A handle on a running service's jobs (see [`service`]).
#[derive(Clone)]
pub struct ApiHandle(Arc<AppState>);

impl std::fmt::Debug for ApiHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiHandle").finish_non_exhaustive()
    }
}

impl ApiHandle {
    /// Asks every running job to stop (at shutdown): each removes what
    /// it was writing. Returns how many were running.
    pub fn cancel_jobs(&self) -> usize {
        self.0.cancel_all()
    }
}

/// [`router`], plus a handle to cancel its jobs when the server stops.
pub fn service(vols: Volumes, cfg: ApiConfig) -> (Router, ApiHandle) {
    let limit = cfg.json_limit;
    let st = Arc::new(AppState::new(vols, cfg));
    let handle = ApiHandle(st.clone());
    let r = harden(
        routes::all()
            .route("/openapi.json", get(openapi_json))
            .fallback(unknown_path)
            .with_state(st),
        limit,
    );
    (r, handle)
}

/// The layers [`router`] puts around its routes, for routes an embedder
/// adds beside them: bodies limited to `body_limit` bytes (for extractors
/// that honour it), and a panicking handler answered with a 500 in the
/// API's error form while the server goes on.
pub fn harden(routes: Router, body_limit: usize) -> Router {
    routes
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panicked))
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

async fn unknown_path(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("{}: no such endpoint", uri.path()))
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("internal error: the request's handler panicked").into_response()
}
