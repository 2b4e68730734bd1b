//! The `/volumes` API of the VM manager seed 000 describes, on the pool
//! named by [`ApiConfig::default_pool`](crate::ApiConfig): its clients work
//! unchanged against vmvol.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::AsyncWriteExt;
use vmvol_format::{Format, Prealloc};
use vmvol_pool::{EntryKind, Listed};
use vmvol_volume::{CreateVolume, VolumeRecord, VolumeSource, Volumes};

use crate::error::{ApiError, ApiResult, ErrorResponses};
use crate::extract::ApiPath;
use crate::model::{CreateVolumeJson, CreateVolumeMultipart, Volume};
use crate::state::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        // Archives are bounded by their volume's size, checked while
        // streaming, not by the JSON body limit.
        .route(
            "/volumes",
            get(list).post(create).layer(DefaultBodyLimit::disable()),
        )
        .route("/volumes/{id}", get(show).delete(remove))
}

const GIB: u64 = 1 << 30;

/// Every readable volume of the default pool, oldest first.
fn volumes_of(v: &Volumes, pool: &str) -> ApiResult<Vec<Volume>> {
    let p = v.pool(pool)?;
    let mut out: Vec<Volume> = p
        .list::<VolumeRecord>(EntryKind::Volume, |_, _| true)?
        .into_iter()
        .filter_map(|l| match l {
            Listed::Ok(e) => Some(Volume::from_record(&e.id, &e.record.data)),
            Listed::Damaged(_) => None,
        })
        .collect();
    out.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    Ok(out)
}

/// Volume `key` (UUID or name) of the default pool.
fn volume_of(v: &Volumes, pool: &str, key: &str) -> ApiResult<Volume> {
    let p = v.pool(pool)?;
    if vmvol_volume::validate_name("volume", "get volume", key).is_err()
        && uuid::Uuid::parse_str(key).is_err()
    {
        return Err(ApiError::invalid(format!(
            "volume {key:?}: get volume: not a volume name or id"
        )));
    }
    if p.contains(EntryKind::Volume, key)? {
        let e = p.get::<VolumeRecord>(EntryKind::Volume, key)?;
        return Ok(Volume::from_record(&e.id, &e.record.data));
    }
    p.list::<VolumeRecord>(EntryKind::Volume, |_, r| r.name == key)?
        .into_iter()
        .find_map(|l| match l {
            Listed::Ok(e) => Some(Volume::from_record(&e.id, &e.record.data)),
            Listed::Damaged(_) => None,
        })
        .ok_or_else(|| {
            ApiError::not_found(format!("pool {pool} volume {key}: get volume: not found"))
        })
}

/// List the volumes.
#[utoipa::path(get, path = "/volumes", tag = "volumes (seed 000)",
    responses((status = 200, description = "The volumes", body = Vec<Volume>), ErrorResponses))]
pub(crate) async fn list(State(st): State<Arc<AppState>>) -> ApiResult<Json<Vec<Volume>>> {
    let pool = st.cfg.default_pool.clone();
    Ok(Json(st.blocking(move |v, _| volumes_of(v, &pool)).await?))
}

/// Show one volume by id or name.
#[utoipa::path(get, path = "/volumes/{id}", tag = "volumes (seed 000)",
    params(("id" = String, Path, description = "Volume id or name")),
    responses((status = 200, description = "The volume", body = Volume), ErrorResponses))]
pub(crate) async fn show(
    State(st): State<Arc<AppState>>,
    ApiPath(id): ApiPath,
) -> ApiResult<Json<Volume>> {
    let pool = st.cfg.default_pool.clone();
    Ok(Json(
        st.blocking(move |v, _| volume_of(v, &pool, &id)).await?,
    ))
}

/// Delete a volume by id or name (409 while attached).
#[utoipa::path(delete, path = "/volumes/{id}", tag = "volumes (seed 000)",
    params(("id" = String, Path, description = "Volume id or name")),
    responses((status = 204, description = "Deleted"), ErrorResponses))]
pub(crate) async fn remove(
    State(st): State<Arc<AppState>>,
    ApiPath(id): ApiPath,
) -> ApiResult<StatusCode> {
    let pool = st.cfg.default_pool.clone();
    st.blocking(move |v, _| Ok(v.delete_volume(&pool, &id)?))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A ext4-formatted sparse volume: JSON `{"name", "size_gb"}`, or
/// `multipart/form-data` with `name`, `size_gb` and `content`, a tar.gz
/// (at most `size_gb` GiB) whose tree the volume holds.
#[utoipa::path(post, path = "/volumes", tag = "volumes (seed 000)",
    request_body(content(
        (CreateVolumeJson = "application/json"),
        (CreateVolumeMultipart = "multipart/form-data"))),
    responses((status = 201, description = "Created", body = Volume), ErrorResponses))]
