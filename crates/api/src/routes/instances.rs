//! Instances: `POST /api/{attach,detach,describe,list}-instance(s)`. An
//! instance gets all its volumes when it is created (all or nothing, the
//! attachment rules of the volume layer), and the answer is what Cloud
//! Hypervisor needs: the `DiskConfig` array and the config disk.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use vmvol_chv::vm::{Vm, VmDisks};
use vmvol_volume::{AttachVolume, OverlayKind};

use crate::error::{ApiError, ApiResult, ErrorResponses};
use crate::extract::ApiJson;
use crate::model::{
    AttachInstanceRequest, DetachResult, InstanceList, InstanceRef, InstanceView, OverlayKindArg,
};
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/attach-instance", post(attach_instance))
        .route("/api/detach-instance", post(detach_instance))
        .route("/api/describe-instance", post(describe_instance))
        .route("/api/list-instances", post(list_instances))
}

fn json<T: serde::Serialize>(v: &T) -> ApiResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
}

fn view(vm: &Vm) -> ApiResult<InstanceView> {
    Ok(InstanceView {
        instance: json(&vm.instance.instance)?,
        disks: vm
            .plan
            .disk_configs()
            .iter()
            .map(json)
            .collect::<ApiResult<_>>()?,
        volume_mounts: vm
            .plan
            .volume_mounts
            .iter()
            .map(json)
            .collect::<ApiResult<_>>()?,
        config_disk: vm.config_disk.display().to_string(),
    })
}

/// Attach every volume of a new instance (all or nothing) and write its
/// config disk. 409 when a rule refuses (naming the holders) or the
/// instance exists; 400 for a bad mount path, device count or overlay.
#[utoipa::path(post, path = "/api/attach-instance", tag = "instances",
    request_body = AttachInstanceRequest,
    responses((status = 201, description = "Attached", body = InstanceView), ErrorResponses))]
pub(crate) async fn attach_instance(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<AttachInstanceRequest>,
) -> ApiResult<(StatusCode, Json<InstanceView>)> {
    let volumes = req
        .volumes
        .iter()
        .map(|v| {
            Ok(AttachVolume {
                pool: v.pool.clone(),
                volume_id: v.volume_id.clone(),
                mount_path: v.mount_path.clone(),
                readonly: v.readonly,
                overlay: v.overlay,
                overlay_size: v.overlay_size.as_ref().map(|s| s.bytes()).transpose()?,
                overlay_kind: match v.overlay_kind {
                    OverlayKindArg::GuestOverlayfs => OverlayKind::GuestOverlayfs,
                    OverlayKindArg::Block => OverlayKind::Block,
                },
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let disks = VmDisks {
        rootfs: req.rootfs.clone().into(),
        rootfs_image_type: req.rootfs_image_type.into(),
        instance_overlay: req.instance_overlay.clone().into(),
        instance_overlay_image_type: req.instance_overlay_image_type.into(),
        config_extra: req.config_extra.clone(),
    };
    let id = req.instance.clone();
    let v = st
        .blocking(move |v, _| view(&vmvol_chv::vm::attach(v, &id, volumes, &disks)?))
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Detach every volume of an instance: overlays and the config disk go,
/// volumes stay. Idempotent (an unknown instance detaches nothing).
#[utoipa::path(post, path = "/api/detach-instance", tag = "instances", request_body = InstanceRef,
    responses((status = 200, description = "Detached", body = DetachResult), ErrorResponses))]
pub(crate) async fn detach_instance(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<InstanceRef>,
) -> ApiResult<Json<DetachResult>> {
    let r = st
        .blocking(move |v, _| {
            let d = vmvol_chv::vm::detach(v, &req.instance)?;
            Ok(DetachResult {
                instance: d.instance,
                volumes: d.volumes.iter().map(json).collect::<ApiResult<_>>()?,
            })
        })
        .await?;
    Ok(Json(r))
}

/// An instance: its record, `DiskConfig`s and mount plan.
#[utoipa::path(post, path = "/api/describe-instance", tag = "instances", request_body = InstanceRef,
    responses((status = 200, description = "The instance", body = InstanceView), ErrorResponses))]
pub(crate) async fn describe_instance(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<InstanceRef>,
) -> ApiResult<Json<InstanceView>> {
    let v = st
        .blocking(move |v, _| view(&vmvol_chv::vm::show(v, &req.instance)?))
        .await?;
    Ok(Json(v))
}

/// The instances of this host.
#[utoipa::path(post, path = "/api/list-instances", tag = "instances",
    responses((status = 200, description = "Instances", body = InstanceList), ErrorResponses))]
pub(crate) async fn list_instances(
    State(st): State<Arc<AppState>>,
) -> ApiResult<Json<InstanceList>> {
    let rows = st
        .blocking(move |v, _| {
            v.list_instances()?
                .iter()
                .map(json)
                .collect::<ApiResult<Vec<_>>>()
        })
        .await?;
    Ok(Json(InstanceList { instances: rows }))
}
