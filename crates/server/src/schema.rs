//! Types that exist to be described in the OpenAPI document: the problem
//! document every error is, the responses many routes share, and schemas
//! of values built elsewhere. A leaf: the handlers and the document both
//! name these, and this module names neither.

use utoipa::openapi::Object;
use utoipa::ToSchema;

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

/// Declares a problem response many routes share: its status and the
/// description the document gives it, written once.
macro_rules! shared_problem {
    ($(#[doc = $doc:literal])* $name:ident, $status:literal, $description:literal) => {
        $(#[doc = $doc])*
        #[derive(utoipa::IntoResponses)]
        #[response(
            status = $status,
            description = $description,
            content_type = "application/problem+json"
        )]
        #[allow(dead_code)] // described, not built
        pub struct $name(Problem);
    };
}

shared_problem!(
    /// 401, the same for every route that needs a caller.
    Unauthenticated, 401, "not logged in: no live session cookie or bearer token"
);
shared_problem!(
    /// 400, the same for every route that reads a JSON object.
    Malformed, 400, "the body is not the JSON object documented"
);
shared_problem!(
    /// 400, the same for every route that reads query parameters.
    BadQuery, 400, "a query parameter is not of the type documented"
);
shared_problem!(
    /// 401 on the platform's routes, which take only bearer tokens.
    NoBearer, 401, "no bearer token"
);
shared_problem!(
    /// 403 where reading sites needs the scope.
    LacksSitesRead, 403, "the token lacks sites:read"
);
shared_problem!(
    /// 403 where an account is needed and the caller is the platform itself.
    AdminHasNoAccount, 403, "the platform's administrator has no account"
);
shared_problem!(
    /// 403 on the routes that change a site.
    MayNotChangeSite, 403, "the caller may not change it, no CSRF token, a route names a host that is not the organisation's, or the platform is not sandboxed"
);
shared_problem!(
    /// 404 on the routes under a site.
    NoSuchSite, 404, "no such site (or not yours)"
);
shared_problem!(
    /// 404 on the routes under an organisation.
    NoSuchOrg, 404, "no such organisation (or not yours)"
);
shared_problem!(
    /// 409 where a deploy would take another site's route.
    RouteTaken, 409, "a route's host and path are another site's"
);

/// What a user's token may do.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described: scopes arrive as strings
#[schema(value_type = String, pattern = "^(sites:read|sites:write|orgs:read|orgs:write|audit:read|tokens:write|nodes:read|nodes:write)$")]
pub struct Scope(String);

/// A role in an organisation.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described: roles arrive as strings
#[schema(value_type = String, pattern = "^(admin|operator|provider|developer|custodian)$")]
pub struct Role(String);

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
