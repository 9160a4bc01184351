//! A flow (Sankey) diagram drawn on the server as SVG: no script, so it
//! shows with JavaScript off, and every band carries its figure as a
//! tooltip. Pages put the same figures in a table beside it.
//!
//! Nodes sit in columns, left to right; a node is as tall as the larger of
//! what flows in and what flows out, and bands leave and enter it stacked
//! in the order the links are given.

use maud::{html, Markup};

/// A box in the diagram.
pub struct Node {
    pub label: String,
    pub column: usize,
}

/// `amount` flowing from node `from` to node `to` (indexes into the nodes).
pub struct Link {
    pub from: usize,
    pub to: usize,
    pub amount: u64,
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 420.0;
const GAP: f64 = 14.0;
const BAR: f64 = 10.0;
/// Room for the last column's labels.
const LABEL_ROOM: f64 = 210.0;
const COLOURS: &[&str] = &["#14365d", "#2a6f97", "#468faf", "#61a5c2", "#89c2d9"];

/// The diagram, described by `description` for people who cannot see it.
pub fn render(nodes: &[Node], links: &[Link], description: &str) -> Markup {
    let mut inflow = vec![0u64; nodes.len()];
    let mut outflow = vec![0u64; nodes.len()];
    for l in links {
        outflow[l.from] += l.amount;
        inflow[l.to] += l.amount;
    }
    let value: Vec<u64> = (0..nodes.len())
        .map(|i| inflow[i].max(outflow[i]))
        .collect();
    let columns = nodes.iter().map(|n| n.column + 1).max().unwrap_or(1);
    // One scale for every column: the fullest one fills the height.
    let mut scale = f64::INFINITY;
    for c in 0..columns {
        let in_column: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].column == c).collect();
        let total: u64 = in_column.iter().map(|&i| value[i]).sum();
        if total > 0 {
            let room = HEIGHT - GAP * in_column.len().saturating_sub(1) as f64;
            scale = scale.min(room.max(1.0) / total as f64);
        }
    }
    if !scale.is_finite() {
        scale = 0.0;
    }
    let step = if columns > 1 {
        (WIDTH - LABEL_ROOM - BAR) / (columns - 1) as f64
    } else {
        0.0
    };
    let x = |i: usize| nodes[i].column as f64 * step;
    let mut y = vec![0.0f64; nodes.len()];
    let mut next_y = vec![0.0f64; columns];
    for i in 0..nodes.len() {
        let c = nodes[i].column;
        y[i] = next_y[c];
        next_y[c] += (value[i] as f64 * scale).max(1.0) + GAP;
    }
    let height = next_y.iter().cloned().fold(0.0, f64::max).max(GAP);
    // Bands leave and enter each node stacked, in the order given.
    let (mut out_at, mut in_at) = (y.clone(), y.clone());
    let bands: Vec<(String, &str)> = links
        .iter()
        .map(|l| {
            let thick = (l.amount as f64 * scale).max(0.5);
            let (x0, x1) = (x(l.from) + BAR, x(l.to));
            let (y0, y1) = (out_at[l.from], in_at[l.to]);
            out_at[l.from] += thick;
            in_at[l.to] += thick;
            let mid = (x0 + x1) / 2.0;
            let (y0b, y1b) = (y0 + thick, y1 + thick);
            (
                format!(
                    "M{x0:.1},{y0:.1} C{mid:.1},{y0:.1} {mid:.1},{y1:.1} {x1:.1},{y1:.1} \
                     L{x1:.1},{y1b:.1} C{mid:.1},{y1b:.1} {mid:.1},{y0b:.1} {x0:.1},{y0b:.1} Z"
                ),
                COLOURS[nodes[l.from].column % COLOURS.len()],
            )
        })
        .collect();
    html! {
        svg role="img" aria-label=(description) width="100%" class="flow"
            viewBox=(format!("0 0 {WIDTH} {height:.0}")) {
            @for (l, (d, colour)) in links.iter().zip(&bands) {
                path fill=(colour) fill-opacity="0.35" d=(d) {
                    title { (nodes[l.from].label) " → " (nodes[l.to].label) ": " (l.amount) }
                }
            }
            @for (i, n) in nodes.iter().enumerate() {
                @let h = (value[i] as f64 * scale).max(1.0);
                rect x=(format!("{:.1}", x(i))) y=(format!("{:.1}", y[i])) width=(BAR)
                    height=(format!("{h:.1}")) fill=(COLOURS[n.column % COLOURS.len()]) {
                    title { (n.label) ": " (value[i]) }
                }
                text x=(format!("{:.1}", x(i) + BAR + 4.0)) y=(format!("{:.1}", y[i] + h / 2.0 + 4.0))
                    font-size="12" paint-order="stroke" stroke="#fff" stroke-width="3" {
                    (n.label) " " tspan font-weight="bold" { (value[i]) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_carry_their_figures_and_nodes_their_totals() {
        let nodes = vec![
            Node {
                label: "You".into(),
                column: 0,
            },
            Node {
                label: "fund".into(),
                column: 1,
            },
            Node {
                label: "site wiki".into(),
                column: 1,
            },
            Node {
                label: "operator acme".into(),
                column: 2,
            },
        ];
        let links = vec![
            Link {
                from: 0,
                to: 1,
                amount: 47,
            },
            Link {
                from: 0,
                to: 2,
                amount: 423,
            },
            Link {
                from: 2,
                to: 3,
                amount: 423,
            },
        ];
        let svg = render(&nodes, &links, "470 tokens").into_string();
        assert!(svg.contains("You → site wiki: 423"), "{svg}");
        assert!(svg.contains("<title>You: 470</title>"), "{svg}");
        assert!(svg.contains(r#"aria-label="470 tokens""#));
        assert_eq!(svg.matches("<path").count(), 3);
    }
}
