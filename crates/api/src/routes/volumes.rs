//! Seed 004's volume endpoints: `POST /api/{create,delete,list,describe,
//! resize,clone,compress}-volume`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use vmvol_chv::vm::VolumeResized;
use vmvol_volume::{
    CreateVolume, Found, ListFilter, NewSize, SortKey, VolumeDescription, VolumeRecord,
    VolumeSource,
};

use crate::error::{ApiError, ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::model::{
    CloneVolumeRequest, CompressVolumeRequest, CreateVolumeRequest, Created, Done, FormatArg,
    JobAccepted, ListVolumesRequest, ModeArg, PreallocArg, ResizeResult, ResizeVolumeRequest,
    SortArg, StateArg, VolumeList, VolumeRef,
};
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/create-volume", post(create_volume))
        .route("/api/delete-volume", post(delete_volume))
        .route("/api/list-volumes", post(list_volumes))
        .route("/api/describe-volume", post(describe_volume))
        .route("/api/resize-volume", post(resize_volume))
        .route("/api/clone-volume", post(clone_volume))
        .route("/api/compress-volume", post(compress_volume))
}

/// A stored entry as the create calls answer it.
pub(crate) fn created<T: serde::Serialize>(f: Found<T>) -> ApiResult<Created> {
    Ok(Created {
        pool: f.pool,
        id: f.id,
        record: serde_json::to_value(&f.record)
            .map_err(|e| ApiError::internal(format!("encoding the record: {e}")))?,
    })
}

/// The library request a create body stands for.
fn create_request(st: &AppState, req: &CreateVolumeRequest) -> ApiResult<CreateVolume> {
    let size = req.size.as_ref().map(|s| s.bytes()).transpose()?;
    let mode = req.mode.unwrap_or(ModeArg::Linked).into();
    let picked = [
        req.template.is_some(),
        req.snapshot.is_some(),
        req.archive.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if picked > 1 {
        return Err(ApiError::invalid(format!(
            "pool {} volume {}: create volume: give at most one of template, snapshot, archive",
            req.pool, req.name
        )));
    }
    let blank_opts = req.format.is_some() || req.prealloc.is_some() || req.ext4.is_some();
    let source = match (&req.template, &req.snapshot, &req.archive) {
        (Some(t), _, _) => VolumeSource::Template {
            name: t.clone(),
            mode,
        },
        (_, Some(s), _) => VolumeSource::Snapshot {
            name: s.clone(),
            mode,
        },
        (_, _, Some(a)) => VolumeSource::Archive {
            path: st.import_path("archive", a)?,
        },
        _ => VolumeSource::Blank {
            format: req.format.unwrap_or(FormatArg::Qcow2).into(),
            prealloc: req.prealloc.unwrap_or(PreallocArg::Off).into(),
            ext4: req.ext4.unwrap_or(false),
        },
    };
    if blank_opts && !matches!(source, VolumeSource::Blank { .. }) {
        return Err(ApiError::invalid(format!(
            "pool {} volume {}: create volume: format, prealloc and ext4 apply to blank volumes only",
            req.pool, req.name
        )));
    }
    if req.mode.is_some()
        && !matches!(
            source,
            VolumeSource::Template { .. } | VolumeSource::Snapshot { .. }
        )
    {
        return Err(ApiError::invalid(format!(
            "pool {} volume {}: create volume: mode applies to template and snapshot sources only",
            req.pool, req.name
        )));
    }
    Ok(CreateVolume {
        name: req.name.clone(),
        size,
        source,
    })
}

/// Create a volume: blank, from a template or snapshot (linked or full),
/// or from an archive under an import root.
#[utoipa::path(post, path = "/api/create-volume", tag = "volumes",
    request_body = CreateVolumeRequest,
    responses((status = 201, description = "Created", body = Created),
              (status = 202, description = "Job started", body = JobAccepted), ErrorResponses))]
pub(crate) async fn create_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> ApiResult<Response> {
    let cv = create_request(&st, &req)?;
    let pool = req.pool;
    st.run(
        "create volume",
        req.run_async.unwrap_or(false),
        StatusCode::CREATED,
        move |v, ctl| created(v.create_volume(&pool, &cv, ctl)?),
    )
    .await
}

/// Delete a volume (refused while attached).
#[utoipa::path(post, path = "/api/delete-volume", tag = "volumes", request_body = VolumeRef,
    responses((status = 200, description = "Deleted", body = Done), ErrorResponses))]
pub(crate) async fn delete_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<VolumeRef>,
) -> ApiResult<Json<Done>> {
    st.blocking(move |v, _| Ok(v.delete_volume(&req.pool, &req.name)?))
        .await?;
    Ok(Json(Done { ok: true }))
}

