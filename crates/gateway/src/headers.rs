//! The header rules, written once for both of the gateway's servers: what
//! a client may not send on (hop-by-hop headers, anything only the gateway
//! may state, the platform's own cookie and bearer token, and their
//! underscore spellings), what an app may not send back (the platform's
//! cookies, by any spelling), and what the gateway states to the app
//! instead (the host it routed by, the forwarding path, the user). Saying
//! it to a site is `forward`'s job.

use http::header::{self, HeaderName, HeaderValue};

use crate::identity;

/// The platform's session cookie: read by the gateway, never shown to apps.
pub const SESSION_COOKIE: &str = "commons_session";

/// The header a hosted service proves who it is with when it calls another
/// site on a user's behalf (with the user's assertion in
/// `X-Commons-Identity`); its value is the service's
/// `COMMONS_SERVICE_TOKEN`. Never passed on to apps.
pub const SERVICE_HEADER: &str = "x-commons-service";

/// The cookie binding a sign-in to the browser that started it (the
/// OAuth `state` pattern: nobody can sign a victim in as themselves by
/// sending them a link).
pub(crate) const SIGN_IN_STATE_COOKIE: &str = "commons_sign_in";

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub(crate) static IDENTITY: HeaderName = HeaderName::from_static(identity::HEADER);
pub(crate) static SERVICE: HeaderName = HeaderName::from_static(SERVICE_HEADER);

/// True for headers that must not cross the gateway in either direction:
/// hop-by-hop ones (RFC 9110 §7.6.1) and, on requests, anything claiming an
/// identity or a forwarding path that only the gateway may state.
pub(crate) fn is_stripped(name: &[u8], request: bool) -> bool {
    match name {
        b"connection"
        | b"keep-alive"
        | b"proxy-connection"
        | b"te"
        | b"trailer"
        | b"transfer-encoding"
        | b"upgrade"
        | b"proxy-authorization"
        | b"proxy-authenticate" => true,
        b"forwarded" | b"x-forwarded-for" | b"x-forwarded-host" | b"x-forwarded-proto"
        | b"x-forwarded-port" | b"x-real-ip" => request,
        n => request && n.starts_with(b"x-commons-"),
    }
}

/// [`is_stripped`] for a header name as a client wrote it (any case).
pub(crate) fn is_stripped_any_case(name: &[u8], request: bool) -> bool {
    // Every name on the list is shorter than this; a longer one can only
    // be an `x-commons-` one.
    const LONGEST: usize = 24;
    if name.len() > LONGEST {
        return request && name[..10].eq_ignore_ascii_case(b"x-commons-");
    }
    let mut lower = [0u8; LONGEST];
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    is_stripped(lower, request)
}

/// True if one of the `Connection` header values names `name` (hop-by-hop).
pub(crate) fn named_by_connection(name: &[u8], connection: &[&[u8]]) -> bool {
    connection.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    })
}

/// Removes stripped headers in one pass over what is there (usually none).
pub(crate) fn strip(headers: &mut http::HeaderMap, request: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_stripped(name.as_str().as_bytes(), request) {
            doomed.push(name.clone());
        }
    }
    // Headers the Connection header names are hop-by-hop too.
    for value in headers.get_all(header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            if let Ok(n) = HeaderName::from_bytes(token.trim().to_ascii_lowercase().as_bytes()) {
                doomed.push(n);
            }
        }
    }
    for name in doomed {
        headers.remove(&name);
    }
    if !request {
        remove_platform_set_cookies(headers);
    }
}

/// The value of the cookie whose pair starts with `pair` (`name=`).
pub(crate) fn cookie<'h>(headers: &'h http::HeaderMap, pair: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| cookie_in(v.to_str().unwrap_or(""), pair))
}

/// The value of the cookie whose pair starts with `pair`, in one `Cookie`
/// header value.
pub(crate) fn cookie_in<'v>(value: &'v str, pair: &str) -> Option<&'v str> {
    value.split(';').find_map(|p| p.trim().strip_prefix(pair))
}

/// Removes `Set-Cookie`s of the platform's own cookies from an app's
/// response: an app must not sign its visitors in as someone else.
pub(crate) fn remove_platform_set_cookies(headers: &mut http::HeaderMap) {
    let platform = |v: &HeaderValue| is_platform_set_cookie(v.as_bytes());
    if !headers.get_all(header::SET_COOKIE).iter().any(platform) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !platform(v))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// True for a `Set-Cookie` value that sets one of the platform's cookies,
/// with the cookie's name read as browsers read it (RFC 6265bis §5.6: up
/// to the first `=`, whitespace around it trimmed; no `=` at all is a
/// nameless cookie). Compared without regard to case, and with the
/// `__Secure-`/`__Host-` prefixes taken off, so no spelling gets past.
pub(crate) fn is_platform_set_cookie(value: &[u8]) -> bool {
    let pair = value.split(|&b| b == b';').next().unwrap_or(b"");
    let Some(eq) = pair.iter().position(|&b| b == b'=') else {
        return false;
    };
    let mut name = pair[..eq].trim_ascii();
    for prefix in [&b"__secure-"[..], b"__host-"] {
        if name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix) {
            name = &name[prefix.len()..];
        }
    }
    [SESSION_COOKIE, SIGN_IN_STATE_COOKIE]
        .iter()
        .any(|platform| name.eq_ignore_ascii_case(platform.as_bytes()))
}

/// How the session cookie's pair starts.
pub(crate) const SESSION_PAIR: &str = "commons_session=";
const _: () = assert!(SESSION_PAIR.len() == SESSION_COOKIE.len() + 1);

/// Removes the platform session cookie, keeping the app's own cookies.
pub(crate) fn remove_session_cookie(headers: &mut http::HeaderMap) {
    let mut kept = Vec::new();
    for pair in headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| cookies_but_session(v.as_bytes()))
    {
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The cookie pairs of a `Cookie` header value other than the platform
/// session.
pub(crate) fn cookies_but_session(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !p.starts_with(SESSION_PAIR.as_bytes()))
}

/// The token of an `Authorization: Bearer` header value.
pub(crate) fn bearer_in(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::Credentials;

    #[test]
    fn identity_and_hop_headers_are_stripped_from_requests_only() {
        for name in [
            "x-commons-identity",
            "x-commons-user",
            "forwarded",
            "x-forwarded-for",
        ] {
            assert!(is_stripped_any_case(name.as_bytes(), true), "{name}");
            assert!(!is_stripped_any_case(name.as_bytes(), false), "{name}");
        }
        assert!(is_stripped_any_case(b"Connection", false));
        assert!(is_stripped_any_case(
            b"X-Commons-A-Very-Long-Header-Name-Indeed",
            true
        ));
        assert!(!is_stripped_any_case(b"cookie", true));
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-app", HeaderValue::from_static("1"));
        strip(&mut h, true);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn only_the_session_cookie_is_removed() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; commons_session=s3cret; b=2"),
        );
        assert_eq!(Credentials::of(&h).session, Some("s3cret"));
        remove_session_cookie(&mut h);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}
