//! Who a request is from: the credentials it carries, what the platform
//! says they stand for (looked up off the event loop, remembered in
//! `sessions`), and the identity assertions made for the apps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};

use crate::headers::{bearer_in, cookie, IDENTITY, SERVICE, SESSION_PAIR};
use crate::identity::{self, Claims};
use crate::{sessions, Gateway, User};

pub use crate::headers::SERVICE_HEADER;

/// The credentials a request carries.
#[derive(Default)]
pub(crate) struct Credentials<'a> {
    /// The platform session cookie's value.
    pub session: Option<&'a str>,
    pub bearer: Option<&'a str>,
    /// An identity assertion the gateway signed for another site.
    pub assertion: Option<&'a str>,
    /// A hosted service's own credential (`X-Commons-Service`).
    pub service: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    pub(crate) fn of(headers: &'a http::HeaderMap) -> Credentials<'a> {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        Credentials {
            session: cookie(headers, SESSION_PAIR),
            bearer: text(&header::AUTHORIZATION).and_then(bearer_in),
            assertion: text(&IDENTITY),
            service: text(&SERVICE),
        }
    }
}

/// Who a request is from.
pub(crate) struct Caller {
    pub identity: Option<Arc<Identity>>,
    /// The platform bearer token was used: it does not go on to the app.
    pub(crate) strip_bearer: bool,
}

impl Caller {
    fn anonymous() -> Caller {
        Caller {
            identity: None,
            strip_bearer: false,
        }
    }
}

/// Whether recognising a caller may ask the platform.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookups {
    /// Only what the gateway remembers.
    CacheOnly,
    /// Ask the platform for what it does not (blocking: not on the event
    /// loop).
    Ask,
}

/// [`Credentials`] that outlive their request, for a look-up on another
/// thread.
pub(crate) struct OwnedCredentials {
    session: Option<String>,
    bearer: Option<String>,
    assertion: Option<String>,
    service: Option<String>,
}

impl OwnedCredentials {
    pub(crate) fn of(c: &Credentials) -> OwnedCredentials {
        OwnedCredentials {
            session: c.session.map(str::to_owned),
            bearer: c.bearer.map(str::to_owned),
            assertion: c.assertion.map(str::to_owned),
            service: c.service.map(str::to_owned),
        }
    }

    pub(crate) fn borrow(&self) -> Credentials<'_> {
        Credentials {
            session: self.session.as_deref(),
            bearer: self.bearer.as_deref(),
            assertion: self.assertion.as_deref(),
            service: self.service.as_deref(),
        }
    }
}

/// A credential the platform recognised, cached with the assertions made
/// for it (signing costs more than the rest of a request).
pub(crate) struct Identity {
    pub(crate) user: User,
    pub(crate) id: Arc<str>,
    /// The site that made the request on the user's behalf (the credential
    /// was an assertion the gateway gave that site).
    pub(crate) via: Option<Arc<str>>,
    /// The credential assertions made for this identity refer to (`sid`).
    sid: Arc<str>,
    /// No assertion made for this identity outlives this (seconds): a
    /// service's assertion cannot be exchanged for a longer-lived one.
    expires_s: Option<u64>,
    /// Site → (assertion, its expiry in seconds).
    assertions: std::sync::Mutex<std::collections::HashMap<Arc<str>, (HeaderValue, u64)>>,
}

impl Gateway {
    /// Recognises, for a request to `host`: the platform session cookie
    /// (a site session of this host, or a token good everywhere), a
    /// platform bearer token, or — only from a hosted service that proves
    /// who it is with its service credential — an assertion the gateway
    /// made for that very service, whose underlying credential still holds.
    ///
    /// A credential the gateway has not seen lately is looked up on a
    /// blocking thread: however slow the platform answers, the event loop
    /// goes on serving everyone else.
    pub(crate) async fn caller(
        self: &Arc<Self>,
        credentials: &Credentials<'_>,
        host: &str,
    ) -> Caller {
        if let Some(known) = self.caller_known(credentials, host) {
            return known;
        }
        let owned = OwnedCredentials::of(credentials);
        let (gw, host) = (self.clone(), host.to_string());
        tokio::task::spawn_blocking(move || {
            gw.caller_with(&owned.borrow(), &host, Lookups::Ask)
                .unwrap_or_else(Caller::anonymous)
        })
        .await
        .unwrap_or_else(|_| Caller::anonymous())
    }

    /// [`Gateway::caller`] from what the gateway knows already; `None` when
    /// the platform must be asked (the request is then served where it can
    /// wait for the answer).
    pub(crate) fn caller_known(&self, credentials: &Credentials, host: &str) -> Option<Caller> {
        self.caller_with(credentials, host, Lookups::CacheOnly)
    }

    pub(crate) fn caller_with(
        &self,
        credentials: &Credentials,
        host: &str,
        lookups: Lookups,
    ) -> Option<Caller> {
        let at_host = |i: &Arc<Identity>| i.user.only_host.as_deref().is_none_or(|h| h == host);
        if let Some(cookie) = credentials.session {
            if let Some(identity) = self.user_identity(cookie, lookups)?.filter(at_host) {
                return Some(Caller {
                    identity: Some(identity),
                    strip_bearer: false,
                });
            }
        }
        if let Some(token) = credentials.bearer {
            if let Some(identity) = self.user_identity(token, lookups)?.filter(at_host) {
                return Some(Caller {
                    identity: Some(identity),
                    strip_bearer: true,
                });
            }
        }
        if let (Some(jwt), Some(service)) = (credentials.assertion, credentials.service) {
            return Some(Caller {
                identity: self.delegated_identity(jwt, service, lookups)?,
                strip_bearer: false,
            });
        }
        Some(Caller::anonymous())
    }