/// List volumes with filters (pool, attached/available, format, name substring).
#[utoipa::path(post, path = "/api/list-volumes", tag = "volumes", request_body = ListVolumesRequest,
    responses((status = 200, description = "Volumes", body = VolumeList), ErrorResponses))]
pub(crate) async fn list_volumes(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ListVolumesRequest>,
) -> ApiResult<Json<VolumeList>> {
    let filter = ListFilter {
        pool: req.pool,
        attached: req.state.map(|s| s == StateArg::Attached),
        format: req.format.map(Into::into),
        name: req.name,
        sort: match req.sort.unwrap_or(SortArg::Name) {
            SortArg::Name => SortKey::Name,
            SortArg::Created => SortKey::Created,
            SortArg::Size => SortKey::Size,
            SortArg::Pool => SortKey::Pool,
        },
    };
    let volumes = st
        .blocking(move |v, _| Ok(v.list_volumes(&filter)?))
        .await?;
    Ok(Json(VolumeList { volumes }))
}

/// Everything about a volume: the object `vmvol volume describe --output json` prints.
#[utoipa::path(post, path = "/api/describe-volume", tag = "volumes", request_body = VolumeRef,
    responses((status = 200, description = "The volume", body = Object), ErrorResponses))]
pub(crate) async fn describe_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<VolumeRef>,
) -> ApiResult<Json<VolumeDescription>> {
    let d = st
        .blocking(move |v, _| Ok(v.describe_volume(&req.pool, &req.name)?))
        .await?;
    Ok(Json(d))
}

/// Grow a volume (shrinking is refused with 400). Attached read-write: an
/// RBD volume is grown by its export daemon and recorded; for a host file
/// the answer carries Cloud Hypervisor's resize request.
#[utoipa::path(post, path = "/api/resize-volume", tag = "volumes", request_body = ResizeVolumeRequest,
    responses((status = 200, description = "Resized", body = ResizeResult), ErrorResponses))]
pub(crate) async fn resize_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> ApiResult<Json<ResizeResult>> {
    let size = match &req.size {
        crate::model::SizeArg::Text(t) if t.trim_start().starts_with('+') => NewSize::Grow(
            crate::model::parse_size(t.trim_start().trim_start_matches('+'))
                .map_err(ApiError::invalid)?,
        ),
        s => NewSize::To(s.bytes()?),
    };
    let r = st
        .blocking(move |v, _| {
            Ok(
                match vmvol_chv::vm::resize_volume(v, &req.pool, &req.name, size)? {
                    VolumeResized::Done {
                        old_size,
                        new_size,
                        online,
                        note,
                    } => ResizeResult {
                        name: req.name,
                        online,
                        old_size,
                        new_size,
                        request: None,
                        note,
                    },
                    // The service cannot reach the VMM: hand the request
                    // back; the reservation is released when `on` drops.
                    VolumeResized::Vmm(on) => ResizeResult {
                        name: req.name,
                        online: true,
                        old_size: on.old_size,
                        new_size: on.request.desired_size,
                        request: Some(on.request.clone()),
                        note: on.note.clone(),
                    },
                },
            )
        })
        .await?;
    Ok(Json(r))
}

/// Full independent copy, in the same or another pool.
#[utoipa::path(post, path = "/api/clone-volume", tag = "volumes", request_body = CloneVolumeRequest,
    responses((status = 201, description = "Cloned", body = Created),
              (status = 202, description = "Job started", body = JobAccepted), ErrorResponses))]
pub(crate) async fn clone_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CloneVolumeRequest>,
) -> ApiResult<Response> {
    st.run(
        "clone volume",
        req.run_async.unwrap_or(false),
        StatusCode::CREATED,
        move |v, ctl| {
            let f: Found<VolumeRecord> = v.clone_volume(
                &req.pool,
                &req.name,
                &req.new_name,
                req.to_pool.as_deref(),
                ctl,
            )?;
            created(f)
        },
    )
    .await
}

/// Reclaim unused space of a detached qcow2 volume (raw is refused).
#[utoipa::path(post, path = "/api/compress-volume", tag = "volumes", request_body = CompressVolumeRequest,
    responses((status = 200, description = "Compacted: host bytes before and after", body = Object),
              (status = 202, description = "Job started", body = JobAccepted), ErrorResponses))]
pub(crate) async fn compress_volume(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompressVolumeRequest>,
) -> ApiResult<Response> {
    let c = req.compress.unwrap_or(false).then(|| {
        req.compression_type
            .unwrap_or(crate::model::CompressionArg::Zstd)
            .into()
    });
    st.run(
        "compress volume",
        req.run_async.unwrap_or(false),
        StatusCode::OK,
        move |v, ctl| Ok(v.compress_volume(&req.pool, &req.name, c, ctl)?),
    )
    .await
}
