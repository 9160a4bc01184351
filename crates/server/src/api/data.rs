//! DataCommons over HTTP.
//!
//! - `/data/v1/...`: the data API hosted apps call, with their service
//!   token in `X-Commons-Service` and the user's identity assertion (the
//!   `X-Commons-Identity` the gateway gave the request) passed on; and the
//!   change feed, a WebSocket, for the app's service token alone.
//! - `/api/data/...`: a user's own data (see, consent, revoke, export,
//!   erase), and the platform's administrator's view of any user's.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use commons_data::feed::Message;
use commons_data::service::Viewer;
use serde::Deserialize;

use super::{Reply, Who};
use crate::app::data::{self as ops, AppCaller, GrantChange, NewRecord, ReadQuery};
use crate::data::to_app_error;
use crate::error::{AppError, ErrorKind};
use crate::schema::Problem;
use crate::web::{created, json_body, Params};
use crate::AppState;

/// The site a service token belongs to.
fn site_of(parts: &axum::http::request::Parts, state: &AppState) -> Result<String, AppError> {
    let token = parts
        .headers
        .get(commons_gateway::SERVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::new(
                ErrorKind::Unauthenticated,
                "Service token required",
                "send the site's COMMONS_SERVICE_TOKEN in X-Commons-Service",
            )
        })?;
    state.engine.service_of(token).ok_or_else(|| {
        AppError::new(
            ErrorKind::Unauthenticated,
            "Unknown service token",
            "X-Commons-Service is not a deployed site's COMMONS_SERVICE_TOKEN",
        )
    })
}

/// A hosted app acting for a user.
pub struct App(pub AppCaller);

impl FromRequestParts<Arc<AppState>> for App {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<App, AppError> {
        // An application outside the platform, with a user's access token.
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let (None, Some(token)) = (parts.headers.get(commons_gateway::SERVICE_HEADER), bearer) {
            let (user, client, scopes) = state.oidc.data_access(token.trim()).ok_or_else(|| {
                AppError::new(
                    ErrorKind::Unauthenticated,
                    "Unknown access token",
                    "the bearer token is not a current access token of the platform's OpenID Connect provider; sign the user in again",
                )
            })?;
            return Ok(App(AppCaller {
                site: crate::app::data::client_app(&client),
                user,
                scopes: Some(scopes),
            }));
        }
        let site = site_of(parts, state)?;
        let assertion = parts
            .headers
            .get(commons_gateway::identity::HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                AppError::new(
                    ErrorKind::Unauthenticated,
                    "No user",
                    "pass on the X-Commons-Identity assertion of the request you are serving",
                )
            })?;
        let user = state.data.user_of(assertion, &site)?;
        Ok(App(AppCaller {
            site,
            user,
            scopes: None,
        }))
    }
}

/// Creates a record in the user's repository.
#[utoipa::path(post, path = "/data/v1/records/{collection}", tag = "data", operation_id = "data_create",
    params(("collection" = String, Path, description = "the collection's NSID")),
    request_body = NewRecord,
    responses(
        (status = 201, description = "`{uri, cid, rev, commit}`", body = Object),
        crate::schema::Malformed,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the app did not declare it or the user has not granted it (the detail says where to ask)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no app declared the collection", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the record exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "the record is larger than 256 KiB", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the record breaks its schema; the detail names the field's path", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath(collection): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let new: NewRecord = json_body(&body)?;
    let state2 = state.clone();
    let done = blocking(move || ops::create(&state2, &caller, &collection, &new)).await?;
    Ok(created(serde_json::to_value(done).expect("serialisable")))
}

