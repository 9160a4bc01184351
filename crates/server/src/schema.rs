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
