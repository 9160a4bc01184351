//! The request target and host as the gateway routes on them, made
//! canonical once at the edge, so that the route, the login check and the
//! upstream all read the same path and host.
//!
//! A path is normalised the way an upstream will interpret it: percent
//! escapes of unreserved characters are decoded (`/%70rivate` is
//! `/private`), dot segments are resolved (`/a/../b` is `/b`) and repeated
//! slashes merged (`//b` is `/b`), as nginx does. Encodings whose meaning
//! depends on the app are refused (400): an escaped slash or backslash
//! (`%2f`, `%5c`), a NUL, a raw backslash, a `;` (path parameters, which
//! servlet containers strip before matching), a malformed escape, and a
//! `..` that climbs above the root.
//!
//! A host is lower-cased, its trailing dot dropped, and its port checked to
//! be a number; anything else in an authority (`a.test:@evil.example`) is
//! refused.

use std::borrow::Cow;

/// Why a request target or host was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The path carries an encoding whose meaning depends on the app.
    AmbiguousPath,
    /// The authority is not `host` or `host:port`.
    BadHost,
}

impl Refused {
    /// What to tell the client.
    pub fn detail(self) -> &'static str {
        match self {
            Refused::AmbiguousPath => {
                "the request path has an ambiguous form (an escaped slash or backslash, a `;`, \
                 a NUL, a malformed escape, or `..` above the root); send the plain path"
            }
            Refused::BadHost => "the Host is not a host name with an optional numeric port",
        }
    }
}

/// True for RFC 3986's unreserved characters, which mean the same escaped
/// or not.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical form of a path (no query): borrowed when it already is
/// canonical, which is the common case and costs one scan.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Refused> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Refused::AmbiguousPath);
    }
    // One pass to see whether anything needs doing.
    let mut simple = true;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' | b';' | 0 => return Err(Refused::AmbiguousPath),
            b'%' => simple = false,
            b'/' if bytes.get(i + 1) == Some(&b'/') => simple = false,
            b'.' if i > 0
                && bytes[i - 1] == b'/'
                && matches!(bytes.get(i + 1), None | Some(b'/') | Some(b'.')) =>
            {
                simple = false
            }
            _ => {}
        }
    }
    if simple {
        return Ok(Cow::Borrowed(path));
    }
    // Decode escapes of unreserved characters; keep (upper-cased) the others.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Refused::AmbiguousPath);
        };
        let c = hi << 4 | lo;
        match c {
            b'/' | b'\\' | 0 | b';' => return Err(Refused::AmbiguousPath),
            c if unreserved(c) => decoded.push(c),
            c => {
                decoded.push(b'%');
                decoded.extend_from_slice(format!("{c:02X}").as_bytes());
            }
        }
        i += 3;
    }
    // Resolve dot segments over the segments between slashes; empty ones
    // (repeated slashes) go.
    let text = std::str::from_utf8(&decoded).map_err(|_| Refused::AmbiguousPath)?;
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(Refused::AmbiguousPath);
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(text.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// A request target (`path?query`) with its path made canonical.
pub fn normalize_target(target: &str) -> Result<Cow<'_, str>, Refused> {
    let (path, query) = match target.find('?') {
        Some(q) => (&target[..q], Some(&target[q..])),
        None => (target, None),
    };
    Ok(match normalize_path(path)? {
        Cow::Borrowed(_) => Cow::Borrowed(target),
        Cow::Owned(mut p) => {
            p.push_str(query.unwrap_or(""));
            Cow::Owned(p)
        }
    })
}

/// A canonical authority: the host lower case without a trailing dot, and
/// the port if one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// What the upstream's `Host` says: `host` or `host:port`.
    pub value: Cow<'a, str>,
    /// The host alone.
    pub host: Cow<'a, str>,
}

/// Parses an authority (a `Host` header value, an absolute target's or
/// HTTP/2's `:authority`); borrowed when it is canonical already.
pub fn authority(raw: &str) -> Result<Authority<'_>, Refused> {
    let (host, port) = if raw.starts_with('[') {
        let end = raw.find(']').ok_or(Refused::BadHost)?;
        let inner = &raw[1..end];
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(Refused::BadHost);
        }
        (&raw[..=end], &raw[end + 1..])
    } else {
        match raw.find(':') {
            Some(i) => (&raw[..i], &raw[i..]),
            None => (raw, ""),
        }
    };
    let port = match port {
        "" => None,
        p => {
            let digits = &p[1..];
            if !p.starts_with(':')
                || digits.is_empty()
                || digits.len() > 5
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || digits.parse::<u32>().map_or(true, |n| n > 65535)
            {
                return Err(Refused::BadHost);
            }
            Some(digits)
        }
    };
    if !host.starts_with('[') {
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            || name
                .split('.')
                .any(|label| label.is_empty() || label.len() > 63)
        {
            return Err(Refused::BadHost);
        }
    }
    let canonical_host = !host.ends_with('.') && !host.bytes().any(|b| b.is_ascii_uppercase());
    if canonical_host {
        return Ok(Authority {
            value: Cow::Borrowed(raw),
            host: Cow::Borrowed(host),
        });
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let value = match port {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    Ok(Authority {
        value: Cow::Owned(value),
        host: Cow::Owned(host),
    })
}

/// The canonical form of a host name alone (as routes name them).
pub fn canonical_host(host: &str) -> Option<String> {
    authority(host)
        .ok()
        .filter(|a| a.value == a.host)
        .map(|a| a.host.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_what_the_upstream_reads() {
        for (raw, want) in [
            ("/", "/"),
            ("/private", "/private"),
            ("/%70rivate", "/private"),
            ("/./private", "/private"),
            ("//private", "/private"),
            ("/public/../private", "/private"),
            ("/%2e/private", "/private"),
            ("/%2E%2E/x/../private", "ERR"),
            ("/a/%2e%2e/private", "/private"),
            ("/a/b/", "/a/b/"),
            ("/a/b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/..", "ERR"),
            ("/private%2f", "ERR"),
            ("/x/..%2fprivate", "ERR"),
            ("/private;x", "ERR"),
            ("/a%5cb", "ERR"),
            ("/a\\b", "ERR"),
            ("/a%zz", "ERR"),
            ("/a%2", "ERR"),
            ("/a%00", "ERR"),
            ("x", "ERR"),
        ] {
            let got = normalize_path(raw).map_or("ERR".to_string(), |p| p.into_owned());
            assert_eq!(got, want, "{raw}");
        }
        assert!(matches!(normalize_path("/a/b.c/d"), Ok(Cow::Borrowed(_))));
        assert_eq!(normalize_target("//x/./y?a=/../b").unwrap(), "/x/y?a=/../b");
        assert!(matches!(normalize_target("/x?y=%2f"), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn hosts_are_checked_and_made_canonical() {
        let a = authority("Echo.Localhost.:8080").unwrap();
        assert_eq!(
            (&*a.host, &*a.value),
            ("echo.localhost", "echo.localhost:8080")
        );
        let a = authority("echo.localhost").unwrap();
        assert!(matches!(a.value, Cow::Borrowed(_)));
        assert_eq!(authority("[::1]:80").unwrap().host, "[::1]");
        for bad in [
            "echo.localhost:@evil.example",
            "echo.localhost:80x",
            "a b",
            "",
            ":80",
            "a..b",
            "echo.localhost:99999",
            "a/b",
        ] {
            assert_eq!(authority(bad), Err(Refused::BadHost), "{bad}");
        }
        assert_eq!(canonical_host("A.test."), Some("a.test".into()));
        assert_eq!(canonical_host("a.test:1"), None);
    }
}
