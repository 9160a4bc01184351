//! Certificates from an ACME server (RFC 8555), with instant-acme.
//!
//! Challenges: HTTP-01 (the default: the gateway answers
//! `/.well-known/acme-challenge/` on its plain-HTTP listener) or TLS-ALPN-01
//! (RFC 8737, for when port 80 is not open: the HTTPS listener answers an
//! `acme-tls/1` handshake with a certificate carrying the key
//! authorization's digest). Certificates are issued on demand, during the first
//! TLS handshake for a host, and only for a host a deployed site serves (so
//! nobody can make the platform request certificates for names it does not
//! host). They are renewed when a third of their validity is left. The
//! account key and every certificate and key are kept under the gateway's
//! directory, mode 0600, and loaded again at start.
//!
//! Several gateways in front of one platform share what ACME gives them
//! through a [`SharedAcme`] (the platform's shared store, sealed): one
//! gateway orders a host's certificate while it holds that host's lease,
//! the others wait for it and take the same certificate; every gateway
//! answers every HTTP-01 challenge (the ACME server may reach any of them);
//! and each picks up the certificates the others issued or renewed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use crate::identity::write_private_file;
use crate::tls::Cert;
use crate::{BoxFuture, Gateway};

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("ACME order for {host} ended {status}")]
    Order { host: String, status: String },
    #[error("the ACME server offers no {kind} challenge for {host}")]
    NoChallenge { kind: &'static str, host: String },
    #[error("cannot keep ACME state in {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0:?} is not a domain name a certificate can be issued for")]
    NotADomain(String),
    #[error("the issued certificate is unusable: {0}")]
    Cert(#[from] crate::tls::TlsError),
    #[error("the gateways' shared ACME store: {0}")]
    Shared(String),
    #[error("another gateway is still ordering the certificate for {0}")]
    Leased(String),
}

/// What the gateways in front of one platform share of ACME. An
/// implementation keeps keys sealed at rest; every call may reach another
/// machine.
pub trait SharedAcme: Send + Sync {
    /// The certificate chain and key (PEM) kept for `host`.
    fn certificate(&self, host: &str) -> BoxFuture<Result<Option<(String, String)>, String>>;
    fn save_certificate(&self, host: &str, chain: &str, key: &str)
        -> BoxFuture<Result<(), String>>;
    /// Certificates saved after position `after` (0: all), as (host,
    /// chain, key), and the position to ask from next time.
    fn certificates_since(&self, after: i64) -> BoxFuture<Result<(Vec<SharedCert>, i64), String>>;
    /// The right to order `host`'s certificate: `Some` while held (dropped,
    /// another gateway may take it; a gateway that dies loses it), `None`
    /// while another gateway holds it.
    fn lease(&self, host: &str) -> BoxFuture<Result<Option<Box<dyn Send>>, String>>;
    /// Makes an HTTP-01 answer known to every gateway, until removed.
    fn put_answer(&self, token: &str, key_authorization: &str) -> BoxFuture<Result<(), String>>;
    fn answer(&self, token: &str) -> BoxFuture<Option<String>>;
    fn remove_answer(&self, token: &str) -> BoxFuture<()>;
}

/// A certificate another gateway saved: (host, chain, key), PEM.
pub type SharedCert = (String, String, String);

/// How long a gateway waits for the one holding a host's lease.
const LEASE_WAIT: Duration = Duration::from_secs(90);

/// Where to get certificates.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The directory URL (Let's Encrypt's, or a test server's).
    pub directory: String,
    /// PEM file of the CA that signs the ACME server's own TLS certificate,
    /// when it is not a public one (a test server).
    pub root: Option<PathBuf>,
    pub contact: Option<String>,
    /// Where the account and certificates are kept.
    pub dir: PathBuf,
    pub challenge: Challenge,
}

/// How the ACME server checks that the gateway serves a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Challenge {
    /// A file at `http://HOST/.well-known/acme-challenge/TOKEN` (port 80).
    #[default]
    Http01,
    /// A TLS handshake with ALPN `acme-tls/1` (port 443).
    TlsAlpn01,
}

