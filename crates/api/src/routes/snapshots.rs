//! Snapshots in seed 004's style: `POST /api/{create,list,describe,delete}-snapshot`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};

use crate::error::{ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::model::{
    CreateSnapshotRequest, Created, DeleteSnapshotRequest, Done, EntryRef, JobAccepted,
    ListSnapshotsRequest,
};
use crate::routes::templates::to_json;
use crate::routes::volumes::created;
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/create-snapshot", post(create_snapshot))
        .route("/api/list-snapshots", post(list_snapshots))
        .route("/api/describe-snapshot", post(describe_snapshot))
        .route("/api/delete-snapshot", post(delete_snapshot))
}

/// Snapshot a detached volume (qcow2: O(1) external snapshot; raw: full copy).
#[utoipa::path(post, path = "/api/create-snapshot", tag = "snapshots",
    request_body = CreateSnapshotRequest,
    responses((status = 201, description = "Created", body = Created),
              (status = 202, description = "Job started", body = JobAccepted), ErrorResponses))]
pub(crate) async fn create_snapshot(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> ApiResult<Response> {
    st.run(
        "create snapshot",
        req.run_async.unwrap_or(false),
        StatusCode::CREATED,
        move |v, ctl| created(v.create_snapshot(&req.pool, &req.name, &req.volume, ctl)?),
    )
    .await
}

/// List a pool's snapshots (of one volume with `volume`).
#[utoipa::path(post, path = "/api/list-snapshots", tag = "snapshots",
    request_body = ListSnapshotsRequest,
    responses((status = 200, description = "`{\"snapshots\": [...]}`", body = Object), ErrorResponses))]
pub(crate) async fn list_snapshots(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ListSnapshotsRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    let rows = st
        .blocking(move |v, _| to_json(&v.list_snapshots(&req.pool, req.volume.as_deref())?))
        .await?;
    Ok(Json(serde_json::json!({ "snapshots": rows })))
}

/// Show a snapshot.
#[utoipa::path(post, path = "/api/describe-snapshot", tag = "snapshots", request_body = EntryRef,
    responses((status = 200, description = "The snapshot", body = Created), ErrorResponses))]
pub(crate) async fn describe_snapshot(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EntryRef>,
) -> ApiResult<Json<Created>> {
    let s = st
        .blocking(move |v, _| created(v.describe_snapshot(&req.pool, &req.name)?))
        .await?;
    Ok(Json(s))
}

/// Delete a snapshot; `merge` pulls its data into its dependents first.
#[utoipa::path(post, path = "/api/delete-snapshot", tag = "snapshots",
    request_body = DeleteSnapshotRequest,
    responses((status = 200, description = "Deleted", body = Done), ErrorResponses))]
pub(crate) async fn delete_snapshot(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DeleteSnapshotRequest>,
) -> ApiResult<Json<Done>> {
    st.blocking(move |v, _| {
        Ok(v.delete_snapshot(&req.pool, &req.name, req.merge.unwrap_or(false))?)
    })
    .await?;
    Ok(Json(Done { ok: true }))
}
