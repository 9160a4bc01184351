#!/usr/bin/env bash
# Gateway figures (issue #4), against nginx in the same run:
#
#   bash bench/gateway.sh            # needs nginx and wrk: apt-get install nginx-light wrk
#   PARTS="memory tls" bash bench/gateway.sh   # some parts only
#
# Set-up (2 vCPU): the proxy under test is pinned to CPU 0; the backend (an
# nginx worker answering 200 from memory, deployed as a site so the gateway
# routes to it) and wrk are pinned to CPU 1. nginx is a fair keep-alive
# reverse proxy: 1 worker, proxy_http_version 1.1, upstream keepalive 128,
# access log on, buffered (64 KiB, as an operator sets it). The gateway
# does its real work: route lookup, header hygiene, a signed identity assertion for a signed-in user (wrk sends a
# session cookie), one usage record per request into the meter, and its
# access log. CPU time of each proxy is read from /proc. Everything listens
# on 127.0.0.1.
#
# Prints: requests/s and CPU µs per request at 16 and 256 connections (and
# at 16 with a 1 KiB POST body each), with ratios to nginx (medians of paired
# runs); the same over TLS 1.3 with an ECDSA P-256 certificate on both (h2load:
# HTTP/1.1 on kept-alive connections, HTTP/2 with 10 streams per connection,
# and new connections — a full handshake and one request each — by the CPU
# each costs the proxy); p99 latency at half of the gateway's peak rate (wrk paced
# by a delay per request) against the backend reached directly; resident
# memory per idle keep-alive client connection, with 10,000 and 100,000 of
# them (where the descriptors' limit allows); the throughput a
# signed-in client keeps while another floods the gateway with made-up
# bearer tokens (each one new); and the gateway's CPU per request to the same
# backend in a network of its own (sandboxed, as root) against on the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nginx wrk h2load openssl taskset python3; do
  command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null 2>&1 || {
    echo "bench/gateway.sh needs $tool (apt-get install nginx-light wrk nghttp2-client openssl)" >&2
    exit 1
  }
done
NGINX=$(PATH="$PATH:/usr/sbin" command -v nginx)
DURATION=${DURATION:-10}
cargo build --release --quiet -p commons-cli
B="$PWD/target/release/commons"
work=$(mktemp -d)
export COMMONS_HOME="$work/home"
# The bench starts `commons serve` itself, where and when it measures it.
export COMMONS_DAEMON=off
# The backend runs on the host's network (a sandboxed one is measured last).
export COMMONS_SANDBOX=0
# 100,000 client connections: every process here needs the descriptors
# (root may raise its hard limit; others get what the hard limit allows).
ulimit -n 250000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Which parts run (all by default): PARTS="memory tls" bash bench/gateway.sh
PARTS=${PARTS:-throughput latency memory tokens sandboxed tls}
part() { [[ " $PARTS " == *" $1 "* ]]; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$B" destroy bench >/dev/null 2>&1 || true
  "$B" destroy benchnet >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)

# The backend: a site whose process is an nginx worker on CPU 1.
source bench/gateway-backend.sh
backend=$(deploy_backend "$B" "$work" "$NGINX")

# nginx as the reverse proxy, on CPU 0; over TLS with the same kind of
# certificate the gateway makes for bench.localhost (ECDSA P-256), TLS 1.3
# only, no session resumption (each new connection a full handshake).
mkdir -p "$work/nginx"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=bench.localhost -addext subjectAltName=DNS:bench.localhost \
  -keyout "$work/nginx/key.pem" -out "$work/nginx/cert.pem" 2>/dev/null
