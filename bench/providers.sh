#!/usr/bin/env bash
# Milestone 5's figures on one machine:
# - placement among 1,000 nodes (a decision's p50/p99, placements per second
#   committed through the cluster's lock). No peer scheduler runs here
#   (Nomad is not packaged), so its published figure is printed beside ours;
# - with real agents (`bench/agents.py`, release build): node join to ready,
#   a stateless site's move seen through the gateway, a site with SQLite data
#   moved under continuous writes, a node killed with kill -9 detected lost.
#   `--data-mb N` sets the moved site's SQLite size (default 64 MiB);
#   a site with `--pg-mb M` (default 256) in PostgreSQL moved by its changes,
#   its pause beside a dump and load of the same database.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --quiet -p commons-server --bench placement 2>/dev/null | grep placement
cargo build --release --locked --quiet -p commons-cli
python3 bench/agents.py target/release/commons "$@"