/// Applies several writes to the user's repository as one signed commit
/// (atproto's `applyWrites`): all of them or none.
#[utoipa::path(post, path = "/data/v1/batch", tag = "data", operation_id = "data_apply_writes",
    request_body = ops::Batch,
    responses(
        (status = 200, description = "`{results}`: `{uri, cid, rev, commit}` per write, in order, one commit", body = Object),
        crate::schema::Malformed,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "a write the app did not declare or the user has not granted; nothing written", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "a collection nobody declared, or a record to update or delete that does not exist; nothing written", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a record to create exists; nothing written", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "a record larger than 256 KiB; nothing written", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no writes, more than 200, or a record that breaks its schema (the detail names writes[N] and the field's path); nothing written", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn apply_writes(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    body: Bytes,
) -> Reply {
    let batch: ops::Batch = json_body(&body)?;
    let done = blocking(move || ops::apply_writes(&state, &caller, &batch)).await?;
    Ok(Json(serde_json::json!({ "results": done })).into_response())
}

/// A record's new value.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Replacement {
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

/// Replaces a record.
#[utoipa::path(put, path = "/data/v1/records/{collection}/{rkey}", tag = "data", operation_id = "data_update",
    params(("collection" = String, Path), ("rkey" = String, Path)),
    request_body = Replacement,
    responses(
        (status = 200, description = "`{uri, cid, rev, commit}`", body = Object),
        crate::schema::Malformed,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such record or collection", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the record breaks its schema", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath((collection, rkey)): UrlPath<(String, String)>,
    body: Bytes,
) -> Reply {
    let r: Replacement = json_body(&body)?;
    let state2 = state.clone();
    let done =
        blocking(move || ops::update(&state2, &caller, &collection, &rkey, &r.value)).await?;
    Ok(Json(done).into_response())
}

/// Deletes a record.
#[utoipa::path(delete, path = "/data/v1/records/{collection}/{rkey}", tag = "data", operation_id = "data_delete",
    params(("collection" = String, Path), ("rkey" = String, Path)),
    responses(
        (status = 204, description = "deleted"),
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such record or collection", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath((collection, rkey)): UrlPath<(String, String)>,
) -> Reply {
    blocking(move || ops::delete(&state, &caller, &collection, &rkey)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Reads a record (the user's own, or `owner`'s where they allow it).
#[utoipa::path(get, path = "/data/v1/records/{collection}/{rkey}", tag = "data", operation_id = "data_get",
    params(("collection" = String, Path), ("rkey" = String, Path), ReadQuery),
    responses(
        (status = 200, description = "the record with its class, licence and provenance", body = Object),
        crate::schema::BadQuery,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such record, or the owner erased their data", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath((collection, rkey)): UrlPath<(String, String)>,
    Params(q): Params<ReadQuery>,
) -> Reply {
    let record = blocking(move || ops::get(&state, &caller, &collection, &rkey, &q)).await?;
    Ok(Json(record).into_response())
}

/// Lists a collection in key order, or queries it by an indexed field.
#[utoipa::path(get, path = "/data/v1/records/{collection}", tag = "data", operation_id = "data_list",
    params(("collection" = String, Path), ReadQuery),
    responses(
        (status = 200, description = "`{records, cursor}`", body = Object),
        crate::schema::BadQuery,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no app declared the collection", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the field is not indexed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath(collection): UrlPath<String>,
    Params(q): Params<ReadQuery>,
) -> Reply {
    let page = blocking(move || ops::list(&state, &caller, &collection, &q)).await?;
    Ok(Json(page).into_response())
}

/// Stores a blob for records of the collection: the body is its bytes,
/// `Content-Type` its media type. Sealed at rest for encrypted classes.
#[utoipa::path(post, path = "/data/v1/blobs/{collection}", tag = "data", operation_id = "data_put_blob",
    params(("collection" = String, Path, description = "the collection whose records will carry it")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "the blob reference a record carries: `{$type: blob, ref: {$link}, mimeType, size}`", body = Object),
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no app declared the collection", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "larger than the class allows (10 MiB public and personal, 2 MiB private)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no media type", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn put_blob(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath(collection): UrlPath<String>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Reply {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let reference =
        blocking(move || ops::put_blob(&state, &caller, &collection, &mime, &body)).await?;
    Ok(created(reference))
}

/// Who owns a blob (the user the app acts for by default).
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct BlobOwner {
    pub owner: Option<String>,
}

/// A blob's bytes, under the rules of its collection.
#[utoipa::path(get, path = "/data/v1/blobs/{collection}/{cid}", tag = "data", operation_id = "data_get_blob",
    params(("collection" = String, Path), ("cid" = String, Path, description = "the blob's CID"), BlobOwner),
    responses(
        (status = 200, description = "the bytes, with their media type", content_type = "application/octet-stream"),
        crate::schema::BadQuery,
        (status = 401, description = "no service token or no identity assertion", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "not declared or not granted", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such blob", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a CID", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_blob(
    State(state): State<Arc<AppState>>,
    App(caller): App,
    UrlPath((collection, cid)): UrlPath<(String, String)>,
    Params(q): Params<BlobOwner>,
) -> Reply {
    let (mime, bytes) =
        blocking(move || ops::get_blob(&state, &caller, q.owner.as_deref(), &collection, &cid))
            .await?;
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        bytes,
    )
        .into_response())
}

/// Where a subscription starts.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct Cursor {
    /// The sequence number of the last event seen; absent: live only.
    pub cursor: Option<i64>,
}

/// The change feed (WebSocket, one JSON message per event), as the app may
/// see it: public ops, and ops of collections users granted it.
#[utoipa::path(get, path = "/data/v1/subscribe", tag = "data", operation_id = "data_subscribe",
    params(Cursor),
    responses(
        (status = 101, description = "the feed: `#commit` and `#account` events, `#info` messages"),
        crate::schema::BadQuery,
        (status = 400, description = "a cursor in the future, or not a WebSocket request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "no service token", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn subscribe(
    State(state): State<Arc<AppState>>,
    parts: axum::http::request::Parts,
    Params(q): Params<Cursor>,
) -> Reply {
    let site = site_of(&parts, &state)?;
    let mut parts = parts;
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &state)
        .await
        .map_err(|e| {
            AppError::new(
                ErrorKind::Malformed,
                "Not a WebSocket request",
                e.body_text(),
            )
        })?;
    let mut sub = state
        .data
        .commons
        .subscribe(Viewer::App(site), q.cursor)
        .map_err(to_app_error)?;
    Ok(upgrade.on_upgrade(move |mut socket: WebSocket| async move {
        loop {
            tokio::select! {
                next = sub.next() => {
                    let Ok(message) = next else { break };
                    let text = match &message {
                        Message::Event(e) => serde_json::to_string(&**e),
                        Message::Info(i) => serde_json::to_string(i),
                    };
                    let Ok(text) = text else { break };
                    if socket.send(WsMessage::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                incoming = socket.recv() => match incoming {
                    Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                    _ => {}
                },
            }
        }
    }))
}

/// Runs a data operation (SQLite and signing) off the async workers.
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, AppError> + Send + 'static,
) -> Result<T, AppError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| AppError::new(ErrorKind::Internal, "Data operation failed", e.to_string()))?
}

