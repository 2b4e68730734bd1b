//! Templates in seed 004's style: `POST /api/{create,list,describe,delete}-template`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};

use crate::error::{ApiError, ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::model::{CreateTemplateRequest, Created, Done, EntryRef, InPool, JobAccepted};
use crate::routes::volumes::created;
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/create-template", post(create_template))
        .route("/api/list-templates", post(list_templates))
        .route("/api/describe-template", post(describe_template))
        .route("/api/delete-template", post(delete_template))
}

/// `value` as JSON, or a 500 naming what could not be encoded.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> ApiResult<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

/// Create a template: a frozen copy of a volume, or an image file imported
/// from under one of the server's import roots.
#[utoipa::path(post, path = "/api/create-template", tag = "templates",
    request_body = CreateTemplateRequest,
    responses((status = 201, description = "Created", body = Created),
              (status = 202, description = "Job started", body = JobAccepted), ErrorResponses))]
pub(crate) async fn create_template(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateTemplateRequest>,
) -> ApiResult<Response> {
    let image = match (&req.volume, &req.image) {
        (Some(_), None) => None,
        (None, Some(p)) => Some(st.import_path("image", p)?),
        _ => {
            return Err(ApiError::invalid(format!(
                "pool {} template {}: create template: give exactly one of volume, image",
                req.pool, req.name
            )))
        }
    };
    st.run(
        "create template",
        req.run_async.unwrap_or(false),
        StatusCode::CREATED,
        move |v, ctl| match (image, &req.volume) {
            (Some(path), _) => created(v.import_template(&req.pool, &req.name, &path, ctl)?),
            (None, Some(vol)) => {
                created(v.create_template_from_volume(&req.pool, &req.name, vol, ctl)?)
            }
            (None, None) => Err(ApiError::invalid("create template: no source")),
        },
    )
    .await
}

/// List a pool's templates.
#[utoipa::path(post, path = "/api/list-templates", tag = "templates", request_body = InPool,
    responses((status = 200, description = "`{\"templates\": [...]}`", body = Object), ErrorResponses))]
pub(crate) async fn list_templates(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<InPool>,
) -> ApiResult<Json<serde_json::Value>> {
    let rows = st
        .blocking(move |v, _| to_json(&v.list_templates(&req.pool)?))
        .await?;
    Ok(Json(serde_json::json!({ "templates": rows })))
}

/// Show a template.
#[utoipa::path(post, path = "/api/describe-template", tag = "templates", request_body = EntryRef,
    responses((status = 200, description = "The template", body = Created), ErrorResponses))]
pub(crate) async fn describe_template(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EntryRef>,
) -> ApiResult<Json<Created>> {
    let t = st
        .blocking(move |v, _| created(v.describe_template(&req.pool, &req.name)?))
        .await?;
    Ok(Json(t))
}

/// Delete a template (refused while volumes or snapshots are linked to it).
#[utoipa::path(post, path = "/api/delete-template", tag = "templates", request_body = EntryRef,
    responses((status = 200, description = "Deleted", body = Done), ErrorResponses))]
pub(crate) async fn delete_template(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<EntryRef>,
) -> ApiResult<Json<Done>> {
    st.blocking(move |v, _| Ok(v.delete_template(&req.pool, &req.name)?))
        .await?;
    Ok(Json(Done { ok: true }))
}
