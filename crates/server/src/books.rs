//! The open books: what anyone, signed in or not, may see of the ledger —
//! the reserve, the tokens outstanding and their price, what each kind of
//! recipient holds, the journal's latest signed checkpoint, the custodian's
//! public key, and the whole journal as an export that `commons ledger
//! verify` checks offline. Subscribers are counted, never named.

use crate::error::ErrorKind;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use commons_ledger::journal::{load_or_create_key, Checkpoint};
use maud::html;
use serde::Serialize;

use crate::{AppError, AppState};

/// The ledger as the public sees it.
#[derive(Debug, Serialize)]
pub struct Books {
    /// Cash held in the reserve, in cents.
    pub reserve_cents: u64,
    /// CommonCents in circulation.
    pub tokens_outstanding: u64,
    /// What one token is worth, in cents: reserve ÷ tokens outstanding
    /// (`null` before any token exists).
    pub price_cents: Option<f64>,
    /// Tokens held, by kind of holder (subscribers' escrow summed).
    pub holdings: Vec<Holding>,
    /// Named recipients (operators, providers, projects, the general fund)
    /// and what each holds.
    pub recipients: Vec<Holding>,
    /// Subscribers' escrow accounts, counted.
    pub subscribers: usize,
    /// Entries in the journal now.
    pub journal_entries: u64,
    /// The latest signed tree head, if any.
    pub checkpoint: Option<Checkpoint>,
    /// The custodian's key the checkpoints are signed with (hex), once the
    /// ledger has one.
    pub custodian_key: Option<String>,
    /// The allocation policy the next close applies.
    pub policy: commons_ledger::allocation::Policy,
    /// What every closed period allocated, by kind of recipient.
    pub periods: Vec<crate::app::money::PeriodTotals>,
    /// Every close, oldest first, as the journal records it: the policy it
    /// applied, the reserve and the tokens outstanding after it.
    pub closes: Vec<commons_ledger::PeriodClosed>,
}

/// Tokens held by one holder or kind of holder.
#[derive(Debug, Serialize)]
pub struct Holding {
    pub name: String,
    pub tokens: u64,
}

/// The kinds of holders, in the order the page shows them: (account
/// prefix, label).
const KINDS: &[(&str, &str)] = &[
    ("tokens:escrow:", "Subscribers' escrow"),
    ("tokens:general-fund", "General fund"),
    ("tokens:operator:", "Operators"),
    ("tokens:provider:", "Providers"),
    ("tokens:project:", "Projects"),
    ("tokens:fees", "Payment fees"),
];

/// Reads the books from the journal.
pub fn read(state: &AppState) -> Result<Books, AppError> {
    let mut journal = state.journal.lock().expect("journal lock");
    // What other writers (the CLI) appended shows too.
    journal.catch_up().map_err(ledger_failed)?;
    let key_path = state.engine.layout.custodian_key();
    // Another instance sharing the database may have signed the checkpoints.
    if let Err(e) =
        crate::keys::fetch_shared(&state.engine, crate::app::money::CUSTODIAN, &key_path)
    {
        tracing::warn!(error = %e, "cannot read the shared custodian key");
    }
    let custodian_key = key_path
        .exists()
        .then(|| load_or_create_key(&key_path).ok())
        .flatten()
        .map(|k| commons_ledger::hex::encode(k.verifying_key().as_bytes()));
    let checkpoint = journal
        .checkpoints()
        .map_err(ledger_failed)?
        .into_iter()
        .last();
    let journal_entries = journal.tree().len();
    let cents = commons_ledger::cents::Cents {
        journal: &mut journal,
    };
    let (reserve_cents, tokens_outstanding) = (cents.reserve(), cents.outstanding());
    let mut holdings: Vec<Holding> = KINDS
        .iter()
        .map(|(_, label)| Holding {
            name: label.to_string(),
            tokens: 0,
        })
        .collect();
    let mut recipients = Vec::new();
    let mut subscribers = 0;
    for (account, balance) in journal.book().accounts() {
        let Some(kind) = KINDS.iter().position(|(p, _)| account.name.starts_with(p)) else {
            continue;
        };
        let tokens = balance.net_credit().max(0) as u64;
        holdings[kind].tokens += tokens;
        if kind == 0 {
            subscribers += 1;
        } else {
            recipients.push(Holding {
                name: account
                    .name
                    .strip_prefix("tokens:")
                    .unwrap_or(&account.name)
                    .to_string(),
                tokens,
            });
        }
    }
    recipients.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(a.name.cmp(&b.name)));
    let closes = journal.closes().map_err(ledger_failed)?;
    drop(journal);
    let policy = crate::periods::MoneySettings::load(&state.home)
        .map_err(ledger_failed)?
        .policy
        .unwrap_or_default();
    let periods = crate::app::money::period_totals(state)?;
    Ok(Books {
        policy,
        periods,
        closes,
        reserve_cents,
        tokens_outstanding,
        price_cents: (tokens_outstanding > 0)
            .then(|| reserve_cents as f64 / tokens_outstanding as f64),
        holdings,
        recipients,
        subscribers,
        journal_entries,
        checkpoint,
        custodian_key,
    })
}

