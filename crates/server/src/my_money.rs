//! "Where my money went": a subscriber's payment of a closed period, as a
//! flow through the general fund and the sites they used to each site's
//! providers, operator and upstream projects — the figures period close
//! stored, summing exactly to what they paid in. API and console page.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use maud::html;
use serde::Deserialize;

use crate::api::Who;
use crate::app::money::{money_of, MoneyFlow};
use crate::sankey::{render, Link, Node};
use crate::web::Params;
use crate::{AppError, AppState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeriodQuery {
    period: Option<String>,
}

/// Where the caller's payment of a closed period went.
#[utoipa::path(get, path = "/api/me/money", tag = "accounts",
    params(("period" = Option<String>, Query, pattern = r"^2[0-9]{3}-(0[1-9]|1[0-2])$",
        description = "`YYYY-MM` [default: the latest closed period]")),
    responses(
        (status = 200, description = "`{period, periods, payments, tokens, shares, flows}`: the tokens allocated at close, per recipient and site, and as flows; `shares` and `flows` each sum to `tokens`", body = Object),
        crate::schema::BadQuery,
        crate::schema::Unauthenticated,
        (status = 403, description = "the platform's administrator has no account", body = crate::schema::Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
pub async fn money_json(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    Params(q): Params<PeriodQuery>,
) -> Result<Response, AppError> {
    Ok(Json(money_of(&state, &who, q.period.as_deref())?).into_response())
}

/// The diagram's nodes and links, from the flows.
fn diagram(money: &MoneyFlow) -> (Vec<Node>, Vec<Link>) {
    let mut nodes: Vec<Node> = Vec::new();
    let index = |label: &str, column: usize, nodes: &mut Vec<Node>| match nodes
        .iter()
        .position(|n| n.label == label && n.column == column)
    {
        Some(i) => i,
        None => {
            nodes.push(Node {
                label: label.to_string(),
                column,
            });
            nodes.len() - 1
        }
    };
    let links = money
        .flows
        .iter()
        .map(|f| Link {
            from: index(&f.from, f.step - 1, &mut nodes),
            to: index(&f.to, f.step, &mut nodes),
            amount: f.amount,
        })
        .collect();
    (nodes, links)
}

fn cents(c: u64) -> String {
    format!("{}.{:02} USD", c / 100, c % 100)
}

/// The console's page: the picture, and every figure in tables.
pub async fn page(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    Params(q): Params<PeriodQuery>,
) -> Response {
    let m = match crate::app::member(&who) {
        Ok(m) => m,
        Err(p) => return crate::console::problem_page(p, None),
    };
    let money = match money_of(&state, &who, q.period.as_deref()) {
        Ok(x) => x,
        Err(p) => return crate::console::problem_page(p, Some(m)),
    };
    let (nodes, links) = diagram(&money);
    let described: Vec<String> = money
        .flows
        .iter()
        .map(|f| format!("{} to {}: {}", f.from, f.to, f.amount))
        .collect();
    crate::console::page(
        &format!("Where your money went, {}", money.period),
        Some(m),
        false,
        html! {
            @if money.periods.len() > 1 {
                nav aria-label="Periods" { "Periods: "
                    @for p in &money.periods {
                        @if *p == money.period { strong { (p) } } @else {
                            a href=(format!("/console/money?period={p}")) { (p) } }
                        " "
                    }
                }
            }
            @if !money.payments.is_empty() {
                h2 { "Your payments" }
                table {
                    tr { th { "Payment" } th { "Paid" } th { "Payment provider's fee" } th { "CommonCents bought" } th { "Refunded" } }
                    @for p in &money.payments {
                        tr { td { (p.payment_id) } td { (cents(p.gross)) } td { (cents(p.fee)) }
                             td { (p.tokens) } td { (cents(p.refunded)) } }
                    }
                }
                p { "The provider's fee never reaches the platform; the rest buys CommonCents at \
                     the reserve's price, held for you until the period closes." }
            }
            @if money.shares.is_empty() {
                p { "Nothing of yours was allocated in " (money.period) ". Your payment is split \
                     when the period closes, by what you used." }
            } @else {
                p { "When " (money.period) " closed, your " strong { (money.tokens) } " CommonCents \
                     were split by the allocation policy: a share to the general fund, the rest \
                     among the sites you used by how much you used each, and each site's share \
                     among its providers, its operator and the projects it is built on." }
                (render(&nodes, &links, &described.join("; ")))
                h2 { "Every figure" }
                table {
                    tr { th { "Recipient" } th { "Through site" } th { "Passed on by" } th { "CommonCents" } }
                    @for s in &money.shares {
                        tr {
                            td { (crate::app::money::label(&s.recipient)) }
                            td { @if s.site.is_empty() { "—" } @else { (s.site) } }
                            td { @if s.via.is_empty() { "—" } @else { "project " (s.via) } }
                            td { (s.amount) }
                        }
                    }
                    tr { th scope="row" colspan="3" { "Total" } td { strong { (money.tokens) } } }
                }
                p { "Each recipient's " a href="/books" { "statement" } " sums these shares of every \
                     subscriber; the statement lines are in the public journal, with proofs." }
            }
        },
    )
}
