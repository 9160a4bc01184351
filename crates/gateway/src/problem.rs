//! RFC 9457 problem documents: how the gateway and the platform's API say
//! what went wrong. One builder for both, so every error a client sees has
//! the same shape.

use http::{header, Response, StatusCode};

use crate::body::ResponseBody;

/// The media type of a problem document.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// The document: `type`, `title`, `status`, `detail`, and any `extra`
/// members (RFC 9457 §3.2 extensions).
pub fn document(
    status: u16,
    title: &str,
    detail: &str,
    extra: Option<serde_json::Map<String, serde_json::Value>>,
) -> String {
    let mut body = serde_json::json!({
        "type": "about:blank", "title": title, "status": status, "detail": detail,
    });
    if let (Some(extra), Some(members)) = (extra, body.as_object_mut()) {
        for (k, v) in extra {
            // The standard members keep their meaning.
            members.entry(k).or_insert(v);
        }
    }
    body.to_string()
}

/// A gateway response carrying the document.
pub(crate) fn response(status: StatusCode, title: &str, detail: &str) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(ResponseBody::full(document(
            status.as_u16(),
            title,
            detail,
            None,
        )))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_never_replace_the_standard_members() {
        let mut extra = serde_json::Map::new();
        extra.insert("status".into(), 200.into());
        extra.insert("retry_after".into(), 5.into());
        let v: serde_json::Value =
            serde_json::from_str(&document(429, "Too Many", "slow down", Some(extra))).unwrap();
        assert_eq!(v["status"], 429);
        assert_eq!(v["retry_after"], 5);
        assert_eq!(v["type"], "about:blank");
    }
}