fn ledger_failed(e: impl std::fmt::Display) -> AppError {
    AppError::new(ErrorKind::Internal, "Ledger unavailable", e.to_string())
}

/// The open books, as data.
#[utoipa::path(get, path = "/api/books", tag = "platform",
    responses((status = 200, description = "`{reserve_cents, tokens_outstanding, price_cents, holdings, recipients, subscribers, journal_entries, checkpoint, custodian_key}`: the ledger as anyone may see it", body = Object)))]
pub async fn books_json(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    Ok(Json(read(&state)?).into_response())
}

/// The whole journal with a signed checkpoint covering it, as `commons
/// ledger verify FILE --key KEY` checks it.
#[utoipa::path(get, path = "/api/books/export", tag = "platform",
    responses((status = 200, description = "the journal's export: every entry and signed checkpoint, one JSON document per line", body = String, content_type = "application/jsonl")))]
pub async fn export(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    let mut journal = state.journal.lock().expect("journal lock");
    // Entries other writers (the CLI) appended are in the export: cover them.
    journal.catch_up().map_err(ledger_failed)?;
    crate::app::money::covering_checkpoint(&state, &mut journal)?;
    let made_of = (
        journal.tree().len(),
        journal.checkpoints().map_err(ledger_failed)?.len(),
    );
    let mut cache = state.books_export.lock().expect("export cache lock");
    let text = match cache.as_ref() {
        Some((of, bytes)) if *of == made_of => bytes.clone(),
        _ => {
            let text = commons_ledger::export::export(&mut journal).map_err(ledger_failed)?;
            let bytes = axum::body::Bytes::from(text);
            *cache = Some((made_of, bytes.clone()));
            bytes
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/jsonl"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"ledger.export\"",
            ),
        ],
        text,
    )
        .into_response())
}

/// Cents a token was worth after a close.
fn price(c: &commons_ledger::PeriodClosed) -> f64 {
    c.reserve_cents as f64 / c.tokens_outstanding.max(1) as f64
}

/// Each policy the closes applied, with the periods it applied to, in order.
fn policy_history(
    closes: &[commons_ledger::PeriodClosed],
) -> Vec<(&commons_ledger::allocation::Policy, Vec<&str>)> {
    let mut out: Vec<(&commons_ledger::allocation::Policy, Vec<&str>)> = Vec::new();
    for c in closes {
        match out.last_mut() {
            Some((p, periods)) if **p == c.policy => periods.push(&c.period),
            _ => out.push((&c.policy, vec![&c.period])),
        }
    }
    out
}