/// Everything held about the signed-in user: records with provenance,
/// grants, the access log.
#[utoipa::path(get, path = "/api/data/me", tag = "data", operation_id = "data_me",
    responses(
        (status = 200, description = "the user's data", body = ops::MyData),
        crate::schema::Unauthenticated,
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:read"])))]
pub async fn me(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let data = blocking(move || ops::my_data(&state, &who, None)).await?;
    Ok(Json(data).into_response())
}

/// Any user's data (the platform's administrator).
#[utoipa::path(get, path = "/api/data/users/{user}", tag = "data", operation_id = "data_user_data",
    params(("user" = String, Path, description = "the user's id")),
    responses(
        (status = 200, description = "the user's data", body = ops::MyData),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator, nor the user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no data for that user", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:read"])))]
pub async fn user_data(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(user): UrlPath<String>,
) -> Reply {
    let data = blocking(move || ops::my_data(&state, &who, Some(&user))).await?;
    Ok(Json(data).into_response())
}

fn archive(user: &str, bytes: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"commons-data-{user}.tar\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// One archive of the signed-in user's data: the repository (CAR), every
/// record decrypted (JSON Lines) with provenance, grants, the access log
/// and their keys.
#[utoipa::path(get, path = "/api/data/me/export", tag = "data", operation_id = "data_export_me",
    responses(
        (status = 200, description = "a tar archive", content_type = "application/x-tar"),
        crate::schema::Unauthenticated,
        (status = 404, description = "no data, or erased", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:read"])))]
pub async fn export_me(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let (user, bytes) = blocking(move || ops::export(&state, &who, None)).await?;
    Ok(archive(&user, bytes))
}

/// One archive of a user's data (the platform's administrator).
#[utoipa::path(get, path = "/api/data/users/{user}/export", tag = "data", operation_id = "data_export_user",
    params(("user" = String, Path)),
    responses(
        (status = 200, description = "a tar archive", content_type = "application/x-tar"),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator, nor the user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no data, or erased", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:read"])))]
