//! A JSON body extractor whose failures answer in the API's error form.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `axum::Json`, with rejections as [`ApiError`]: 413 past the body
/// limit, 400 for everything else (bad JSON, wrong fields, no JSON
/// content type).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(rejection(e)),
        }
    }
}

fn rejection(e: JsonRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::too_large(
            "request body: too large (the JSON body limit is 1 MiB by default)",
        );
    }
    ApiError::invalid(format!("request body: {}", e.body_text()))
}

/// The one path parameter of a route, with rejections (bad percent
/// encoding, not UTF-8) as a 400 in the API's error form.
pub struct ApiPath(pub String);

impl<S> axum::extract::FromRequestParts<S> for ApiPath
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(p)) => Ok(ApiPath(p)),
            Err(e) => Err(ApiError::invalid(format!(
                "request path: {}",
                e.body_text()
            ))),
        }
    }
}
