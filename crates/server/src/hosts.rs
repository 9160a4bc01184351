//! Which organisation may route which host: checked when a blueprint that
//! comes through the API or the console is planned or deployed, so no
//! tenant can take over another's host or path.
//!
//! - A site's own names, by platform rule: `SITE.localhost` and
//!   `*.SITE.localhost` belong to the organisation that owns site `SITE`.
//!   No other host under `localhost` may be routed.
//! - Any other host belongs to the organisation the platform's
//!   administrator verified it for: `$COMMONS_HOME/domains.json`, a map of
//!   host → organisation (`commons domains add HOST --org ORG`); a listed
//!   domain covers its subdomains.
//! - Two sites of one organisation share a host only on distinct explicit
//!   paths; a host another organisation routes is refused as "another
//!   organisation"'s, naming neither it nor its site.

use crate::error::ErrorKind;
use std::collections::BTreeMap;
use std::path::Path;

use commons_engine::Target;

use crate::{AppError, AppState};

/// The domain under which every site has names of its own.
pub const SITES_DOMAIN: &str = "localhost";

/// The verified domains: host → organisation.
pub fn verified(home: &Path) -> BTreeMap<String, String> {
    std::fs::read(commons_runtime::Layout::new(home).domains_file())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records that `org` owns `host` (and its subdomains).
pub fn verify(home: &Path, host: &str, org: &str) -> Result<(), String> {
    let host = commons_gateway::target::canonical_host(host)
        .ok_or_else(|| format!("\"{host}\" is not a host name"))?;
    if host == SITES_DOMAIN || host.ends_with(&format!(".{SITES_DOMAIN}")) {
        return Err(format!(
            "hosts under {SITES_DOMAIN} belong to the site they name; verify a domain of your own"
        ));
    }
    let mut all = verified(home);
    all.insert(host, org.to_string());
    let json = serde_json::to_vec_pretty(&all).expect("json");
    commons_runtime::layout::write_whole(&commons_runtime::Layout::new(home).domains_file(), &json)
        .map_err(|e| e.to_string())
}

/// The organisation `host` belongs to by the verified domains, if any.
fn verified_owner<'a>(domains: &'a BTreeMap<String, String>, host: &str) -> Option<&'a str> {
    let mut candidate = host;
    loop {
        if let Some(org) = domains.get(candidate) {
            return Some(org);
        }
        candidate = candidate.split_once('.')?.1;
    }
}

/// Refuses `target` (a site of `org`) if a route of it names a host or
/// path that is not `org`'s to route.
pub fn check(state: &AppState, org: &str, target: &Target) -> Result<(), AppError> {
    let site = target.name.as_str();
    let own_suffix = format!(".{site}.{SITES_DOMAIN}");
    let domains = verified(&state.home);
    let others = crate::gateway::routes_of(&state.engine);
    for (component, c) in &target.blueprint.components {
        let Some(route) = &c.route else { continue };
        let Some(raw) = route.host.as_deref() else {
            continue;
        };
        let Some(host) = commons_gateway::target::canonical_host(raw) else {
            return Err(refused(format!(
                "component {component}: \"{raw}\" is not a host name"
            )));
        };
        let own = host == format!("{site}.{SITES_DOMAIN}") || host.ends_with(&own_suffix);
        if !own {
            if let Some(rest) = host.strip_suffix(&format!(".{SITES_DOMAIN}")) {
                // The site a name under the sites' domain belongs to.
                let named = rest.rsplit('.').next().unwrap_or(rest);
                let whose = match state.accounts.store().site(named)?.map(|s| s.org) {
                    Some(o) if o == org => format!("your site \"{named}\""),
                    Some(_) => "another organisation".to_string(),
                    None => format!("the site named \"{named}\""),
                };
                return Err(taken(format!(
                    "component {component}: {host} belongs to {whose}; this site's hosts \
                     are {site}.{SITES_DOMAIN} and *.{site}.{SITES_DOMAIN}"
                )));
            }
            if host == SITES_DOMAIN {
                return Err(taken(format!(
                    "component {component}: {host} is the platform's; this site's hosts \
                     are {site}.{SITES_DOMAIN} and *.{site}.{SITES_DOMAIN}"
                )));
            }
            match verified_owner(&domains, &host) {
                Some(owner) if owner == org => {}
                Some(_) => {
                    return Err(taken(format!(
                        "component {component}: {host} belongs to another organisation"
                    )))
                }
                None => {
                    return Err(refused(format!(
                        "component {component}: {host} is not a verified domain of \"{org}\"; \
                         the platform's administrator verifies domains \
                         (`commons domains add {host} --org {org}`), or use \
                         {site}.{SITES_DOMAIN}"
                    )))
                }
            }
        }
        // Nobody else routes this host and path now.
        let path = route.path.as_str();
        for r in others
            .iter()
            .filter(|r| r.host == host && r.deployment != site)
        {
            let other_org = state.accounts.store().site(&r.deployment)?.map(|s| s.org);
            if other_org.as_deref() != Some(org) {
                return Err(taken(format!(
                    "component {component}: {host} is routed by another organisation"
                )));
            }
            if r.path.trim_end_matches('/') == path.trim_end_matches('/') {
                return Err(taken(format!(
                    "component {component}: {host}{path} is routed by your site \"{}\"; \
                     give this one another path",
                    r.deployment
                )));
            }
        }
    }
    Ok(())
}

fn taken(detail: String) -> AppError {
    AppError::new(ErrorKind::Conflict, "Host taken", detail)
}

fn refused(detail: String) -> AppError {
    AppError::new(ErrorKind::Forbidden, "Host not yours", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_domain_covers_its_subdomains() {
        let mut d = BTreeMap::new();
        d.insert("example.org".to_string(), "ann".to_string());
        assert_eq!(verified_owner(&d, "example.org"), Some("ann"));
        assert_eq!(verified_owner(&d, "www.example.org"), Some("ann"));
        assert_eq!(verified_owner(&d, "example.com"), None);
        assert_eq!(verified_owner(&d, "badexample.org"), None);
    }
}
