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

# Image sites (as root, with runc, docker-registry and busybox-static): an
# image built from a static busybox is pushed to a registry on loopback;
# deploy to healthy of a sandboxed image site with the image already in the
# store (20 times, each a new site: its network, bundle and container), and
# the store's disk use with one and with two sites from the same image.
if [ "$(id -u)" = 0 ] && command -v runc >/dev/null && command -v docker-registry >/dev/null && [ -x /bin/busybox ]; then
  reg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$work/registry"
  printf 'version: 0.1\nlog: { level: warn }\nstorage:\n  filesystem: { rootdirectory: %s }\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/registry" "$reg_port" > "$work/registry.yml"
  docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
  reg_pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$reg_port/v2/" && break; sleep 0.05; done
  python3 bench/oci-image.py "127.0.0.1:$reg_port" apps/www:1 >/dev/null
  export COMMONS_INSECURE_REGISTRIES="127.0.0.1:$reg_port"
  site() {
    mkdir -p "$work/$1"
    printf 'name: %s\ncomponents:\n  web:\n    image: 127.0.0.1:%s/apps/www:1\n    port: 8080\n    health: { http: "/", interval: 10ms }\n' \
      "$1" "$reg_port" > "$work/$1/commons.yaml"
  }
  site img
  t0=$(now); COMMONS_SANDBOX=1 "$B" deploy "$work/img" >/dev/null 2>&1; t1=$(now)
  echo "image site, first deploy (pulls the image): $(( (t1 - t0) / 1000000 )) ms"
  one=$(du -sk "$COMMONS_HOME/images" | cut -f1)
  site img2
  COMMONS_SANDBOX=1 "$B" deploy "$work/img2" >/dev/null 2>&1
  two=$(du -sk "$COMMONS_HOME/images" | cut -f1)
  echo "image store on disk: ${one} KiB with one site, ${two} KiB with two sites from the same image"
  COMMONS_SANDBOX=1 "$B" destroy img >/dev/null 2>&1; COMMONS_SANDBOX=1 "$B" destroy img2 >/dev/null 2>&1
  itimes=()
  for _ in $(seq 20); do
    t0=$(now); COMMONS_SANDBOX=1 "$B" deploy "$work/img" >/dev/null 2>&1; t1=$(now)
    itimes+=($(( (t1 - t0) / 1000000 )))
    COMMONS_SANDBOX=1 "$B" destroy img >/dev/null 2>&1
  done
  sorted=$(printf '%s\n' "${itimes[@]}" | sort -n)
  echo "image site deploy to healthy, image cached (20 new sites): p50 $(sed -n 10p <<<"$sorted") ms, p95 $(sed -n 19p <<<"$sorted") ms (target p95 <= 1000 ms; Fly machine start ~300 ms)"
  kill "$reg_pid" 2>/dev/null || true
else
  echo "(image sites need root, runc, docker-registry and busybox-static: skipped)"
fi
