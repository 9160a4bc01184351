//! A component's nested settings: its health check, its route through
//! the gateway (and that route's limits), and its resource limits.

use super::*;

impl Loader<'_> {
    pub(super) fn health(&mut self, file: &Path, node: &Node) -> Option<Health> {
        let f = self.fields(file, node, HEALTH_FIELDS, "health")?;
        let http = match f.get("http") {
            Some(n) => {
                let p = self.string(file, n, "health.http")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        n.pos,
                        format!("health check path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                p
            }
            None => {
                self.sink(file).error_help(
                    node.pos,
                    "health needs `http`",
                    "write `health: { http: \"/\" }`",
                );
                return None;
            }
        };
        let timeout_ms = match f.get("timeout") {
            Some(n) => self.duration(file, n, "health.timeout")?,
            None => 30_000,
        };
        let interval_ms = match f.get("interval") {
            Some(n) => self.duration(file, n, "health.interval")?.max(1),
            None => 50,
        };
        Some(Health {
            http,
            timeout_ms,
            interval_ms,
        })
    }

    pub(super) fn route(&mut self, file: &Path, node: &Node) -> Option<Route> {
        let f = self.fields(file, node, ROUTE_FIELDS, "route")?;
        let host = match f.get("host") {
            Some(n) => {
                let h = self.string(file, n, "route.host")?.to_ascii_lowercase();
                let valid = !h.is_empty()
                    && h.len() <= 253
                    && h.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && !label.starts_with('-')
                            && !label.ends_with('-')
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !valid {
                    self.sink(file).error_help(
                        n.pos,
                        format!("\"{h}\" is not a valid host name"),
                        "write a DNS name such as hello.localhost or www.example.org",
                    );
                    return None;
                }
                Some(h)
            }
            // The deployment's own names (DEPLOYMENT.localhost, ...).
            None => None,
        };
        let path = match f.get("path") {
            Some(n) => {
                let p = self.string(file, n, "route.path")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        n.pos,
                        format!("route path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                p
            }
            None => "/".to_string(),
        };
        let mut login = Vec::new();
        if let Some(n) = f.get("login") {
            let NodeKind::Seq(items) = &n.kind else {
                self.sink(file).error_help(
                    n.pos,
                    "`login` must be a list of path prefixes",
                    "write `login: [/admin]`",
                );
                return None;
            };
            for item in items {
                let p = self.string(file, item, "a path in route.login")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        item.pos,
                        format!("login path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                login.push(p);
            }
        }
        // Absent: None; present: Some, if it is valid (else the error is
        // reported and the route is not made).
        let mut limit = |name: &str, size: bool, range, help: &str| match f.get(name) {
            None => Some(None),
            Some(n) => self.route_limit(file, n, name, size, range, help).map(Some),
        };
        let max_body_bytes = limit(
            "max_body",
            true,
            1..=u64::MAX,
            "write a size such as 10Mi or 512Ki",
        )?;
        let max_header_bytes = limit(
            "max_header",
            true,
            1024..=GATEWAY_MAX_HEADER,
            "write a size from 1Ki to 64Ki (the gateway reads no more)",
        )?;
        let response_timeout_ms = limit(
            "response_timeout",
            false,
            1..=MAX_RESPONSE_TIMEOUT_MS,
            "write how long the app may take to start its answer, from 1ms to 1h, such as 30s or 5m",
        )?;
        let user_header = match f.get("user_header") {
            Some(n) => {
                let h = self
                    .string(file, n, "route.user_header")?
                    .to_ascii_lowercase();
                let valid = !h.is_empty()
                    && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !GATEWAY_HEADERS.contains(&h.as_str())
                    && !h.starts_with("x-forwarded-")
                    && !h.starts_with("x-commons-");
                if !valid {
                    self.sink(file).error_help(
                        n.pos,
                        format!("\"{h}\" cannot carry the signed-in user"),
                        "name a header of the app's own, such as X-Remote-User; the gateway sets the others itself",
                    );
                    return None;
                }
                Some(h)
            }
            None => None,
        };
        Some(Route {
            host,
            path,
            login,
            max_body_bytes,
            max_header_bytes,
            response_timeout_ms,
            user_header,
        })
    }

    /// A route's limit, `name`: a size (`size`) or a duration in
    /// milliseconds, within `range`; otherwise an error with `help`.
    pub(super) fn route_limit(
        &mut self,
        file: &Path,
        node: &Node,
        name: &str,
        size: bool,
        range: std::ops::RangeInclusive<u64>,
        help: &str,
    ) -> Option<u64> {
        let s = self.string(file, node, &format!("route.{name}"))?;
        let parsed = if size {
            parse_bytes(&s)
        } else {
            parse_duration_ms(&s)
        };
        let message = match parsed {
            Some(v) if range.contains(&v) => return Some(v),
            Some(_) => format!("route.{name} \"{s}\" is out of range"),
            None if size => format!("route.{name} \"{s}\" is not a size"),
            None => format!("route.{name} \"{s}\" is not a duration"),
        };
        self.sink(file).error_help(node.pos, message, help);
        None
    }

    pub(super) fn resources(&mut self, file: &Path, node: &Node) -> Option<Resources> {
        let f = self.fields(file, node, RESOURCE_FIELDS, "resources")?;
        let mut r = Resources::default();
        if let Some(n) = f.get("memory") {
            let s = self.string(file, n, "resources.memory")?;
            match parse_bytes(&s) {
                Some(b) if b >= 1 << 20 => r.memory_bytes = Some(b),
                _ => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("memory \"{s}\" is not a size of at least 1Mi"),
                        "write a size such as 256Mi or 1Gi",
                    );
                    return None;
                }
            }
        }
        if let Some(n) = f.get("cpu") {
            let s = self.string(file, n, "resources.cpu")?;
            match parse_cpu_millis(&s) {
                Some(m) => r.cpu_millis = Some(m),
                None => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("cpu \"{s}\" is not a number of cores"),
                        "write cores such as 0.5 or 2, or thousandths such as 500m",
                    );
                    return None;
                }
            }
        }
        if let Some(n) = f.get("pids") {
            r.pids = Some(self.uint(file, n, "resources.pids", 1 << 22)?);
        }
        Some(r)
    }
}
