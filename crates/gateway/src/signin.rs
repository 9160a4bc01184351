//! A browser's sign-in at a site's own host: sent to the platform's sign-in
//! with a `state` the gateway signed for the host (and set as a cookie),
//! back with a one-time code the platform made for that state, which the
//! gateway redeems for a session of that host alone.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::ResponseBody;
use crate::headers::{cookie, SESSION_PAIR};
use crate::problem::response as problem;
use crate::{sessions, target, Gateway};

/// Where the gateway finishes a browser's sign-in, on the site's own host.
pub const SIGN_IN_PATH: &str = "/.commons/sign-in";
pub(crate) const SIGN_IN_STATE_PAIR: &str = "commons_sign_in=";

/// True for a redirect target that stays on the same origin: a path, not
/// a network path (`//host`), with no backslash (read as a slash by
/// browsers) and no control characters or spaces (which browsers drop, so
/// `/\t/evil.example` would become `//evil.example`).
pub fn is_local_path(to: &str) -> bool {
    to.starts_with('/')
        && !to.starts_with("//")
        && !to
            .bytes()
            .any(|b| b == b'\\' || b.is_ascii_control() || b == b' ' || b >= 0x80)
}

impl Gateway {
    /// Sends a browser that asked for a page needing login to the
    /// platform's sign-in, with a state cookie to come back with. `None` for
    /// other clients (they get a 401), or when the platform has no sign-in.
    pub(crate) fn start_sign_in(
        &self,
        req: &Request<Incoming>,
        authority: &str,
        tls: bool,
    ) -> Option<Response<ResponseBody>> {
        let wants_page = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
            && req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
        if !wants_page {
            return None;
        }
        let scheme = if tls { "https" } else { "http" };
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let return_to = format!("{scheme}://{authority}{pq}");
        let host = target::authority(authority).ok()?.host.into_owned();
        let state = self.sign_in_states.mint(&host, commons_clock::now_secs());
        let url = self.hooks.sign_in_url(&return_to, &state)?;
        let secure = if tls { "; Secure" } else { "" };
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, url)
            .header(
                header::SET_COOKIE,
                format!(
                    "{SIGN_IN_STATE_PAIR}{state}; Path=/.commons; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                    sessions::SIGN_IN_FOR_S
                ),
            )
            .header(header::CACHE_CONTROL, "no-store")
            .body(ResponseBody::empty())
            .ok()
    }

    /// The browser is back from the platform's sign-in with a one-time
    /// code: the session cookie is set for this host, and it goes on to the
    /// page it asked for.
    pub(crate) fn finish_sign_in(
        &self,
        req: &Request<Incoming>,
        host: &str,
        tls: bool,
    ) -> Response<ResponseBody> {
        let failed = || {
            problem(
                StatusCode::BAD_REQUEST,
                "Sign-in link expired",
                "this sign-in link was used already, is more than a minute old, or was \
                 started in another browser; open the page you wanted again",
            )
        };
        let mut code = None;
        let mut state = None;
        let mut to = None;
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "to" => to = Some(v.into_owned()),
                _ => {}
            }
        }
        let (Some(code), Some(state), Some(to)) = (code, state, to) else {
            return failed();
        };
        // Only a path on this host: never a redirect elsewhere.
        if !is_local_path(&to) {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "`to` must be a path on this site",
            );
        }
        // The state is one this gateway made for this host, and the
        // browser that started the sign-in holds it.
        let expected = cookie(req.headers(), SIGN_IN_STATE_PAIR).unwrap_or("");
        if expected.is_empty()
            || expected != state
            || !self
                .sign_in_states
                .check(&state, host, commons_clock::now_secs())
        {
            return failed();
        }
        let Some(credential) = self.hooks.redeem_sign_in(&code, host, &state) else {
            return failed();
        };
        let secure = if tls { "; Secure" } else { "" };
        let Ok(session) = HeaderValue::from_str(&format!(
            "{SESSION_PAIR}{credential}; Path=/; HttpOnly; SameSite=Lax{secure}"
        )) else {
            return failed();
        };
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, to)
            .header(header::SET_COOKIE, session)
            .header(
                header::SET_COOKIE,
                format!("{SIGN_IN_STATE_PAIR}; Path=/.commons; Max-Age=0; HttpOnly; SameSite=Lax{secure}"),
            )
            .header(header::CACHE_CONTROL, "no-store")
            .body(ResponseBody::empty())
            .unwrap_or_else(|_| failed())
    }
}
