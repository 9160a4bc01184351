//! The HTTP client the platform calls out with (to another platform's API,
//! to a payment provider): HTTP/1.1, HTTPS trusting this machine's
//! certificate authorities, plain HTTP where a URL says so.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;

/// HTTPS, or HTTP where the URL says so.
pub type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// An HTTP/1.1 client of HTTPS (trusting this machine's certificate
/// authorities) and plain HTTP URLs.
pub fn https_client() -> Result<hyper_util::client::legacy::Client<Https, Full<Bytes>>, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| {
            format!(
                "no trusted certificate authorities on this machine ({e}); \
                 install ca-certificates or set SSL_CERT_FILE"
            )
        })?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// Everything but letters, digits, `-`, `_` and `.` is escaped.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.');

/// A path segment or query value as the URL must carry it (site and
/// component names are slugs; anything else is escaped rather than trusted).
pub fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}
