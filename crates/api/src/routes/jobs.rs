//! Jobs: `GET /api/jobs/{id}` and `POST /api/cancel-job`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::error::{ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::extract::ApiPath;
use crate::model::{CancelJobRequest, JobView};
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/cancel-job", post(cancel_job))
}

/// A job's state, progress, and result or error.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = JobView), ErrorResponses))]
pub(crate) async fn get_job(
    State(st): State<Arc<AppState>>,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<JobView>> {
    Ok(Json(st.job(&id)?))
}

/// Ask a job to stop. The operation removes what it was writing; the job
/// ends `cancelled` (or `succeeded` if it had already committed).
#[utoipa::path(post, path = "/api/cancel-job", tag = "jobs", request_body = CancelJobRequest,
    responses((status = 200, description = "The job, cancel requested", body = JobView), ErrorResponses))]
pub(crate) async fn cancel_job(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CancelJobRequest>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(st.cancel(&req.id)?))
}