pub(crate) async fn create(
    State(st): State<Arc<AppState>>,
    req: Request,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let pool = st.cfg.default_pool.clone();
    let (name, size_gb, id, upload) = if ct.starts_with("multipart/form-data") {
        let mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::invalid(format!("request body: {}", e.body_text())))?;
        let (name, size_gb, id, file) = read_multipart(&st, mp).await?;
        (name, size_gb, id, Some(file))
    } else if ct.starts_with("application/json") {
        let bytes = axum::body::to_bytes(req.into_body(), st.cfg.json_limit)
            .await
            .map_err(|_| ApiError::too_large("request body: too large"))?;
        let b: CreateVolumeJson = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
        (b.name, b.size_gb, b.id, None)
    } else {
        return Err(ApiError::invalid(
            "request body: expected application/json or multipart/form-data",
        ));
    };
    let size = size_gb
        .checked_mul(GIB)
        .ok_or_else(|| ApiError::invalid(format!("volume {name}: size_gb {size_gb}: too large")))?;
    let v = st
        .blocking(move |v, ctl| {
            let source = match &upload {
                Some(f) => VolumeSource::Archive {
                    path: f.path().to_path_buf(),
                },
                None => VolumeSource::Blank {
                    format: Format::Raw,
                    prealloc: Prealloc::Off,
                    ext4: true,
                },
            };
            let req = CreateVolume {
                name,
                size: Some(size),
                source,
            };
            // The seed's clients may choose the id; vmvol keeps it as the
            // volume's UUID (pool entry id).
            let f = match &id {
                Some(id) => v.create_volume_as(&pool, id, &req, ctl)?,
                None => v.create_volume(&pool, &req, ctl)?,
            };
            drop(upload);
            Ok(Volume::from_record(&f.id, &f.record))
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Reads the form: text fields `name`, `size_gb`, `id`, and the file field
/// `content` streamed to a temporary file, at most `size_gb` GiB.
async fn read_multipart(
    st: &AppState,
    mut mp: Multipart,
) -> ApiResult<(String, u64, Option<String>, tempfile::NamedTempFile)> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("request body: too large")
        } else {
            ApiError::invalid(format!("request body: {}", e.body_text()))
        }
    };
    let text_limit = 4096;
    let mut name = None;
    let mut id = None;
    let mut size_gb: Option<u64> = None;
    let mut content: Option<(tempfile::NamedTempFile, u64)> = None;
    while let Some(mut field) = mp.next_field().await.map_err(bad)? {
        let fname = field.name().unwrap_or("").to_string();
        match fname.as_str() {
            "content" => {
                let staged = tempfile::Builder::new()
                    .prefix(".vmvol-upload-")
                    .tempfile_in(&st.cfg.upload_dir)
                    .and_then(|t| Ok((t.as_file().try_clone()?, t)))
                    .map_err(|e| ApiError::internal(format!("upload: staging file: {e}")))?;
                let (mut f, tmp) = (tokio::fs::File::from_std(staged.0), staged.1);
                let cap = size_gb.map(|g| g.saturating_mul(GIB));
                let mut n = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    n = n.saturating_add(chunk.len() as u64);
                    if cap.is_some_and(|c| n > c) {
                        return Err(too_big(size_gb.unwrap_or(0)));
                    }
                    f.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::internal(format!("upload: writing: {e}")))?;
                }
                f.flush()
                    .await
                    .map_err(|e| ApiError::internal(format!("upload: writing: {e}")))?;
                content = Some((tmp, n));
            }
            "name" | "size_gb" | "id" => {
                let mut buf = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    buf.extend_from_slice(&chunk);
                    if buf.len() > text_limit {
                        return Err(ApiError::too_large(format!(
                            "request body: field {fname}: too large"
                        )));
                    }
                }
                let text = String::from_utf8(buf).map_err(|_| {
                    ApiError::invalid(format!("request body: field {fname}: not UTF-8"))
                })?;
                match fname.as_str() {
                    "name" => name = Some(text),
                    "size_gb" => {
                        size_gb = Some(text.trim().parse().map_err(|_| {
                            ApiError::invalid(format!(
                                "request body: size_gb {text:?}: not a whole number"
                            ))
                        })?)
                    }
                    _ => id = Some(text),
                }
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "request body: unknown field {other:?} (name, size_gb, id, content)"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| ApiError::invalid("request body: missing field name"))?;
    let size_gb =
        size_gb.ok_or_else(|| ApiError::invalid("request body: missing field size_gb"))?;
    let (file, n) =
        content.ok_or_else(|| ApiError::invalid("request body: missing field content"))?;
    if n > size_gb.saturating_mul(GIB) {
        return Err(too_big(size_gb));
    }
    Ok((name, size_gb, id, file))
}

fn too_big(size_gb: u64) -> ApiError {
    ApiError::too_large(format!(
        "request body: content: larger than the volume ({size_gb} GiB)"
    ))
}
