//! The API's OpenAPI 3.1 description, served at `/api/openapi.json`:
//! generated from the handlers' own annotations (utoipa), so it cannot
//! drift from the routes.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::schema::Problem;

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
        description = "The platform's API: accounts, organisations, tokens, sites, usage, payments, tiers. \
            Users log in (a session cookie, plus X-CSRF-Token on changes) or send their API \
            tokens (`cmnu_...`, POST /api/tokens) as bearer tokens; platform \
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
        crate::api::signup,
        crate::api::login,
        crate::api::logout,
        crate::api::me,
        crate::api::orgs,
        crate::api::create_org,
        crate::api::members,
        crate::api::set_members,
        crate::api::audit,
        crate::api::tokens,
        crate::api::create_token,
        crate::api::revoke_token,
        crate::api::catalog_list,
        crate::api::sites,
        crate::api::create_site,
        crate::api::plan,
        crate::api::site,
        crate::api::redeploy_site,
        crate::api::destroy_site,
        crate::api::logs,
        crate::api::history,
        crate::api::history_diff,
        crate::api::backup,
        crate::oidc::register_client,
        crate::books::books_json,
        crate::my_usage::usage_json,
        crate::books::export,
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
