#!/usr/bin/env bash
# Milestone 4's figures on the embedded default (SQLite), pinned to one core:
# record writes (private class: schema validation, sealing, the signed
# Merkle-search-tree commit), reads, grant checks, feed fan-out and live
# latency, export and erase of a user with RECORDS records (default 100,000).
# No peer runs here (a Bluesky PDS, Jetstream and the Community Solid
# Server are not packaged), so their published figures are printed beside
# ours as ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
records="${1:-100000}"
cargo build --release --locked --quiet -p commons-data --example data_bench
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
taskset -c 0 target/release/examples/data_bench "$dir/data" "$records"
