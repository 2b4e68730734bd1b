//! Pools in seed 004's style: `POST /api/{define,list,describe,activate,
//! deactivate,undefine}-pool`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use vmvol_pool::{CapacityPolicy, PoolConfig, PoolDescription, PoolSpec, Wait};

use crate::error::{ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::model::{DefinePoolRequest, Done, PoolList, PoolRef};
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/define-pool", post(define_pool))
        .route("/api/list-pools", post(list_pools))
        .route("/api/describe-pool", post(describe_pool))
        .route("/api/activate-pool", post(activate_pool))
        .route("/api/deactivate-pool", post(deactivate_pool))
        .route("/api/undefine-pool", post(undefine_pool))
}

/// Define a pool under the registry (it starts inactive unless `activate`).
/// Pools live in the registry's own directory: the API takes no path.
#[utoipa::path(post, path = "/api/define-pool", tag = "pools", request_body = DefinePoolRequest,
    responses((status = 201, description = "The pool's configuration", body = Object), ErrorResponses))]
pub(crate) async fn define_pool(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DefinePoolRequest>,
) -> ApiResult<(StatusCode, Json<PoolConfig>)> {
    let quota = req.quota.as_ref().map(|q| q.bytes()).transpose()?;
    let spec = PoolSpec {
        path: None,
        capacity: match quota {
            Some(bytes) => CapacityPolicy::Quota { bytes },
            None => CapacityPolicy::Filesystem,
        },
        overcommit_ratio: req.overcommit.unwrap_or(1.0),
    };
    let cfg = st
        .blocking(move |v, _| {
            let reg = v.registry();
            let mut cfg = reg.define(&req.name, &spec)?;
            if req.activate.unwrap_or(false) {
                cfg = reg.activate(&req.name, Wait::Block)?;
            }
            Ok(cfg)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(cfg)))
}

/// List pools (damaged ones are listed too, never hidden).
#[utoipa::path(post, path = "/api/list-pools", tag = "pools",
    responses((status = 200, description = "Pools", body = PoolList), ErrorResponses))]
pub(crate) async fn list_pools(State(st): State<Arc<AppState>>) -> ApiResult<Json<PoolList>> {
    let pools = st.blocking(|v, _| Ok(v.registry().list()?)).await?;
    Ok(Json(PoolList { pools }))
}

/// A pool's figures: capacity, allocation, physical use, available, entries.
#[utoipa::path(post, path = "/api/describe-pool", tag = "pools", request_body = PoolRef,
    responses((status = 200, description = "The pool", body = Object), ErrorResponses))]
pub(crate) async fn describe_pool(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PoolRef>,
) -> ApiResult<Json<PoolDescription>> {
    let d = st
        .blocking(move |v, _| Ok(v.registry().info(&req.name, Wait::Block)?))
        .await?;
    Ok(Json(d))
}

/// Allow volume work in a pool.
#[utoipa::path(post, path = "/api/activate-pool", tag = "pools", request_body = PoolRef,
    responses((status = 200, description = "The pool's configuration", body = Object), ErrorResponses))]
pub(crate) async fn activate_pool(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PoolRef>,
) -> ApiResult<Json<PoolConfig>> {
    let c = st
        .blocking(move |v, _| {
            let c = v.registry().activate(&req.name, Wait::Block)?;
            // Reopen on next use: recovery runs on open of an active pool.
            v.forget_pools();
            Ok(c)
        })
        .await?;
    Ok(Json(c))
}

/// Refuse volume work in a pool.
#[utoipa::path(post, path = "/api/deactivate-pool", tag = "pools", request_body = PoolRef,
    responses((status = 200, description = "The pool's configuration", body = Object), ErrorResponses))]
pub(crate) async fn deactivate_pool(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PoolRef>,
) -> ApiResult<Json<PoolConfig>> {
    let c = st
        .blocking(move |v, _| {
            let c = v.registry().deactivate(&req.name, Wait::Block)?;
            v.forget_pools();
            Ok(c)
        })
        .await?;
    Ok(Json(c))
}

/// Remove an empty pool.
#[utoipa::path(post, path = "/api/undefine-pool", tag = "pools", request_body = PoolRef,
    responses((status = 200, description = "Undefined", body = Done), ErrorResponses))]
pub(crate) async fn undefine_pool(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PoolRef>,
) -> ApiResult<Json<Done>> {
    st.blocking(move |v, _| {
        v.registry().undefine(&req.name, Wait::Block)?;
        v.forget_pools();
        Ok(())
    })
    .await?;
    Ok(Json(Done { ok: true }))
}
