//! Prometheus metrics of the gateway, served on the admin listener.
//!
//! Counters are plain atomics the proxy bumps without a lookup (per-site ones
//! live on the site's routing entry), rendered to the text exposition format
//! on demand. A registry crate would hash the label set on every request,
//! which costs more than the rest of the bookkeeping together.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the latency histogram, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default, Debug)]
pub struct Metrics {
    /// Responses by class: 1xx..5xx.
    pub responses: [AtomicU64; 5],
    latency: [AtomicU64; BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub upstream_protocol_errors: AtomicU64,
    pub retries: AtomicU64,
    pub wakes: AtomicU64,
    pub wake_timeouts: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    /// HTTP/1.x connections the gateway's own server handed to hyper's.
    pub connections_handed_over: AtomicU64,
    pub tls_handshake_errors: AtomicU64,
}

impl Metrics {
    pub fn observe(&self, status: u16, duration_us: u64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let secs = duration_us as f64 / 1e6;
        let bucket = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(duration_us, Ordering::Relaxed);
    }

    /// The exposition text. `extra` is appended as is (per-site and
    /// certificate series, which the gateway knows).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(4096);
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        out.push_str("# HELP commons_gateway_responses_total Responses sent, by status class.\n# TYPE commons_gateway_responses_total counter\n");
        for (i, c) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "commons_gateway_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                get(c)
            );
        }
        out.push_str("# HELP commons_gateway_request_duration_seconds Time from request head to response head.\n# TYPE commons_gateway_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += get(&self.latency[i]);
            let _ = writeln!(
                out,
                "commons_gateway_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        cumulative += get(&self.latency[BUCKETS.len()]);
        let _ = writeln!(
            out,
            "commons_gateway_request_duration_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "commons_gateway_request_duration_seconds_sum {}",
            get(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "commons_gateway_request_duration_seconds_count {cumulative}"
        );
        out.push_str("# HELP commons_gateway_upstream_errors_total Failed attempts to reach an upstream, by kind.\n# TYPE commons_gateway_upstream_errors_total counter\n");
        for (kind, c) in [
            ("connect", &self.upstream_connect_errors),
            ("timeout", &self.upstream_timeouts),
            ("protocol", &self.upstream_protocol_errors),
        ] {
            let _ = writeln!(
                out,
                "commons_gateway_upstream_errors_total{{kind=\"{kind}\"}} {}",
                get(c)
            );
        }
        for (name, help, kind, c) in [
            (
                "commons_gateway_retries_total",
                "Requests sent again to another upstream or connection.",
                "counter",
                &self.retries,
            ),
            (
                "commons_gateway_wakes_total",
                "Requests that woke an idle site.",
                "counter",
                &self.wakes,
            ),
            (
                "commons_gateway_wake_timeouts_total",
                "Wakes that took too long (answered 503).",
                "counter",
                &self.wake_timeouts,
            ),
            (
                "commons_gateway_connections_open",
                "Client connections open now.",
                "gauge",
                &self.connections_open,
            ),
            (
                "commons_gateway_connections_total",
                "Client connections accepted.",
                "counter",
                &self.connections_total,
            ),
            (
                "commons_gateway_connections_handed_over_total",
                "HTTP/1.x connections passed to the general server (a large or chunked request body, an upgrade, HTTP/1.0, a platform path, a site to wake).",
                "counter",
                &self.connections_handed_over,
            ),
            (
                "commons_gateway_tls_handshake_errors_total",
                "TLS handshakes that failed or timed out.",
                "counter",
                &self.tls_handshake_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                get(c)
            );
        }
        out.push_str(extra);
        out
    }
}
