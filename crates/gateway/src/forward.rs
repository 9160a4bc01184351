//! What a site is told about a request: the client's headers less those
//! withheld (the header rules of `headers`), and what the gateway states in
//! their place — the host it routed by, the forwarding path, who the user is.

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};
use hyper::body::Incoming;

use crate::caller::Caller;
use crate::headers::{
    cookies_but_session, is_stripped_any_case, named_by_connection, remove_session_cookie,
    FORWARDED, IDENTITY, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use crate::routes::Site;
use crate::upstream::put_header;
use crate::{ConnInfo, Gateway};

impl Gateway {
    /// Calls `put` with each header the gateway states to the app about a
    /// request, in place of anything the client said: the host, the
    /// forwarding path, and who the user is.
    pub(crate) fn for_each_stated(
        &self,
        conn: &ConnInfo,
        site: &Site,
        host_value: &[u8],
        caller: &Caller,
        mut put: impl FnMut(&HeaderName, &[u8]),
    ) {
        let proto: &[u8] = if conn.tls { b"https" } else { b"http" };
        let mut forwarded = Vec::with_capacity(64);
        put_for(conn, &mut forwarded);
        forwarded.extend_from_slice(b";proto=");
        forwarded.extend_from_slice(proto);
        forwarded.extend_from_slice(b";host=\"");
        forwarded.extend_from_slice(host_value);
        forwarded.push(b'"');
        put(&header::HOST, host_value);
        put(&FORWARDED, &forwarded);
        put(&X_FORWARDED_FOR, conn.peer_text.as_bytes());
        put(&X_FORWARDED_PROTO, proto);
        put(&X_FORWARDED_HOST, host_value);
        if let Some(identity) = &caller.identity {
            put(
                &IDENTITY,
                self.assertion(identity, &site.deployment).as_bytes(),
            );
            // An app that takes a trusted user header gets the signed-in
            // user there, and never what a client put in it.
            if let Some(name) = &site.user_header {
                put(name, identity.user.id.as_bytes());
            }
        }
    }

    /// True for a client header that does not go on to the app: stripped
    /// ones, ones the gateway states itself, and the platform bearer token.
    /// A name with underscores counts as its dashed form: CGI and WSGI
    /// servers read `X_Remote_User` as `X-Remote-User` (nginx drops such
    /// headers too, `underscores_in_headers off`).
    pub(crate) fn withheld(
        name: &[u8],
        site: &Site,
        caller: &Caller,
        connection: &[&[u8]],
    ) -> bool {
        if name.contains(&b'_') {
            let dashed: Vec<u8> = name
                .iter()
                .map(|&b| if b == b'_' { b'-' } else { b })
                .collect();
            return Self::withheld_as_named(&dashed, site, caller, connection)
                || Self::withheld_as_named(name, site, caller, connection);
        }
        Self::withheld_as_named(name, site, caller, connection)
    }

    pub(crate) fn withheld_as_named(
        name: &[u8],
        site: &Site,
        caller: &Caller,
        connection: &[&[u8]],
    ) -> bool {
        is_stripped_any_case(name, true)
            || name.eq_ignore_ascii_case(b"host")
            || (caller.strip_bearer && name.eq_ignore_ascii_case(b"authorization"))
            || site
                .user_header
                .as_ref()
                .is_some_and(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
            || named_by_connection(name, connection)
    }

    /// Writes the head of a bodiless request as the upstream gets it: the
    /// client's `headers` less those withheld (and the session cookie),
    /// then what the gateway states. `host_value` is the request's
    /// canonical authority.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_upstream_head<'h, I>(
        &self,
        out: &mut Vec<u8>,
        method: &str,
        target: &str,
        headers: impl Fn() -> I,
        host_value: &[u8],
        conn: &ConnInfo,
        site: &Site,
        caller: &Caller,
    ) where
        I: Iterator<Item = (&'h str, &'h [u8])>,
    {
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let connection: Vec<&[u8]> = headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v)
            .collect();
        for (name, value) in headers() {
            if Self::withheld(name.as_bytes(), site, caller, &connection) {
                continue;
            }
            if name.eq_ignore_ascii_case("cookie") {
                let mut pairs = cookies_but_session(value).peekable();
                if pairs.peek().is_some() {
                    out.extend_from_slice(b"cookie: ");
                    for (i, pair) in pairs.enumerate() {
                        if i > 0 {
                            out.extend_from_slice(b"; ");
                        }
                        out.extend_from_slice(pair);
                    }
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            put_header(out, name.as_bytes(), value);
        }
        self.for_each_stated(conn, site, host_value, caller, |name, value| {
            put_header(out, name.as_str().as_bytes(), value)
        });
        out.extend_from_slice(b"\r\n");
    }

    /// Rewrites a request for hyper's client (requests with bodies,
    /// upgrades): the same headers [`Gateway::write_upstream_head`] sends.
    pub(crate) fn rewrite_request(
        &self,
        req: &mut Request<Incoming>,
        conn: &ConnInfo,
        site: &Site,
        authority: &str,
        caller: &Caller,
        upgrade: Option<HeaderValue>,
    ) {
        // The request is in origin form already (see `handle`); the
        // upstream speaks HTTP/1.1, whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        let h = req.headers_mut();
        let connection: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        let connection: Vec<&[u8]> = connection.iter().map(HeaderValue::as_bytes).collect();
        let withheld: Vec<HeaderName> = h
            .keys()
            .filter(|n| Self::withheld(n.as_str().as_bytes(), site, caller, &connection))
            .cloned()
            .collect();
        for name in withheld {
            h.remove(name);
        }
        if h.contains_key(header::COOKIE) {
            remove_session_cookie(h);
        }
        self.for_each_stated(conn, site, authority.as_bytes(), caller, |name, value| {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.insert(name.clone(), v);
            }
        });
        if let Some(proto) = upgrade {
            h.insert(header::UPGRADE, proto);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// `for=` of the Forwarded header (RFC 7239): an IPv6 address quoted and
/// in brackets.
fn put_for(conn: &ConnInfo, out: &mut Vec<u8>) {
    let v6 = conn.peer_is_v6();
    out.extend_from_slice(if v6 { b"for=\"[" } else { b"for=" });
    out.extend_from_slice(conn.peer_text.as_bytes());
    if v6 {
        out.extend_from_slice(b"]\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn for_of(peer: &str) -> String {
        let mut out = Vec::new();
        put_for(&ConnInfo::new(peer.parse().unwrap(), false), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn forwarded_for_quotes_ipv6_and_unmaps_ipv4() {
        assert_eq!(for_of("192.0.2.7:5000"), "for=192.0.2.7");
        assert_eq!(for_of("[2001:db8::1]:5000"), "for=\"[2001:db8::1]\"");
        // An IPv4 client on a dual-stack socket is an IPv4 client.
        assert_eq!(for_of("[::ffff:192.0.2.7]:5000"), "for=192.0.2.7");
    }
}
