#!/usr/bin/env bash
# Scale-out figures (issue 18), on this machine with PostgreSQL and a NATS
# JetStream server on loopback (started here):
# - usage end to end: 3 gateways publishing batches of CloudEvents to
#   JetStream, the meter taking them exactly once into PostgreSQL, at 1k,
#   10k and 50k sites (target >= 100,000 events/s), and a longer run at
#   50k sites (LONG events, default 3,000,000) with the totals' folds
#   running alongside;
# - the meter's own ingest on PostgreSQL and on SQLite, beside it;
# - the ledger on PostgreSQL (target >= 50,000 transfers/s);
# - a route change seen by 3 gateways following the routes' bucket, at 1k,
#   10k and 50k sites (target p99 <= 1 s).
# - mutating API calls with 3 control-plane instances and 1,000 simulated
#   nodes, at 1k, 10k and 50k sites (`bench/control-planes.py`; target
#   p99 <= 1 s).
# PostgreSQL: COMMONS_BENCH_POSTGRES (default
# "host=127.0.0.1 user=postgres dbname=test"). EVENTS (default 600000);
# WORKERS: the meter's takers (default: as many as an instance runs).
set -euo pipefail
cd "$(dirname "$0")/.."
pg="${COMMONS_BENCH_POSTGRES:-host=127.0.0.1 user=postgres dbname=test}"
events="${EVENTS:-600000}"
long="${LONG:-3000000}"
cargo build --release --quiet -p commons-bus --example usage_bench
cargo build --release --quiet -p commons-meter --example meter_bench
cargo build --release --quiet -p commons-ledger --example ledger_bench
cargo build --release --quiet -p commons-bus --example routes_bench
cargo build --release --quiet --locked -p commons-cli

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
nats-server -js -a 127.0.0.1 -p "$port" -sd "$dir" >"$dir/log" 2>&1 &
nats=$!
trap 'kill $nats 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do grep -q "Server is ready" "$dir/log" && break; sleep 0.1; done

for sites in 1000 10000 50000; do
  target/release/examples/usage_bench "nats://127.0.0.1:$port" "$events" "$sites" "$pg"
done
target/release/examples/usage_bench "nats://127.0.0.1:$port" "$long" 50000 "$pg"
target/release/examples/usage_bench "nats://127.0.0.1:$port" "$events" 1000
COMMONS_BENCH_POSTGRES="$pg" target/release/examples/meter_bench
COMMONS_BENCH_POSTGRES="$pg" target/release/examples/ledger_bench
for sites in 1000 10000 50000; do
  target/release/examples/routes_bench "nats://127.0.0.1:$port" "$sites" 100
done
COMMONS_BENCH_POSTGRES="$pg" python3 bench/control-planes.py target/release/commons
