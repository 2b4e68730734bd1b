//! The OpenAPI document, generated from the handlers' annotations and the
//! body types in [`crate::model`] (served at `GET /openapi.json`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};
use crate::model::*;
use crate::routes::{compat, instances, jobs, pools, snapshots, templates, volumes};

/// The document's generator.
#[derive(OpenApi)]
#[openapi(
    info(title = "vmvol", description = "Persistent VM block volumes: seed 004's /api/* endpoints and the /volumes API. Over TCP every request needs `Authorization: Bearer <token>`; over the Unix socket the socket's mode (0600) is the access control."),
    paths(
        volumes::create_volume, volumes::delete_volume, volumes::list_volumes,
        volumes::describe_volume, volumes::resize_volume, volumes::clone_volume,
        volumes::compress_volume,
        pools::define_pool, pools::list_pools, pools::describe_pool, pools::activate_pool,
        pools::deactivate_pool, pools::undefine_pool,
        templates::create_template, templates::list_templates, templates::describe_template,
        templates::delete_template,
        snapshots::create_snapshot, snapshots::list_snapshots, snapshots::describe_snapshot,
        snapshots::delete_snapshot,
        instances::attach_instance, instances::detach_instance,
        instances::describe_instance, instances::list_instances,
        jobs::get_job, jobs::cancel_job,
        compat::list, compat::create, compat::show, compat::remove,
    ),
    components(schemas(ErrorBody, ErrorDetail, SizeArg, FormatArg, PreallocArg, ModeArg,
        CompressionArg, StateArg, SortArg, JobState, Progress, ImageTypeArg, OverlayKindArg,
        AttachVolumeArg)),
    modifiers(&Bearer),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as JSON.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