/// The price after each close, as a line over the periods.
fn price_chart(closes: &[commons_ledger::PeriodClosed]) -> maud::Markup {
    let (width, height, pad) = (640.0, 160.0, 24.0);
    let prices: Vec<f64> = closes.iter().map(price).collect();
    let top = prices
        .iter()
        .cloned()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.1;
    let step = if closes.len() > 1 {
        (width - 2.0 * pad) / (closes.len() - 1) as f64
    } else {
        0.0
    };
    let points: Vec<(f64, f64)> = prices
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                pad + i as f64 * step,
                height - pad - p / top * (height - 2.0 * pad),
            )
        })
        .collect();
    let line: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let described: Vec<String> = closes
        .iter()
        .zip(&prices)
        .map(|(c, p)| format!("{}: {p:.4} cents a token", c.period))
        .collect();
    html! {
        svg role="img" aria-label=(format!("Price of a token after each close: {}", described.join("; ")))
            width="100%" viewBox=(format!("0 0 {width} {height}")) {
            polyline points=(line.join(" ")) fill="none" stroke="#14365d" stroke-width="2" {}
            @for ((x, y), (c, p)) in points.iter().zip(closes.iter().zip(&prices)) {
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="4" fill="#14365d" {
                    title { (c.period) ": " (format!("{p:.4}")) " cents a token" }
                }
                text x=(format!("{x:.1}")) y=(height - 6.0) font-size="11" text-anchor="middle" { (c.period) }
            }
        }
    }
}

/// Basis points as a percentage.
fn bps(b: u32) -> String {
    format!("{}.{:02} %", b / 100, b % 100)
}

/// Formats cents as dollars.
fn dollars(cents: u64) -> String {
    format!("{}.{:02} USD", cents / 100, cents % 100)
}