# The same proxying over plain HTTP and over TLS.
cat > "$work/nginx/proxy.conf" <<'CONF'
location / {
  proxy_pass http://backend;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host $host;
  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
  proxy_set_header X-Forwarded-Proto $scheme;
}
CONF
cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; user root;
pid $work/nginx/nginx.pid; error_log $work/nginx/error.log;
worker_rlimit_nofile 250000;
events { worker_connections 250000; }
http {
  access_log $work/nginx/access.log combined buffer=64k;
  keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  upstream backend { server 127.0.0.1:$backend; keepalive 128; }
  server {
    listen 127.0.0.1:18182 backlog=4096;
    include $work/nginx/proxy.conf;
  }
  server {
    listen 127.0.0.1:18186 ssl http2 backlog=4096;
    ssl_certificate $work/nginx/cert.pem; ssl_certificate_key $work/nginx/key.pem;
    ssl_protocols TLSv1.3; ssl_session_tickets off; ssl_session_cache off;
    include $work/nginx/proxy.conf;
  }
}
CONF
taskset -c 0 "$NGINX" -c "$work/nginx/nginx.conf" &
nginx_master=$!
pids+=("$nginx_master")

# The gateway, one event loop on CPU 0, with a signed-in user.
token=$("$B" token create bench-user --scope session 2>/dev/null)
COMMONS_IDLE_AFTER= taskset -c 0 "$B" serve --listen 127.0.0.1:0 --http 127.0.0.1:18183 \
  --https 127.0.0.1:18185 --admin 127.0.0.1:18184 --gateway-threads 1 2>"$work/serve.log" &
serve_pid=$!
pids+=("$serve_pid")
for _ in $(seq 100); do
  curl -sf -o /dev/null -H "Host: bench.localhost" http://127.0.0.1:18183/ && \
    curl -sf -o /dev/null http://127.0.0.1:18182/ && break
  sleep 0.1
done

