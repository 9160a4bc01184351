#!/usr/bin/env bash
# Two builds of the gateway against each other, to tell a change in the
# code from the machine's drift (its speed moves by 15-20 % between runs):
#
#   bash bench/gateway-ab.sh OLD_BINARY NEW_BINARY     # e.g. a release build of main and of a branch
#
# The same set-up as bench/gateway.sh at 16 connections (proxy on CPU 0,
# an nginx backend and wrk on CPU 1, a signed-in user, a usage record per
# request), one `commons serve` at a time, the two taking turns REPS times;
# prints each pair's req/s and CPU µs per request. Everything listens on
# 127.0.0.1.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: bash bench/gateway-ab.sh OLD_BINARY NEW_BINARY" >&2; exit 2; }
OLD=$(realpath "$1"); NEW=$(realpath "$2"); REPS=${REPS:-5}; DURATION=${DURATION:-10}
NGINX=$(PATH="$PATH:/usr/sbin" command -v nginx) || { echo "needs nginx (apt-get install nginx-light wrk)" >&2; exit 1; }
work=$(mktemp -d); export COMMONS_HOME="$work/home" COMMONS_DAEMON=off COMMONS_SANDBOX=0
ulimit -n "$(ulimit -Hn)"
hz=$(getconf CLK_TCK)
cd "$(dirname "$0")/.."
source bench/gateway-backend.sh
deploy_backend "$NEW" "$work" "$NGINX" >/dev/null
token=$("$NEW" token create bench-user --scope session 2>/dev/null)
trap '"$NEW" destroy bench >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
measure() {
  local B=$1
  COMMONS_IDLE_AFTER= taskset -c 0 "$B" serve --listen 127.0.0.1:0 --http 127.0.0.1:18183 --https off --admin 127.0.0.1:18184 --gateway-threads 1 2>"$work/serve.log" &
  local pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null -H "Host: bench.localhost" http://127.0.0.1:18183/ && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c16 -d2s -H "Host: bench.localhost" -H "Cookie: commons_session=$token" http://127.0.0.1:18183/ >/dev/null
  local c0=$(awk '{print $14 + $15}' /proc/$pid/stat)
  local out=$(taskset -c 1 wrk -t1 -c16 -d${DURATION}s -H "Host: bench.localhost" -H "Cookie: commons_session=$token" http://127.0.0.1:18183/)
  local c1=$(awk '{print $14 + $15}' /proc/$pid/stat)
  kill $pid; wait $pid 2>/dev/null || true
  local n=$(grep -oE "[0-9]+ requests in" <<<"$out" | awk '{print $1}')
  python3 -c "print(round($n/$DURATION), round(($c1-$c0)*1e6/$hz/$n,1))"
}
echo "req/s and CPU µs per request, 16 connections, ${DURATION}s runs taking turns:"
: > "$work/ratios"
for _ in $(seq "$REPS"); do
  o=$(measure "$OLD"); n=$(measure "$NEW")
  echo "  old $o   new $n"
  python3 -c "print(${n%% *} / ${o%% *})" >> "$work/ratios"
done
python3 -c "import statistics; r=[float(l) for l in open('$work/ratios')]; print('  new/old req/s: median %.2f (pairs %.2f-%.2f)' % (statistics.median(r), min(r), max(r)))"
