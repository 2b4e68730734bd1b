//! Handlers, one module per noun. Each module's `routes()` returns its part
//! of the router; [`all`] merges them.

pub(crate) mod compat;
pub(crate) mod instances;
pub(crate) mod jobs;
pub(crate) mod pools;
pub(crate) mod snapshots;
pub(crate) mod templates;
pub(crate) mod volumes;

use std::sync::Arc;

use axum::Router;

use crate::state::AppState;

/// Every endpoint. A new noun is one more module here with its `routes()`
/// merged below and its paths listed in [`crate::openapi::ApiDoc`].
pub(crate) fn all() -> Router<Arc<AppState>> {
    Router::new()
        .merge(volumes::routes())
        .merge(pools::routes())
        .merge(templates::routes())
        .merge(snapshots::routes())
        .merge(instances::routes())
        .merge(jobs::routes())
        .merge(compat::routes())
}