# CPU ticks of a process and its children (nginx: master and worker).
ticks() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
# run PORT CONNS [extra wrk args...] -> "requests duration_s p99_ms"
run() {
  local port=$1 conns=$2; shift 2
  taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s --latency \
    -H "Host: ${SITE:-bench}.localhost" -H "Cookie: commons_session=$token" "$@" \
    "http://127.0.0.1:$port/" > "$work/wrk.out"
  python3 - "$work/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
if re.search(r"Non-2xx|Socket errors", t):
    sys.exit("wrk saw errors:\n" + t)
n, secs = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", t).groups()[:2]
unit = re.search(r"\d+ requests in [\d.]+(ms|s|m)", t).group(1)
secs = float(secs) * {"ms": 0.001, "s": 1, "m": 60}[unit]
p99, u = re.search(r"99%\s+([\d.]+)(us|ms|s)", t).groups()
p99 = float(p99) * {"us": 0.001, "ms": 1, "s": 1000}[u]
print(n, secs, round(p99, 3))
PY
}
# once PID PORT CONNS [extra wrk args...] -> "req/s µs-per-request" for one
# run (after a short warm-up that opens the connections).
once() {
  local pid=$1 port=$2 conns=$3 c0 c1 n secs
  shift 3
  DURATION=2 run "$port" "$conns" "$@" >/dev/null
  c0=$(ticks "$pid")
  read -r n secs _ <<<"$(run "$port" "$conns" "$@")"
  c1=$(ticks "$pid")
  python3 -c "print(round($n / $secs), round(($c1 - $c0) * 1e6 / $hz / $n, 1))"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The machine's speed drifts (shared vCPUs): nginx and the gateway take
# turns, REPS times each, and each gateway run is compared with the nginx
# run just before it. The ratios printed are the medians of those paired
# ratios (drift between pairs cancels out); every run is listed.
REPS=${REPS:-5}
# A form post: 1 KiB of body with each request.
cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
LUA
if part throughput; then
echo "throughput ($REPS pairs of ${DURATION}s runs, taking turns; proxy on CPU 0, backend and wrk on CPU 1):"
declare -A rps us
for case in 16 256 16-post; do
  conns=${case%-post}
  extra=()
  [ "$case" = "$conns" ] || extra=(-s "$work/post.lua")
  : > "$work/nginx.runs"; : > "$work/commons.runs"
  for _ in $(seq "$REPS"); do
    once "$nginx_master" 18182 "$conns" "${extra[@]}" >> "$work/nginx.runs"
    once "$serve_pid" 18183 "$conns" "${extra[@]}" >> "$work/commons.runs"
  done
  for name in nginx commons; do
    rps[$name$case]=$(awk '{print $1}' "$work/$name.runs" | median)
    us[$name$case]=$(awk '{print $2}' "$work/$name.runs" | median)
    printf '  %-8s %5s conns%s: %7s req/s, %6s µs CPU per request (medians; runs: %s)\n' "$name" "$conns" \
      "${extra[*]:+, POST 1 KiB}" "${rps[$name$case]}" "${us[$name$case]}" "$(awk '{printf "%s/%s ", $1, $2}' "$work/$name.runs")"
  done
  paste "$work/nginx.runs" "$work/commons.runs" | python3 -c "
import statistics, sys
pairs = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
rps = statistics.median(c / n for n, _, c, _ in pairs)
cpu = statistics.median(cu / nu for _, nu, _, cu in pairs)
print('  ratio    %5s conns%s: %.2fx nginx req/s (>= 1.0 wanted), %.2fx nginx CPU per request (<= 1.0 wanted)' % ($conns, '${extra[*]:+, POST 1 KiB}', rps, cpu))
"
done

fi

# p99 at half the gateway's peak: each of C connections waits 1 ms between
# requests, C chosen for about half the peak rate.
if part latency && part throughput; then
half=$(( rps[commons16] / 2 ))
conns=$(( half / 1000 > 0 ? half / 1000 : 1 ))
cat > "$work/pace.lua" <<'LUA'
function delay() return 1 end
LUA
# Three rounds (a stall of the machine in one round shows in every target
# of that round, and the median round leaves it out).
echo "latency at about half the gateway's peak ($conns connections, 1 ms pause each; 3 rounds):"
: > "$work/added"
for round in 1 2 3; do
  for target in "backend $backend" "nginx 18182" "commons 18183"; do
    read -r name port <<<"$target"
    read -r n secs p99 <<<"$(run "$port" "$conns" -s "$work/pace.lua")"
    printf '  round %s %-8s %7s req/s, p99 %s ms\n' "$round" "$name" "$(python3 -c "print(round($n / $secs))")" "$p99"
    eval "p99_$name=$p99"
  done
  echo "$p99_nginx $p99_commons $p99_backend" >> "$work/added"
done
python3 - "$work/added" <<'PY'
import statistics, sys
rounds = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
nginx = statistics.median(n - b for n, _, b in rounds)
commons = statistics.median(c - b for _, c, b in rounds)
print('  added p99 (median of rounds): nginx %.3f ms, commons %.3f ms (<= 1 ms wanted)' % (nginx, commons))
PY

fi

# Memory with 10,000 and 100,000 idle keep-alive connections (one request
# each, then idle), from several loopback source addresses (one address has
# 28k ports; HOLD_BATCH=N opens them N at a time instead of 500). Per
# connection: the growth of resident memory over the number
# of client connections the proxy holds open, read when all are open.
rss() { local t=0 p; for p in "$1" $(pgrep -P "$1" || true); do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
cat > "$work/hold.py" <<'PY'
import asyncio, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
async def one(i):
    source = "127.0.0.%d" % (2 + i % 8)
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    w.write(b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n")
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    return r, w
async def main():
    conns = []
    while len(conns) < total:
        batch = min(int(sys.argv[3]) if len(sys.argv) > 3 else 500, total - len(conns))
        conns += await asyncio.gather(*(one(len(conns) + i) for i in range(batch)))
    print("open", len(conns), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
PY
if part memory; then
  echo "resident memory with idle keep-alive client connections (one request each):"
  for conns in 10000 100000; do
    if [ "$(ulimit -n)" -lt $((conns + 1000)) ]; then
      echo "  $conns connections: skipped (needs $((conns + 1000)) descriptors; ulimit -n is $(ulimit -n))"
      continue
    fi
    for target in "nginx $nginx_master 18182" "commons $serve_pid 18183"; do
      read -r name pid port <<<"$target"
      before=$(rss "$pid")
      python3 "$work/hold.py" "$port" "$conns" ${HOLD_BATCH:-} >"$work/hold.out" 2>&1 &
      holder=$!
      for _ in $(seq 1500); do
        grep -q open "$work/hold.out" && break
        kill -0 "$holder" 2>/dev/null || { echo "the connection holder failed:" >&2; cat "$work/hold.out" >&2; exit 1; }
        sleep 0.2
      done
      sleep 1
      after=$(rss "$pid"); open=$(established "$port")
      kill "$holder" 2>/dev/null || true
      wait "$holder" 2>/dev/null || true
      printf '  %-8s %6s connections open: %7s KiB more resident (%s KiB per connection)\n' \
        "$name" "$open" "$((after - before))" "$(python3 -c "print(round(($after - $before) / max(1, $open), 2))")"
      # Let the proxy see the closes before the next one is measured.
      sleep 2
    done
  done
fi

# Made-up credentials: a client sending a new random bearer token with
# every request (8 connections) beside the measured one (16 connections,
# signed in); both wrk on CPU 1. Each token is looked up once, outside any
# lock, and remembered as unknown in a bounded cache.
cat > "$work/bogus.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  local t = string.format("cmns_%08x%08x%08x%08x", math.random(0, 2^31), math.random(0, 2^31),
    math.random(0, 2^31), math.random(0, 2^31))
  return wrk.format(nil, nil, { ["Host"] = "bench.localhost", ["Authorization"] = "Bearer " .. t })
end
LUA
if part tokens; then
echo "a signed-in client's throughput while another sends made-up bearer tokens:"
read -r n secs _ <<<"$(run 18183 16)"
alone=$(python3 -c "print(round($n / $secs))")
taskset -c 1 wrk -t1 -c8 -d"$((DURATION + 2))s" --timeout 5s -s "$work/bogus.lua" \
  "http://127.0.0.1:18183/" > "$work/bogus.out" &
flood=$!
sleep 1
read -r n secs _ <<<"$(run 18183 16)"
wait "$flood" || true
beside=$(python3 -c "print(round($n / $secs))")
bogus=$(awk '/Requests\/sec/ {print int($2)}' "$work/bogus.out")
printf '  alone %s req/s; beside %s made-up tokens/s: %s req/s (%.2fx)\n' "$alone" "$bogus" "$beside" \
  "$(python3 -c "print($beside / $alone)")"

fi

# The same backend in a network of its own: the gateway reaches it over the
# site's veth link (and the DNAT to its loopback) instead of the host's
# loopback. Paired runs, taking turns; CPU µs per request of the gateway.
if ! part sandboxed; then
  :
elif [ "$(id -u)" = 0 ] && command -v nft >/dev/null 2>&1; then
  COMMONS_SANDBOX=1 deploy_backend "$B" "$work" "$NGINX" benchnet >/dev/null
  for _ in $(seq 100); do
    curl -sf -o /dev/null -H "Host: benchnet.localhost" http://127.0.0.1:18183/ && break
    sleep 0.1
  done
  echo "the gateway's CPU per request, the backend sandboxed in its own network vs on the host's (16 connections, $REPS pairs):"
  : > "$work/netns.runs"
  for _ in $(seq "$REPS"); do
    read -r host_rps host_us <<<"$(SITE=bench once "$serve_pid" 18183 16)"
    read -r net_rps net_us <<<"$(SITE=benchnet once "$serve_pid" 18183 16)"
    echo "$host_rps $host_us $net_rps $net_us" >> "$work/netns.runs"
    printf '  host network %s req/s %s µs/req | own network %s req/s %s µs/req\n' \
      "$host_rps" "$host_us" "$net_rps" "$net_us"
  done
  python3 - "$work/netns.runs" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
cpu = statistics.median(r[3] / r[1] for r in rows)
rps = statistics.median(r[2] / r[0] for r in rows)
print(f"  own network / host network: CPU per request {cpu:.2f}x (target <= 1.10x), requests/s {rps:.2f}x")
PY
else
  echo "(the sandboxed backend needs root and nftables: skipped)"
fi

# TLS last: its thousands of new connections leave both proxies' memory
# grown, which the idle-connection figure above must not see.
# TLS: h2load on CPU 1 reaches each proxy at bench.localhost (its SNI) on
# 127.0.0.1. tls PORT [h2load args...] -> "requests duration_s"
tls() {
  local port=$1; shift
  taskset -c 1 h2load -t1 "$@" --connect-to "127.0.0.1:$port" \
    -H "Cookie: commons_session=$token" "https://bench.localhost/" > "$work/h2load.out" 2>&1 || true
  python3 - "$work/h2load.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", t)
d = re.search(r"finished in ([\d.]+)(ms|s),", t)
if not m or not d or int(m.group(3)) or int(m.group(4)) or not int(m.group(2)):
    sys.exit("h2load saw errors:\n" + t)
secs = float(d.group(1)) * {"ms": 0.001, "s": 1}[d.group(2)]
print(m.group(2), secs)
PY
}
# tls_once PID PORT [h2load args...] -> "req/s µs-per-request"
tls_once() {
  local pid=$1 port=$2 c0 c1 n secs out
  shift 2
  c0=$(ticks "$pid")
  out=$(tls "$port" "$@") || exit 1
  read -r n secs <<<"$out"
  c1=$(ticks "$pid")
  python3 -c "print(round($n / $secs), round(($c1 - $c0) * 1e6 / $hz / $n, 1))"
}
if part tls; then
echo "over TLS 1.3, ECDSA P-256 on both ($REPS pairs, taking turns; h2load on CPU 1):"
for case in h1 h2 new; do
  case $case in
    h1) args=(--h1 -c16 -D "$DURATION" --warm-up-time 1); what="HTTP/1.1, 16 kept-alive connections" ;;
    h2) args=(-c16 -m10 -D "$DURATION" --warm-up-time 1); what="HTTP/2, 16 connections x 10 streams" ;;
    # 3,000 new connections, 300 every 0.1 s: a full handshake and one
    # request each (the rate is the client's; the CPU each costs is the proxy's).
    new) args=(--h1 -c3000 -n3000 -r300 --rate-period 100ms); what="new connections: handshake + 1 request" ;;
  esac
  : > "$work/nginx.tls"; : > "$work/commons.tls"
  for _ in $(seq "$REPS"); do
    tls_once "$nginx_master" 18186 "${args[@]}" >> "$work/nginx.tls"
    tls_once "$serve_pid" 18185 "${args[@]}" >> "$work/commons.tls"
  done
  for name in nginx commons; do
    printf '  %-8s %s: %s req/s, %s µs CPU each (medians; runs: %s)\n' "$name" "$what" \
      "$(awk '{print $1}' "$work/$name.tls" | median)" "$(awk '{print $2}' "$work/$name.tls" | median)" \
      "$(awk '{printf "%s/%s ", $1, $2}' "$work/$name.tls")"
  done
  paste "$work/nginx.tls" "$work/commons.tls" | python3 -c "
import statistics, sys
pairs = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
rps = statistics.median(c / n for n, _, c, _ in pairs)
cpu = statistics.median(nu / cu for _, nu, _, cu in pairs)
if '$case' == 'new':
    print('  ratio    %s: %.2fx nginx per core (nginx CPU per connection / ours; >= 1.0 wanted)' % ('$what', cpu))
else:
    print('  ratio    %s: %.2fx nginx req/s, %.2fx nginx per core (>= 1.0 wanted)' % ('$what', rps, cpu))
"
done
fi
