#!/usr/bin/env bash
# Milestone-3 figures: metering ingest, ledger transfers (SQLite and
# PostgreSQL), period close. Targets (issue #6): ingest >= 100k events/s,
# ledger >= 50k transfers/s, period close of 100,000 subscribers x 10 sites
# <= 30 s. PostgreSQL: COMMONS_BENCH_POSTGRES (default
# "host=127.0.0.1 user=postgres dbname=test"); everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -p commons-meter --example meter_bench
cargo run --release --quiet -p commons-ledger --example ledger_bench