pub async fn export_user(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(user): UrlPath<String>,
) -> Reply {
    let (user, bytes) = blocking(move || ops::export(&state, &who, Some(&user))).await?;
    Ok(archive(&user, bytes))
}

/// Erases everything held about the signed-in user, in every app.
#[utoipa::path(delete, path = "/api/data/me", tag = "data", operation_id = "data_erase_me",
    responses(
        (status = 200, description = "`{did, records, public_deleted}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 404, description = "no data, or already erased", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn erase_me(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let erased = blocking(move || ops::erase(&state, &who, None)).await?;
    Ok(Json(erased).into_response())
}

/// Erases everything held about a user (the platform's administrator).
#[utoipa::path(delete, path = "/api/data/users/{user}", tag = "data", operation_id = "data_erase_user",
    params(("user" = String, Path)),
    responses(
        (status = 200, description = "`{did, records, public_deleted}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator, nor the user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no data, or already erased", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn erase_user(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(user): UrlPath<String>,
) -> Reply {
    let erased = blocking(move || ops::erase(&state, &who, Some(&user))).await?;
    Ok(Json(erased).into_response())
}

/// Imports an AT Protocol repository file into the signed-in user's
/// repository: records in collections apps declared, each under its
/// collection's class, provenance `import`.
#[utoipa::path(post, path = "/api/data/me/repo", tag = "data", operation_id = "data_import_repo_me",
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "a CAR v1 file (application/vnd.ipld.car) whose root is a signed commit or a bare tree node"),
    responses(
        (status = 200, description = "`{source, collections, commit, rev}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "a collection no app declared (all of them named); nothing imported", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a good repository file, or a record breaks its schema (its path named); nothing imported", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn import_repo_me(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    body: Bytes,
) -> Reply {
    let done = blocking(move || ops::import_repo(&state, &who, None, &body)).await?;
    Ok(Json(done).into_response())
}

/// Imports an AT Protocol repository file into a user's repository (the
/// platform's administrator, or the user).
#[utoipa::path(post, path = "/api/data/users/{user}/repo", tag = "data", operation_id = "data_import_repo",
    params(("user" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "a CAR v1 file (application/vnd.ipld.car) whose root is a signed commit or a bare tree node"),
    responses(
        (status = 200, description = "`{source, collections, commit, rev}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator, nor the user", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "a collection no app declared (all of them named); nothing imported", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not a good repository file, or a record breaks its schema (its path named); nothing imported", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn import_repo(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(user): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let done = blocking(move || ops::import_repo(&state, &who, Some(&user), &body)).await?;
    Ok(Json(done).into_response())
}

/// What a site asks of the signed-in user: its consent screen.
#[utoipa::path(get, path = "/api/data/consent/{site}", tag = "data", operation_id = "data_requests",
    params(("site" = String, Path)),
    responses(
        (status = 200, description = "`{items}`: collection, class, licence, actions, fields, purpose", body = Object),
        crate::schema::Unauthenticated,
        (status = 404, description = "no such site", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:read", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:read"])))]
pub async fn requests(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(site): UrlPath<String>,
) -> Reply {
    let items = blocking(move || ops::requests(&state, &who, &site)).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// The signed-in user allows the site everything it asks for.
#[utoipa::path(post, path = "/api/data/consent/{site}", tag = "data", operation_id = "data_consent",
    params(("site" = String, Path)),
    responses(
        (status = 200, description = "`{granted}`: how many grants were given", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "CSRF token missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such site", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn consent(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(site): UrlPath<String>,
) -> Reply {
    let granted = blocking(move || ops::consent(&state, &who, &site)).await?;
    Ok(Json(serde_json::json!({ "granted": granted })).into_response())
}

/// Gives a grant (to a person, or to an app within what it declared).
#[utoipa::path(post, path = "/api/data/grants", tag = "data", operation_id = "data_grant",
    request_body = GrantChange,
    responses(
        (status = 204, description = "granted"),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "more than the app declared", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such collection", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a bad grantee or action", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn grant(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let g: GrantChange = json_body(&body)?;
    blocking(move || ops::grant(&state, &who, &g)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Revokes a grant: reads, writes and feed events stop at once.
#[utoipa::path(delete, path = "/api/data/grants", tag = "data", operation_id = "data_revoke",
    request_body = GrantChange,
    responses(
        (status = 204, description = "revoked"),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 404, description = "there was no such grant", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a bad grantee or action", body = Problem, content_type = "application/problem+json"),
        (status = 400, description = "the platform's administrator has no data of its own", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn revoke(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let g: GrantChange = json_body(&body)?;
    let removed = blocking(move || ops::revoke(&state, &who, &g)).await?;
    if !removed {
        return Err(AppError::new(
            ErrorKind::NotFound,
            "No such grant",
            "nothing to revoke",
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Forks another user's repository into the signed-in user's: its public
/// records, and the encrypted ones it shares with them.
#[utoipa::path(post, path = "/api/data/forks/{source}", tag = "data", operation_id = "data_fork",
    params(("source" = String, Path, description = "the user whose repository to fork")),
    responses(
        (status = 200, description = "`{applied, conflicts}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 400, description = "the platform's administrator has no repository", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such repository", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already forked, or a record of the same key exists", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a repository cannot be forked into itself", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(source): UrlPath<String>,
) -> Reply {
    let done = blocking(move || ops::fork(&state, &who, &source)).await?;
    Ok(Json(done).into_response())
}

/// Brings the origin's changes since the fork point into the signed-in
/// user's fork; keys both changed come back as `conflicts` and nothing is
/// applied until `resolve` settles each (`ours` or `theirs`).
#[utoipa::path(post, path = "/api/data/forks/{source}/sync", tag = "data", operation_id = "data_sync",
    params(("source" = String, Path)),
    request_body = ops::Resolutions,
    responses(
        (status = 200, description = "`{applied, conflicts}`", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no fork of that repository", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn sync(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(source): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let r: ops::Resolutions = json_body(&body)?;
    let done = blocking(move || ops::sync(&state, &who, &source, &r)).await?;
    Ok(Json(done).into_response())
}

/// Merges another user's fork of the signed-in user's repository back into
/// it; keys both changed come back as `conflicts` and nothing is applied
/// until `resolve` settles each.
#[utoipa::path(post, path = "/api/data/merges/{fork_user}", tag = "data", operation_id = "data_merge",
    params(("fork_user" = String, Path, description = "the user whose fork to merge")),
    request_body = ops::Resolutions,
    responses(
        (status = 200, description = "`{applied, conflicts}`", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks data:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such fork", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["data:write"])))]
pub async fn merge(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(fork_user): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let r: ops::Resolutions = json_body(&body)?;
    let done = blocking(move || ops::merge(&state, &who, &fork_user, &r)).await?;
    Ok(Json(done).into_response())
}

/// Imports an export archive (tar) as a user's data (the platform's
/// administrator): the same DID and repository root.
#[utoipa::path(post, path = "/api/data/users/{user}/import", tag = "data", operation_id = "data_import",
    params(("user" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the tar archive `commons data export` made"),
    responses(
        (status = 200, description = "`{root}`: the repository's root", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the user already has data here", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not an export archive, or one whose repository does not check out", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn import(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(user): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let root = blocking(move || ops::import(&state, &who, &user, &body)).await?;
    Ok(Json(serde_json::json!({ "root": root })).into_response())
}
