#!/usr/bin/env bash
# Runtime figures (issue #3): deploy-to-healthy for a trivial process,
# supervisor memory with 100 idle workloads, restart latency after a crash.
#
#   bash bench/runtime.sh
#
# Everything listens on 127.0.0.1; the workloads are `sleep` and Python's
# http.server.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p commons-cli
B="$PWD/target/release/commons"
work=$(mktemp -d)
export COMMONS_HOME="$work/home"
# The bench starts `commons serve` itself, where and when it measures it.
export COMMONS_DAEMON=off
# Unsandboxed, as the README's figures (as root the default is the sandbox).
export COMMONS_SANDBOX=${COMMONS_SANDBOX:-0}
serve_pid=""
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  for d in $("$B" list --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(d["name"] for d in json.load(sys.stdin)))'); do
    "$B" destroy "$d" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s%N; }

mkdir -p "$work/web" "$work/idle"
cat > "$work/web/commons.yaml" <<'YAML'
name: web
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/", interval: 10ms }
YAML
times=()
for _ in 1 2 3 4 5; do
  t0=$(now); "$B" deploy "$work/web" >/dev/null 2>&1; t1=$(now)
  times+=($(( (t1 - t0) / 1000000 )))
  "$B" destroy web >/dev/null 2>&1
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
echo "deploy to healthy, python http.server (median of 5): ${median} ms"

python3 - "$work/idle/commons.yaml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("name: idle\ncomponents:\n")
    for i in range(100):
        f.write(f"  w{i}: {{ process: \"sleep 100000\" }}\n")
PY
t0=$(now); "$B" deploy "$work/idle" >/dev/null 2>&1; t1=$(now)
echo "deploy 100 idle processes: $(( (t1 - t0) / 1000000 )) ms"
"$B" serve --listen 127.0.0.1:0 --http 127.0.0.1:0 --https 127.0.0.1:0 --admin 127.0.0.1:0 2>"$work/serve.log" &
serve_pid=$!
sleep 6
rss=$(awk '/VmRSS/ {print $2}' /proc/$serve_pid/status)
cpu0=$(awk '{print $14 + $15}' /proc/$serve_pid/stat); sleep 5; cpu1=$(awk '{print $14 + $15}' /proc/$serve_pid/stat)
hz=$(getconf CLK_TCK)
echo "commons serve supervising 100 idle workloads: ${rss} KiB resident, $(( (cpu1 - cpu0) * 1000 / hz / 5 )) ms CPU per second"

lat=()
for i in 1 2 3 4 5; do
  pid=$("$B" status idle --json | python3 -c "import json,sys; print([c for c in json.load(sys.stdin)['components'] if c['name']=='w$i'][0]['pid'])")
  t0=$(now); kill -9 "$pid"
  while :; do
    state=$("$B" status idle --json | python3 -c "import json,sys; c=[c for c in json.load(sys.stdin)['components'] if c['name']=='w$i'][0]; print(c['state'], c.get('pid'))")
    [ "${state%% *}" = running ] && [ "${state##* }" != "$pid" ] && break
    sleep 0.02
  done
  t1=$(now); lat+=($(( (t1 - t0) / 1000000 )))
done
echo "restart after kill -9 (median of 5): $(printf '%s\n' "${lat[@]}" | sort -n | sed -n 3p) ms (the supervisor looks four times a second)"