    /// The user a session cookie or bearer token stands for (`None`: not
    /// known without asking, and `lookups` said not to).
    pub(crate) fn user_identity(
        &self,
        credential: &str,
        lookups: Lookups,
    ) -> Option<Option<Arc<Identity>>> {
        self.identity(credential, lookups, |c| {
            let user = self.hooks.authenticate(c)?;
            Some((user, None, None, sessions::session_ref(c)))
        })
    }

    /// The user a service calls on behalf of: `jwt` must be an assertion
    /// this gateway made for the calling service (its audience), unexpired,
    /// whose underlying credential is still recognised.
    pub(crate) fn delegated_identity(
        &self,
        jwt: &str,
        service: &str,
        lookups: Lookups,
    ) -> Option<Option<Arc<Identity>>> {
        let Some(calling) = self.hooks.service(service) else {
            return Some(None);
        };
        let identity = self.identity(jwt, lookups, |jwt| {
            let c = self.signer.verify(jwt, commons_clock::now_secs()).ok()?;
            let sid: Arc<str> = Arc::from(c.sid.as_deref()?);
            let credential = self.delegations.get(&sid)?;
            let original = self.user_identity(&credential, Lookups::Ask)??;
            (original.id.as_ref() == c.sub).then_some(())?;
            let user = User {
                id: c.sub,
                tier: c.tier,
                only_host: None,
            };
            Some((user, Some(Arc::from(c.aud.as_str())), Some(c.exp), sid))
        })?;
        let Some(identity) = identity else {
            return Some(None);
        };
        // Revoked since: the credential the chain started from no longer
        // holds (checked as often as that credential itself is).
        let Some(credential) = self.delegations.get(&identity.sid) else {
            return Some(None);
        };
        if self.user_identity(&credential, lookups)?.is_none() {
            return Some(None);
        }
        Some((identity.via.as_deref() == Some(calling.as_str())).then_some(identity))
    }

    /// What `credential` stands for, from the cache or from `look_up`
    /// (which returns the user, the site it came through, when the
    /// credential expires, in seconds, and the session it refers to). The
    /// cache's lock is not held while `look_up` runs. `None` when the cache
    /// does not know and `lookups` is [`Lookups::CacheOnly`].
    pub(crate) fn identity(
        &self,
        credential: &str,
        lookups: Lookups,
        look_up: impl FnOnce(&str) -> Option<(User, Option<Arc<str>>, Option<u64>, Arc<str>)>,
    ) -> Option<Option<Arc<Identity>>> {
        if credential.is_empty() || credential.len() > 4096 {
            return Some(None);
        }
        let now = Instant::now();
        if let Some((identity, until)) = self.sessions.get(credential) {
            if until > now {
                return Some(identity);
            }
        }
        if lookups == Lookups::CacheOnly {
            return None;
        }
        let found = look_up(credential);
        let mut until = now
            + if found.is_some() {
                sessions::KNOWN_FOR
            } else {
                sessions::UNKNOWN_FOR
            };
        let identity = found.map(|(user, via, expires_s, sid)| {
            if let Some(exp) = expires_s {
                let left = exp.saturating_sub(commons_clock::now_secs());
                until = until.min(now + Duration::from_secs(left));
            }
            Arc::new(Identity {
                id: Arc::from(user.id.as_str()),
                user,
                via,
                sid,
                expires_s,
                assertions: Default::default(),
            })
        });
        self.sessions
            .insert(credential.into(), (identity.clone(), until));
        if let Some(i) = identity.as_ref().filter(|i| i.via.is_none()) {
            self.delegations.insert(i.sid.clone(), credential.into());
        }
        Some(identity)
    }

    /// The assertion for `identity` at `site`, re-signed when half its life
    /// is gone; never valid past the identity's own expiry.
    pub(crate) fn assertion(&self, identity: &Identity, site: &Arc<str>) -> HeaderValue {
        let now = commons_clock::now_secs();
        let mut cache = identity
            .assertions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((v, exp)) = cache.get(site) {
            if *exp > now + identity::LIFETIME_S / 2 || identity.expires_s == Some(*exp) {
                return v.clone();
            }
        }
        let exp = (now + identity::LIFETIME_S).min(identity.expires_s.unwrap_or(u64::MAX));
        let claims = Claims {
            iss: identity::ISSUER.into(),
            sub: identity.user.id.clone(),
            tier: identity.user.tier.clone(),
            aud: site.to_string(),
            iat: now,
            exp,
            via: identity.via.as_deref().map(str::to_string),
            sid: Some(identity.sid.to_string()),
        };
        let v = HeaderValue::from_str(&self.signer.sign(&claims)).expect("a JWT is ASCII");
        cache.insert(site.clone(), (v.clone(), claims.exp));
        v
    }
}
