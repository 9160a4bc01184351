//! The API's OpenAPI 3.1 description, served at `/api/openapi.json`:
//! generated from the handlers' own annotations (utoipa), so it cannot
//! drift from the routes.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::Object;
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

/// 401, the same for every route that needs a caller.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 401,
    description = "not logged in: no live session cookie or bearer token",
    content_type = "application/problem+json"
)]
#[allow(dead_code)] // described, not built
pub struct Unauthenticated(Problem);

/// 400, the same for every route that reads a JSON object.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 400,
    description = "the body is not the JSON object documented",
    content_type = "application/problem+json"
)]
#[allow(dead_code)] // described, not built
pub struct Malformed(Problem);

/// 400, the same for every route that reads query parameters.
#[derive(utoipa::IntoResponses)]
#[response(
    status = 400,
    description = "a query parameter is not of the type documented",
    content_type = "application/problem+json"
)]
#[allow(dead_code)] // described, not built
pub struct BadQuery(Problem);

/// A usage event, CloudEvents 1.0 shaped (the meter checks the rest: that
/// `data` holds known metrics, and the time's period is still open).
#[derive(ToSchema)]
#[allow(dead_code)] // described: the meter's `Event` is what is built
pub struct UsageEvent {
    #[schema(required = false, example = "1.0")]
    specversion: String,
    /// Unique per `source`: sending it again is harmless.
    #[schema(min_length = 1)]
    id: String,
    #[schema(min_length = 1)]
    source: String,
    #[schema(min_length = 1, example = "org.onecommons.usage")]
    r#type: String,
    subject: Option<String>,
    #[schema(format = DateTime)]
    time: String,
    /// The dimensions (user, site, operator, provider) and metrics.
    #[schema(required = false)]
    data: Object,
}

/// A site's hosting plan, as the API takes it.
#[derive(ToSchema)]
#[schema(rename_all = "kebab-case")]
#[allow(dead_code)] // described: the engine's `Hosting` is what is built
pub enum Hosting {
    /// Idled when nobody uses it, woken by the next request.
    Free,
    /// Kept running.
    AlwaysOn,
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
