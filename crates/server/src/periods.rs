//! Closing a billing period, as one call: the meter's usage of the period,
//! the money settings and the sites deployed here, allocated in the ledger.
//! `commons period close` calls it; so will the daemon, at each month's end.
//!
//! Settings (policy, tiers, projects' dependencies, agreements, sites run
//! elsewhere, organisations' splits, auto-redemption) come from
//! `COMMONS_HOME/ledger/config.json` when it exists; sites deployed here are
//! known from their blueprints (operator and provider `local`). Providers'
//! shares of a site are what the meter saw their nodes do for it.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use commons_ledger::allocation::{Agreement, Context, Policy, Project};
use commons_ledger::billing::{default_tiers, Billing, Tier};
use commons_ledger::cents::Cents;
use commons_ledger::journal::Journal;
use commons_ledger::period::{close_period, Closed, MemberSplit, Registry, Site};
use commons_meter::Meter;
use commons_runtime::Layout;
use commons_store::StoreConfig;

/// Why a period was not closed, or a store not opened.
#[derive(Debug, thiserror::Error)]
pub enum MoneyError {
    /// The caller's mistake: a period that is no period, a settings file
    /// that does not parse.
    #[error("{0}")]
    Input(String),
    /// A store failed, or the ledger's invariants do not hold.
    #[error("{0}")]
    Failed(String),
}

fn failed<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> MoneyError + '_ {
    move |e| MoneyError::Failed(format!("{what}: {e}"))
}

/// The money settings of a platform (`ledger/config.json`).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MoneySettings {
    pub policy: Option<Policy>,
    pub tiers: Option<Vec<Tier>>,
    pub projects: HashMap<String, Project>,
    pub agreements: Vec<Agreement>,
    /// Sites run elsewhere, by name.
    pub sites: HashMap<String, Site>,
    pub splits: HashMap<String, MemberSplit>,
    pub auto_redeem: Vec<String>,
}

impl MoneySettings {
    /// The settings file of `home`; the defaults when there is none.
    pub fn load(home: &Path) -> Result<MoneySettings, MoneyError> {
        let path = Layout::new(home).ledger_config();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| MoneyError::Input(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MoneySettings::default()),
            Err(e) => Err(MoneyError::Failed(format!("{}: {e}", path.display()))),
        }
    }

    /// The tiers subscribers choose from.
    pub fn tiers(&self) -> Vec<Tier> {
        self.tiers.clone().unwrap_or_else(default_tiers)
    }
}

/// The ledger's directory, created private when missing.
fn ledger_dir(home: &Path) -> Result<std::path::PathBuf, MoneyError> {
    let dir = Layout::new(home).ledger_dir();
    crate::private_dir(&dir).map_err(failed(&dir.display().to_string()))?;
    Ok(dir)
}

/// The ledger's journal, where the platform keeps its state: the embedded
/// file under `home`, or PostgreSQL (the same server and schema as the
/// engine's and the accounts' tables).
pub fn journal(home: &Path, store: &StoreConfig) -> Result<Journal, MoneyError> {
    match store {
        StoreConfig::Embedded => {
            ledger_dir(home)?;
            Journal::open(&Layout::new(home).ledger_db()).map_err(failed("ledger"))
        }
        StoreConfig::Postgres { url, schema } => {
            let pg =
                commons_ledger::store::PgStore::connect(url, schema).map_err(failed("ledger"))?;
            Journal::with_store(Box::new(pg)).map_err(failed("ledger"))
        }
    }
}

/// The meter, where the platform keeps its state: the embedded file under
/// `home`, or PostgreSQL (the same server, schema `<schema>_meter`).
pub fn meter(home: &Path, store: &StoreConfig) -> Result<Meter, MoneyError> {
    match store {
        StoreConfig::Embedded => {
            let db = Layout::new(home).meter_db();
            let dir = db.parent().expect("the meter's file is in a directory");
            crate::private_dir(dir).map_err(failed(&dir.display().to_string()))?;
            Meter::open(&db, crate::GRACE_MS).map_err(failed("meter"))
        }
        StoreConfig::Postgres { url, schema } => {
            Meter::open_postgres(url, &format!("{schema}_meter"), crate::GRACE_MS)
                .map_err(failed("meter"))
        }
    }
}