/// The open books, for people: no log-in needed.
pub async fn page(State(state): State<Arc<AppState>>) -> Response {
    let books = match read(&state) {
        Ok(b) => b,
        Err(p) => return crate::console::problem_page(p, None),
    };
    let widest = books
        .holdings
        .iter()
        .map(|h| h.tokens)
        .max()
        .unwrap_or(0)
        .max(1);
    let bar_height = 28;
    let chart_height = books.holdings.len() * bar_height + 8;
    let description: Vec<String> = books
        .holdings
        .iter()
        .map(|h| format!("{}: {} tokens", h.name, h.tokens))
        .collect();
    crate::console::page(
        "Open books",
        None,
        false,
        html! {
            p { "Every payment, allocation and redemption of OneCommons is a transfer in a \
                 public, append-only journal. Anyone can download it and check it." }
            h2 { "CommonCents" }
            table {
                tr { th scope="row" { "Reserve" } td { (dollars(books.reserve_cents)) } }
                tr { th scope="row" { "Tokens outstanding" } td { (books.tokens_outstanding) } }
                tr {
                    th scope="row" { "Price of a token" }
                    td { @match books.price_cents {
                        Some(p) => { (format!("{p:.4} cents")) " (reserve ÷ tokens outstanding)" },
                        None => { "no tokens yet" },
                    } }
                }
                tr { th scope="row" { "Subscribers" } td { (books.subscribers) } }
            }
            h2 { "Who holds the tokens" }
            p { "Bars on a logarithmic scale; the table below gives every figure." }
            svg role="img" aria-label=(description.join("; ")) width="100%"
                viewBox=(format!("0 0 640 {chart_height}")) {
                @for (i, h) in books.holdings.iter().enumerate() {
                    @let y = i * bar_height + 4;
                    // A log scale: the bootstrap's tokens would flatten the rest.
                    @let width = ((h.tokens as f64).ln_1p() / (widest as f64).ln_1p() * 380.0).round() as u64;
                    text x="0" y=(y + 18) font-size="14" { (h.name) }
                    rect x="190" y=(y) width=(width.max(1)) height="20" fill="#14365d" {
                        title { (h.name) ": " (h.tokens) " tokens" }
                    }
                    text x=(196 + width) y=(y + 15) font-size="13" { (h.tokens) }
                }
            }
            table {
                tr { th { "Holder" } th { "Tokens" } }
                @for h in &books.recipients {
                    tr { td {
                        @if h.name.contains(":member:") || h.name == "fees" { (h.name) } @else {
                            a href=(format!("/books/statement?{}", crate::statements::url_query(&h.name))) { (h.name) }
                        }
                    } td { (h.tokens) } }
                }
            }
            h2 { "Periods" }
            @if books.periods.is_empty() {
                p { "Nothing paid or closed yet." }
            } @else {
                p { "What subscribers paid in each period (in dollars), and what its close allocated \
                     (in CommonCents)." }
                table {
                    tr { th { "Period" } th { "Paid" } th { "Payment fees" } th { "Refunded" }
                         th { "Allocated" } th { "General fund" } th { "Providers" }
                         th { "Operators" } th { "Projects" } th { "Recipients" } }
                    @for t in &books.periods {
                        tr { td { (t.period) } td { (dollars(t.paid_cents)) } td { (dollars(t.fees_cents)) }
                             td { (dollars(t.refunded_cents)) } td { (t.allocated) } td { (t.general_fund) }
                             td { (t.providers) } td { (t.operators) } td { (t.projects) } td { (t.recipients) } }
                    }
                }
            }
            @if !books.closes.is_empty() {
                h2 { "CommonCents over time" }
                (price_chart(&books.closes))
                table {
                    tr { th { "Closed" } th { "Price (cents a token)" } th { "Reserve" } th { "Tokens out" }
                         th { "Subscribers" } th { "Allocated" } th { "Policy" } }
                    @for c in &books.closes {
                        tr { td { (c.period) } td { (format!("{:.4}", price(c))) } td { (dollars(c.reserve_cents)) }
                             td { (c.tokens_outstanding) } td { (c.subscribers) } td { (c.tokens_allocated) }
                             td { "v" (c.policy.version) } }
                    }
                }
            }
            h2 { "The allocation policy" }
            @let p = &books.policy;
            p { "Version " (p.version) ", applied at the next close. Statements name the version each line was allocated under." }
            table {
                tr { th scope="row" { "General fund" } td { (bps(p.general_fund_bps)) " of each payment" } }
                tr { th scope="row" { "Providers" } td { (bps(p.providers_bps)) " of each site's part" } }
                tr { th scope="row" { "Projects, at least" } td { (bps(p.projects_min_bps)) " of the operator's part" } }
                tr { th scope="row" { "A project keeps, at least" } td { (bps(p.project_keep_min_bps)) " of what it receives" } }
                tr { th scope="row" { "Upstream levels" } td { (p.max_depth) } }
            }
            @let history = policy_history(&books.closes);
            @if history.len() > 1 || history.first().is_some_and(|(v, _)| v.version != p.version) {
                h3 { "Versions applied so far" }
                table {
                    tr { th { "Version" } th { "Closes" } th { "Fund" } th { "Providers" } th { "Projects, at least" }
                         th { "Project keeps" } th { "Levels" } }
                    @for (v, periods) in &history {
                        tr { td { "v" (v.version) } td { (periods.join(", ")) } td { (bps(v.general_fund_bps)) }
                             td { (bps(v.providers_bps)) } td { (bps(v.projects_min_bps)) }
                             td { (bps(v.project_keep_min_bps)) } td { (v.max_depth) } }
                    }
                }
            }
            h2 { "The journal" }
            p { (books.journal_entries) " entries." }
            @match &books.checkpoint {
                Some(c) => {
                    p { "Latest signed checkpoint: " (c.tree_size) " entries, root "
                        code { (c.root) } "." }
                },
                None => { p { "No checkpoint signed yet." } },
            }
            @if let Some(k) = &books.custodian_key {
                p { "Custodian's key: " code { (k) } }
            }
            p {
                a href="/api/books/export" { "Download the journal" }
                " and check it yourself: "
                code { "commons ledger verify ledger.export --key KEY" }
            }
        },
    )
}
