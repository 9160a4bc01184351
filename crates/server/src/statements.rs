//! Recipients' statements, public like the journal their lines are
//! committed in: what an operator, provider, project or the general fund
//! received per period, from which sites, under which policy version; how
//! it splits among its members; as a page with a chart, as CSV, as JSON,
//! and each line's proof of inclusion in the signed journal.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::html;
use serde::Deserialize;

use crate::app::money::{proofs, statement_of, RecipientStatement};
use crate::web::Params;
use crate::{AppError, AppState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementQuery {
    /// `operator:ID`, `provider:ID`, `project:ID` or `general-fund`.
    recipient: String,
    /// `csv` for the lines as CSV.
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientQuery {
    recipient: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofQuery {
    recipient: String,
    period: Option<String>,
}

/// A recipient's statement.
#[utoipa::path(get, path = "/api/books/statement", tag = "platform",
    params(("recipient" = String, Query, pattern = r"^(general-fund|(operator|provider|project):.+)$", description = "`operator:ID`, `provider:ID`, `project:ID` or `general-fund`")),
    responses(
        (status = 200, description = "`{recipient, account, lines: [{period, site, subscribers, amount, policy_version}], totals, holds, members, redeems_to_cash}`", body = Object),
        crate::schema::BadQuery,
        (status = 422, description = "the name is no recipient", body = crate::schema::Problem, content_type = "application/problem+json"),
    ))]
pub async fn statement_json(
    State(state): State<Arc<AppState>>,
    Params(q): Params<RecipientQuery>,
) -> Result<Response, AppError> {
    Ok(Json(statement_of(&state, &q.recipient)?).into_response())
}

/// Proofs that the signed journal holds a recipient's statement lines;
/// `commons ledger verify FILE --key KEY` checks them.
#[utoipa::path(get, path = "/api/books/proof", tag = "platform",
    params(("recipient" = String, Query, pattern = r"^(general-fund|(operator|provider|project):.+)$", description = "`operator:ID`, `provider:ID`, `project:ID` or `general-fund`"),
        ("period" = Option<String>, Query, pattern = r"^2[0-9]{3}-(0[1-9]|1[0-2])$", description = "only this period")),
    responses(
        (status = 200, description = "`[{format, entry, index, path, checkpoint}]`: each line's exact journal entry, its audit path and the signed checkpoint it is in", body = [Object]),
        crate::schema::BadQuery,
        (status = 422, description = "the name is no recipient", body = crate::schema::Problem, content_type = "application/problem+json"),
    ))]
pub async fn proof_json(
    State(state): State<Arc<AppState>>,
    Params(q): Params<ProofQuery>,
) -> Result<Response, AppError> {
    Ok(Json(proofs(&state, &q.recipient, q.period.as_deref())?).into_response())
}

/// The lines as CSV, one per period, site and policy version.
pub fn csv(s: &RecipientStatement) -> String {
    let mut out = String::from("period,recipient,site,subscribers,tokens,policy_version\n");
    for l in &s.lines {
        out.push_str(&format!(
            "{},{},{},{},{},{}\n",
            l.period,
            field(&s.recipient),
            field(&l.site),
            l.subscribers,
            l.amount,
            l.policy_version
        ));
    }
    out
}

/// A CSV field (RFC 4180), defused for spreadsheets: a leading `=`, `+`,
/// `-` or `@` is a formula there, so it is quoted behind an apostrophe.
fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) || s.starts_with('\'') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The page (or, with `format=csv`, the CSV file).
pub async fn page(
    State(state): State<Arc<AppState>>,
    Params(q): Params<StatementQuery>,
) -> Response {
    let s = match statement_of(&state, &q.recipient) {
        Ok(s) => s,
        Err(p) => return crate::console::problem_page(p, None),
    };
    match q.format.as_deref() {
        None | Some("html") => {}
        Some("csv") => {
            let name: String = s
                .recipient
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            return (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"statement-{name}.csv\""),
                    ),
                ],
                csv(&s),
            )
                .into_response();
        }
        Some(other) => {
            return crate::console::problem_page(
                AppError::new(
                    crate::error::ErrorKind::Malformed,
                    "Invalid query",
                    format!(
                        "format \"{other}\" is not offered; use csv, or leave it out for the page"
                    ),
                ),
                None,
            )
        }
    }
    let most = s.totals.iter().map(|(_, t)| *t).max().unwrap_or(0).max(1);
    let (bar, height) = (40usize, 140usize);
    let width = (s.totals.len() * (bar + 16)).max(bar + 16);
    let described: Vec<String> = s
        .totals
        .iter()
        .map(|(p, t)| format!("{p}: {t} CommonCents"))
        .collect();
    let query = url_query(&s.recipient);
    crate::console::page(
        &format!("Statement of {}", s.recipient),
        None,
        false,
        html! {
            p { (s.recipient) " holds " strong { (s.holds) } " CommonCents now"
                @if s.redeems_to_cash { ", and is paid out in cash at every close" } "." }
            @if s.lines.is_empty() {
                p { "Nothing received yet." }
            } @else {
                h2 { "Received per period" }
                svg role="img" aria-label=(described.join("; ")) width=(width) height=(height + 20)
                    viewBox=(format!("0 0 {width} {}", height + 20)) {
                    @for (i, (p, t)) in s.totals.iter().enumerate() {
                        @let h = (*t as f64 / most as f64 * height as f64).round().max(1.0) as usize;
                        rect x=(i * (bar + 16)) y=(height - h) width=(bar) height=(h) fill="#14365d" {
                            title { (p) ": " (t) " CommonCents" }
                        }
                        text x=(i * (bar + 16)) y=(height + 14) font-size="11" { (p) }
                    }
                }
                h2 { "Lines" }
                table {
                    tr { th { "Period" } th { "Site" } th { "Subscribers" } th { "CommonCents" } th { "Policy" } }
                    @for l in &s.lines {
                        tr {
                            td { (l.period) }
                            td { @if l.site.is_empty() { "(general fund)" } @else { (l.site) } }
                            td { (l.subscribers) } td { (l.amount) } td { "v" (l.policy_version) }
                        }
                    }
                }
                p {
                    a href=(format!("/books/statement?{query}&format=csv")) download { "Download as CSV" }
                    " · "
                    a href=(format!("/api/books/proof?{query}")) { "Proofs of inclusion" }
                    " — check them with " code { "commons ledger verify proofs.json --key KEY" }
                }
            }
            @if let Some(m) = &s.members {
                h2 { "Member split" }
                p { "What it receives is split among its members at every close: fixed amounts \
                     first, the rest by weight." }
                table {
                    tr { th { "Member" } th { "Fixed" } th { "Weight" } }
                    @for (who, amount) in &m.fixed { tr { td { (who) } td { (amount) } td { "—" } } }
                    @for (who, weight) in &m.shares { tr { td { (who) } td { "—" } td { (weight) } } }
                }
            }
        },
    )
}

/// `recipient=...`, percent-encoded.
pub(crate) fn url_query(recipient: &str) -> String {
    let mut out = String::from("recipient=");
    for b in recipient.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(field("wiki"), "wiki");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("=HYPERLINK(1)"), "\"'=HYPERLINK(1)\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