impl std::str::FromStr for Challenge {
    type Err = String;
    fn from_str(s: &str) -> Result<Challenge, String> {
        match s {
            "http-01" => Ok(Challenge::Http01),
            "tls-alpn-01" => Ok(Challenge::TlsAlpn01),
            other => Err(format!(
                "\"{other}\" is not an ACME challenge the gateway answers: use http-01 or tls-alpn-01"
            )),
        }
    }
}

pub use crate::tls::ACME_TLS_ALPN;

/// A TLS-ALPN-01 challenge certificate for `host`: self-signed, naming only
/// `host`, with the critical `acmeIdentifier` extension holding the SHA-256
/// digest of the key authorization.
fn challenge_certificate(
    host: &str,
    digest: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, crate::tls::TlsError> {
    let e = |e: rcgen::Error| crate::tls::TlsError::SelfSigned(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(e)?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(e)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(e)?;
    Ok(Cert::from_pem(&cert.pem(), &key.serialize_pem(), false)?.key)
}

pub struct Acme {
    config: AcmeConfig,
    account: tokio::sync::Mutex<Option<Account>>,
    /// One issuance per host at a time.
    issuing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shared: Option<Arc<dyn SharedAcme>>,
    /// The position in the shared store's certificates taken so far.
    synced: std::sync::atomic::AtomicI64,
}

impl Acme {
    /// ACME for one gateway: certificates kept in `config.dir`.
    pub fn new(config: AcmeConfig) -> Arc<Acme> {
        Acme::build(config, None)
    }

    /// ACME for one of several gateways: certificates, orders and
    /// challenge answers go through `shared` (the account stays in
    /// `config.dir`; no certificate or key is written there).
    pub fn shared(config: AcmeConfig, shared: Arc<dyn SharedAcme>) -> Arc<Acme> {
        Acme::build(config, Some(shared))
    }

    fn build(config: AcmeConfig, shared: Option<Arc<dyn SharedAcme>>) -> Arc<Acme> {
        Arc::new(Acme {
            config,
            account: tokio::sync::Mutex::new(None),
            issuing: Default::default(),
            shared,
            synced: Default::default(),
        })
    }

    /// The HTTP-01 answer for `token` that another gateway's order put in
    /// the shared store.
    pub(crate) async fn shared_answer(&self, token: &str) -> Option<String> {
        // Tokens are base64url (RFC 8555 §8.1): nothing else is looked up.
        let plausible = !token.is_empty()
            && token.len() <= 128
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        match &self.shared {
            Some(shared) if plausible => shared.answer(token).await,
            _ => None,
        }
    }

    /// Takes the certificates other gateways saved since the last call into
    /// `gateway`; returns how many.
    pub async fn sync(&self, gateway: &Gateway) -> Result<usize, AcmeError> {
        use std::sync::atomic::Ordering;
        let Some(shared) = &self.shared else {
            return Ok(0);
        };
        let after = self.synced.load(Ordering::Relaxed);
        let (certs, next) = shared
            .certificates_since(after)
            .await
            .map_err(AcmeError::Shared)?;
        let mut n = 0;
        for (host, chain, key) in certs {
            match Cert::from_pem(&chain, &key, true) {
                // The later of what this gateway has and what was saved.
                Ok(cert)
                    if gateway
                        .certs
                        .get(&host)
                        .is_none_or(|c| !c.acme || c.not_after <= cert.not_after) =>
                {
                    gateway.certs.insert(&host, cert);
                    n += 1;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(host = %host, error = %e, "skipping a shared certificate"),
            }
        }
        self.synced.fetch_max(next, Ordering::Relaxed);
        Ok(n)
    }

    /// Takes `host`'s shared certificate when it is not due for renewal at
    /// `now_s`; true if it did.
    async fn take_shared(
        &self,
        shared: &dyn SharedAcme,
        gateway: &Gateway,
        host: &str,
        now_s: i64,
    ) -> Result<bool, AcmeError> {
        let Some((chain, key)) = shared.certificate(host).await.map_err(AcmeError::Shared)? else {
            return Ok(false);
        };
        let cert = Cert::from_pem(&chain, &key, true)?;
        if cert.due_for_renewal(now_s) {
            return Ok(false);
        }
        gateway.certs.insert(host, cert);
        Ok(true)
    }

    /// Issues (or renews) `host`'s certificate once among the gateways
    /// sharing `shared`: taken from the store if another gateway has one
    /// not due at `now_s`, else ordered here while this gateway holds the
    /// host's lease, else waited for.
    async fn issue_once(
        &self,
        shared: &dyn SharedAcme,
        gateway: &Gateway,
        host: &str,
        now_s: i64,
    ) -> Result<(), AcmeError> {
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            if self.take_shared(shared, gateway, host, now_s).await? {
                return Ok(());
            }
            match shared.lease(host).await.map_err(AcmeError::Shared)? {
                Some(lease) => {
                    // Another may have finished between the look and the lease.
                    if self.take_shared(shared, gateway, host, now_s).await? {
                        return Ok(());
                    }
                    let issued = self.issue(gateway, host).await;
                    drop(lease);
                    return issued;
                }
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None => return Err(AcmeError::Leased(host.to_string())),
            }
        }
    }

    fn io(&self, source: std::io::Error) -> AcmeError {
        AcmeError::Io {
            path: self.config.dir.display().to_string(),
            source,
        }
    }

    /// Loads the certificates kept from earlier runs into `gateway`.
    pub fn load(&self, gateway: &Gateway) -> Result<usize, AcmeError> {
        let dir = self.config.dir.join("certs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io(e)),
        };
        let mut n = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "crt") {
                let (Ok(chain), Ok(key)) = (
                    std::fs::read_to_string(&path),
                    std::fs::read_to_string(path.with_extension("key")),
                ) else {
                    continue;
                };
                let host = path.file_stem().unwrap_or_default().to_string_lossy();
                match Cert::from_pem(&chain, &key, true) {
                    Ok(cert) => {
                        gateway.certs.insert(&host, cert);
                        n += 1;
                    }
                    Err(e) => {
                        tracing::warn!(host = %host, error = %e, "skipping a stored certificate")
                    }
                }
            }
        }
        Ok(n)
    }

    /// Makes sure `host` has a certificate that is not due for renewal.
    pub async fn ensure(&self, gateway: &Gateway, host: &str) -> Result<(), AcmeError> {
        if !is_dns_name(host) {
            return Err(AcmeError::NotADomain(host.to_string()));
        }
        let lock = self
            .issuing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(host.to_string())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        let now = commons_clock::now_secs() as i64;
        if gateway
            .certs
            .get(host)
            .is_some_and(|c| c.acme && !c.due_for_renewal(now))
        {
            return Ok(());
        }
        match &self.shared {
            Some(shared) => self.issue_once(shared.as_ref(), gateway, host, now).await,
            None => self.issue(gateway, host).await,
        }
    }

    /// Renews every ACME certificate due at `now_s`; returns the hosts
    /// renewed and those that failed.
    pub async fn renew_due(
        &self,
        gateway: &Gateway,
        now_s: i64,
    ) -> Vec<(String, Result<(), AcmeError>)> {
        let mut out = Vec::new();
        if let Err(e) = self.sync(gateway).await {
            tracing::warn!(error = %e, "cannot read the shared certificates");
        }
        for (host, cert) in gateway.certs.all() {
            if cert.acme && cert.due_for_renewal(now_s) {
                let r = match &self.shared {
                    Some(shared) => {
                        self.issue_once(shared.as_ref(), gateway, &host, now_s)
                            .await
                    }
                    None => self.issue(gateway, &host).await,
                };
                if let Err(e) = &r {
                    tracing::warn!(host = %host, error = %e, "certificate renewal failed");
                }
                out.push((host, r));
            }
        }
        out
    }

    /// Checks for due renewals every `every`, for as long as the gateway
    /// runs; with a shared store, takes what other gateways saved every
    /// `sync_every` too.
    pub fn spawn_renewal(
        self: &Arc<Self>,
        gateway: Arc<Gateway>,
        every: Duration,
        sync_every: Duration,
    ) {
        let acme = self.clone();
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            loop {
                if acme.shared.is_some() {
                    tokio::time::sleep(sync_every.min(every)).await;
                    if let Err(e) = acme.sync(&gateway).await {
                        tracing::warn!(error = %e, "cannot read the shared certificates");
                    }
                } else {
                    tokio::time::sleep(every).await;
                }
                if renewed.elapsed() >= every {
                    acme.renew_due(&gateway, commons_clock::now_secs() as i64)
                        .await;
                    renewed = tokio::time::Instant::now();
                }
            }
        });
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let builder = || match &self.config.root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let path = self.config.dir.join("account.json");
        let account = match std::fs::read(&path) {
            Ok(bytes) => {
                let creds: AccountCredentials = serde_json::from_slice(&bytes).map_err(|e| {
                    self.io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                })?;
                builder()?.from_credentials(creds).await?
            }
            Err(_) => {
                let contact: Vec<String> = self
                    .config
                    .contact
                    .iter()
                    .map(|c| format!("mailto:{c}"))
                    .collect();
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let (account, creds) = builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        None,
                    )
                    .await?;
                let json = serde_json::to_vec(&creds).expect("json");
                write_private_file(&path, &json).map_err(|e| self.io(e))?;
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    async fn issue(&self, gateway: &Gateway, host: &str) -> Result<(), AcmeError> {
        let account = self.account().await?;
        let mut order = account
            .new_order(&NewOrder::new(&[Identifier::Dns(host.to_string())]))
            .await?;
        let mut tokens = Vec::new();
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status != AuthorizationStatus::Pending {
                continue;
            }
            let (kind, name) = match self.config.challenge {
                Challenge::Http01 => (ChallengeType::Http01, "HTTP-01"),
                Challenge::TlsAlpn01 => (ChallengeType::TlsAlpn01, "TLS-ALPN-01"),
            };
            let mut challenge = authz.challenge(kind).ok_or(AcmeError::NoChallenge {
                kind: name,
                host: host.to_string(),
            })?;
            let key_authorization = challenge.key_authorization();
            match self.config.challenge {
                Challenge::Http01 => {
                    if let Some(shared) = &self.shared {
                        shared
                            .put_answer(&challenge.token, key_authorization.as_str())
                            .await
                            .map_err(AcmeError::Shared)?;
                    }
                    gateway
                        .challenges
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            challenge.token.clone(),
                            key_authorization.as_str().to_string(),
                        );
                    tokens.push(challenge.token.clone());
                }
                Challenge::TlsAlpn01 => {
                    let cert = challenge_certificate(host, key_authorization.digest().as_ref())?;
                    gateway
                        .alpn_challenges
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(host.to_string(), cert);
                }
            }
            challenge.set_ready().await?;
        }
        let retry = RetryPolicy::new().timeout(Duration::from_secs(60));
        let status = order.poll_ready(&retry).await;
        {
            let mut c = gateway
                .challenges
                .write()
                .unwrap_or_else(|p| p.into_inner());
            for t in &tokens {
                c.remove(t);
            }
        }
        if let Some(shared) = &self.shared {
            for t in &tokens {
                shared.remove_answer(t).await;
            }
        }
        gateway
            .alpn_challenges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
        let status = status?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order {
                host: host.to_string(),
                status: format!("{status:?}"),
            });
        }
        let key = order.finalize().await?;
        let chain = order.poll_certificate(&retry).await?;
        let cert = Cert::from_pem(&chain, &key, true)?;
        match &self.shared {
            Some(shared) => shared
                .save_certificate(host, &chain, &key)
                .await
                .map_err(AcmeError::Shared)?,
            None => {
                let dir = self.config.dir.join("certs");
                write_private_file(&dir.join(format!("{host}.key")), key.as_bytes())
                    .map_err(|e| self.io(e))?;
                write_private_file(&dir.join(format!("{host}.crt")), chain.as_bytes())
                    .map_err(|e| self.io(e))?;
            }
        }
        gateway.certs.insert(host, cert);
        tracing::info!(host, "certificate issued");
        Ok(())
    }
}

/// True for a lower-case DNS name with at least two labels (no IP
/// addresses, no path characters: the name becomes a file name).
fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.contains('.')
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}
