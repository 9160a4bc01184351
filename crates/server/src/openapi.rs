//! The API's OpenAPI 3.1 description, served at `/api/openapi.json`:
//! generated from the handlers' own annotations (utoipa), so it cannot
//! drift from the routes.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use axum::response::{IntoResponse, Response};
use axum::Json;

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
            errors are RFC 9457 problem documents. No text may contain the NUL character \
            (U+0000): a platform on PostgreSQL refuses it with a 422."
    ),
    paths(
        crate::platform::healthz,
        crate::platform::ready,
        openapi_json,
        crate::platform::ingest,
        crate::platform::stripe_webhook,
        crate::platform::tier,
        crate::platform::wake,
        crate::platform::deployment_status,
        crate::platform::daemon,
        crate::api::accounts::signup,
        crate::api::accounts::login,
        crate::api::accounts::logout,
        crate::api::accounts::me,
        crate::api::orgs::orgs,
        crate::api::orgs::create_org,
        crate::api::orgs::members,
        crate::api::orgs::set_members,
        crate::api::orgs::audit,
        crate::api::tokens::tokens,
        crate::api::tokens::create_token,
        crate::api::tokens::revoke_token,
        crate::api::nodes::create_join_token,
        crate::api::nodes::nodes,
        crate::api::nodes::revoke_node,
        crate::api::nodes::all_nodes,
        crate::api::nodes::assign,
        crate::api::nodes::place,
        crate::api::nodes::move_site,
        crate::api::nodes::confirm_move,
        crate::api::sites::catalog_list,
        crate::api::sites::sites,
        crate::api::sites::create_site,
        crate::api::sites::plan,
        crate::api::sites::site,
        crate::api::sites::redeploy_site,
        crate::api::sites::destroy_site,
        crate::api::sites::logs,
        crate::api::sites::history,
        crate::api::sites::history_diff,
        crate::api::sites::backup,
        crate::oidc::register_client,
        crate::books::books_json,
        crate::my_usage::usage_json,
        crate::my_money::money_json,
        crate::platform::close_period,
        crate::platform::manual_payment,
        crate::platform::refund,
        crate::statements::statement_json,
        crate::statements::proof_json,
        crate::books::export,
        crate::api::billing::tiers,
        crate::api::billing::subscription,
        crate::api::billing::checkout,
        crate::api::billing::cancel,
        crate::api::billing::change,
        crate::api::data::create,
        crate::api::data::apply_writes,
        crate::api::data::list,
        crate::api::data::get,
        crate::api::data::update,
        crate::api::data::delete,
        crate::api::data::subscribe,
        crate::api::data::put_blob,
        crate::api::data::get_blob,
        crate::api::data::me,
        crate::api::data::export_me,
        crate::api::data::erase_me,
        crate::api::data::user_data,
        crate::api::data::export_user,
        crate::api::data::erase_user,
        crate::api::data::requests,
        crate::api::data::consent,
        crate::api::data::grant,
        crate::api::data::revoke,
        crate::api::data::fork,
        crate::api::data::sync,
        crate::api::data::merge,
        crate::api::data::import,
        crate::api::data::import_repo,
        crate::api::data::import_repo_me,
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

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "platform",
    responses((status = 200, description = "the OpenAPI 3.1 description of this API", body = Object)))]
pub(crate) async fn openapi_json() -> Response {
    Json(document()).into_response()
}
