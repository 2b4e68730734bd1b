//! The one error type of `vmvol-api` and its HTTP form:
//! `{"error": {"kind", "message"}}` with a status chosen by kind.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use vmvol_volume::ErrorKind;

/// Everything a request can fail with. The message is the one line the
/// CLI prints for the same failure (paths outside the pools redacted).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// Machine-readable kind (`not_found`, `in_use`, ...).
    pub kind: &'static str,
    /// One line naming the object, the operation and the reason.
    pub message: String,
}

/// Result with [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// `invalid_argument`, `not_found`, `already_exists`, `in_use`,
    /// `has_dependents`, `busy`, `refused`, `insufficient_space`,
    /// `payload_too_large`, `unauthorized`, `corrupt`, `io`, `cancelled`,
    /// `internal`.
    pub kind: String,
    /// One line: object, operation, reason.
    pub message: String,
}

/// The status and kind name of a volume-layer error kind.
pub fn status_of(kind: ErrorKind) -> (StatusCode, &'static str) {
    match kind {
        ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_argument"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
        ErrorKind::InUse => (StatusCode::CONFLICT, "in_use"),
        ErrorKind::HasDependents => (StatusCode::CONFLICT, "has_dependents"),
        ErrorKind::Busy => (StatusCode::CONFLICT, "busy"),
        // Well-formed but not allowed in this state (raw compress, inactive
        // pool, archive over its limits): a conflict with the state.
        ErrorKind::Refused => (StatusCode::CONFLICT, "refused"),
        ErrorKind::Cancelled => (StatusCode::CONFLICT, "cancelled"),
        ErrorKind::InsufficientSpace => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_space"),
        ErrorKind::Corrupt => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt"),
        ErrorKind::Io => (StatusCode::INTERNAL_SERVER_ERROR, "io"),
    }
}

impl ApiError {
    /// An error of `status` and `kind`.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// 400.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 413.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// 500 for failures of the service itself.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                kind: self.kind.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl From<vmvol_volume::Error> for ApiError {
    fn from(e: vmvol_volume::Error) -> ApiError {
        let (status, kind) = status_of(e.kind());
        ApiError::new(status, kind, e.to_string())
    }
}

impl From<vmvol_pool::Error> for ApiError {
    fn from(e: vmvol_pool::Error) -> ApiError {
        use vmvol_pool::Error as P;
        let kind = match &e {
            P::InvalidName { .. } | P::InvalidSpec { .. } | P::InvalidImage { .. } => {
                ErrorKind::InvalidArgument
            }
            // The registry's own message names its directory: say less.
            P::PoolNotFound { name, .. } => {
                return ApiError::not_found(format!("pool {name}: not defined"))
            }
            P::EntryNotFound { .. } | P::ImageNotFound { .. } => ErrorKind::NotFound,
            P::AlreadyDefined { name, .. } => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "already_exists",
                    format!("pool {name}: already defined"),
                )
            }
            P::EntryExists { .. } | P::PathInUse { .. } => ErrorKind::AlreadyExists,
            P::InsufficientSpace { .. } | P::InsufficientPhysicalSpace { .. } => {
                ErrorKind::InsufficientSpace
            }
            P::NotEmpty { .. } => ErrorKind::HasDependents,
            P::Inactive { .. } | P::Fenced { .. } | P::BackendNotBuiltIn { .. } => {
                ErrorKind::Refused
            }
            P::Busy { .. } => ErrorKind::Busy,
            P::Damaged { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        };
        let (status, kind) = status_of(kind);
        ApiError::new(status, kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// The error answers every endpoint may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum ErrorResponses {
    /// Invalid argument: bad JSON, bad name, bad size, shrink.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// TCP listener without the bearer token, or with a wrong one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Import from a path outside the operator's import roots.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The pool, volume, template, snapshot or job does not exist.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Exists, in use, has dependents, busy, refused in this state, cancelled.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Body over its limit (JSON 1 MiB; an archive over its volume's size).
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Damaged data, an I/O failure, or a failure of the service.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The pool has no room.
    #[response(status = 507)]
    InsufficientStorage(ErrorBody),
}