/// Subscriptions, payments and their tiers: beside the journal, in SQLite or
/// in PostgreSQL as `store` says.
pub fn billing(home: &Path, store: &StoreConfig, tiers: Vec<Tier>) -> Result<Billing, MoneyError> {
    match store {
        StoreConfig::Embedded => {
            ledger_dir(home)?;
            Billing::open(&Layout::new(home).billing_db(), tiers).map_err(failed("billing"))
        }
        StoreConfig::Postgres { url, schema } => {
            Billing::connect(url, schema, tiers).map_err(failed("billing"))
        }
    }
}

/// Sites deployed on this machine, from their blueprints.
fn local_sites(home: &Path, store: &StoreConfig) -> HashMap<String, Site> {
    let mut out = HashMap::new();
    let Ok(engine) = commons_engine::Engine::open(home, store) else {
        return out;
    };
    for d in engine.list().unwrap_or_default() {
        if let Ok(bp) =
            commons_blueprint::load(Path::new(&d.blueprint), &commons_blueprint::FileSystem)
        {
            out.insert(
                d.name.clone(),
                Site {
                    operator: "local".into(),
                    providers: vec![("local".into(), 1)],
                    projects: bp
                        .depends_on_projects
                        .iter()
                        .map(|p| (p.project.clone(), p.weight as u64))
                        .collect(),
                },
            );
        }
    }
    out
}

/// Closes `period` (YYYY-MM): takes the meter's late events, allocates
/// every subscriber's payment by what they used, and checks the ledger's
/// invariants. Closing a closed period again changes nothing.
pub fn close(home: &Path, store: &StoreConfig, period: &str) -> Result<Closed, MoneyError> {
    close_with(
        home,
        store,
        period,
        &meter(home, store)?,
        &mut journal(home, store)?,
    )
}

/// How long an instance waits for another's close of the same period.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The lease on closing `period`, once no other instance holds it.
fn close_lease(store: &StoreConfig, period: &str) -> Result<commons_store::Lease, MoneyError> {
    match store
        .lease(&format!("period-close:{period}"), CLOSE_WAIT)
        .map_err(failed("store"))?
    {
        commons_store::Leased::Held(lease) => Ok(lease),
        commons_store::Leased::Taken => Err(MoneyError::Failed(format!(
            "another platform instance has been closing {period} for {} s; try again once it is done",
            CLOSE_WAIT.as_secs()
        ))),
    }
}

/// [`close`] with the meter and the journal the caller holds (the server's:
/// the journal has one writer at a time).
pub fn close_with(
    home: &Path,
    store: &StoreConfig,
    period: &str,
    m: &Meter,
    j: &mut Journal,
) -> Result<Closed, MoneyError> {
    if commons_meter::period_bounds(period).is_none() || period.len() != 7 {
        return Err(MoneyError::Input(format!(
            "\"{period}\" is not a period: write YYYY-MM, e.g. 2026-11"
        )));
    }
    let settings = MoneySettings::load(home)?;
    // Instances sharing one PostgreSQL close a period one at a time: the
    // one that waited then plans on the book as the other left it (caught
    // up), finds the period closed, and changes nothing.
    let _lease = close_lease(store, period)?;
    j.catch_up().map_err(failed("ledger"))?;
    m.close_period(period).map_err(failed("meter"))?;
    let usage = m.usage_by_user(period).map_err(failed("meter"))?;
    let mut sites = local_sites(home, store);
    sites.extend(settings.sites.clone());
    // Providers are paid by what their nodes measurably did for each site
    // (a site that moved mid-period pays each for its part); a site the
    // meter saw no provider serve keeps what its settings say.
    for (site, providers) in m.providers_by_site(period).map_err(failed("meter"))? {
        sites
            .entry(site)
            .or_insert_with(|| Site {
                operator: "local".into(),
                providers: Vec::new(),
                projects: Vec::new(),
            })
            .providers = providers;
    }
    let registry = Registry {
        sites,
        splits: settings.splits.clone(),
        auto_redeem: settings.auto_redeem.clone(),
    };
    let ctx = Context {
        policy: settings.policy.clone().unwrap_or_default(),
        projects: settings.projects.clone(),
        agreements: settings.agreements.clone(),
    };
    let mut cents = Cents { journal: j };
    let closed =
        close_period(&mut cents, &ctx, &registry, period, &usage).map_err(failed("ledger"))?;
    j.book()
        .check()
        .map_err(|e| MoneyError::Failed(format!("ledger invariant broken: {e}")))?;
    Ok(closed)
}
