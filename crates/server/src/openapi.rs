//! The API's OpenAPI 3.1 description, served at `/api/openapi.json`:
//! generated from the handlers' own annotations (utoipa), so it cannot
//! drift from the routes.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// An RFC 9457 problem document: every error the API answers.
#[derive(ToSchema)]
#[allow(dead_code)] // described, not built: errors are written by `problem()`
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank`).
    r#type: String,
    title: String,
    status: u16,
    /// What went wrong and how to fix it.
    detail: String,
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "OneCommons",
        description = "The platform's API: usage, payments, tiers, deployments. \
            Bearer tokens carry scopes (`commons token create NAME --scope SCOPE`); \
            errors are RFC 9457 problem documents."
    ),
    paths(
        crate::healthz,
        crate::ready,
        crate::openapi_json,
        crate::ingest,
        crate::stripe_webhook,
        crate::tier,
        crate::wake,
        crate::deployment_status,
        crate::daemon,
    ),
    components(schemas(Problem)),
    modifiers(&Bearer)
)]
struct Doc;

/// The document, as served.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = Doc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}
