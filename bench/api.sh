#!/usr/bin/env bash
# Control-plane figures (issue #5): API latency listing 1,000 sites, and the
# console's page weight.
#
#   bash bench/api.sh
#
# Starts `commons serve` on 127.0.0.1 with a fresh data directory, signs a
# user up, deploys 1,000 one-job sites through the API (each really
# deployed: a job, a deployment record), then measures with wrk (on
# 127.0.0.1, 4 connections, 10 s) GET /api/orgs/ORG/sites for a page of 100
# and for all 1,000 at once, authorised by a scoped user token.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet -p commons-cli
B="$PWD/target/release/commons"
work=$(mktemp -d)
export COMMONS_HOME="$work/home"
export COMMONS_DAEMON=off
# Unsandboxed, as the README's figures (as root the default is the sandbox).
export COMMONS_SANDBOX=${COMMONS_SANDBOX:-0}
# The bench's user deploys its own sites on this machine, unsandboxed: a
# platform that is one person's, which has to be said (see README).
export COMMONS_SINGLE_USER=1
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Money for the money pages: a reserve, a platform token to report usage
# and close the period, a webhook secret to pay with.
"$B" ledger bootstrap --cash 100000 --tokens 100000 2>/dev/null
platform_token=$("$B" token create bench-platform --scope usage:write --scope periods:close)
export COMMONS_STRIPE_WEBHOOK_SECRET=whsec_bench
"$B" serve --listen "127.0.0.1:$port" --http 127.0.0.1:0 --https off --admin off 2>"$work/serve.log" &
serve_pid=$!
cleanup() { kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do grep -q Console "$work/serve.log" 2>/dev/null && break; sleep 0.1; done

# Sign up, make a token, deploy 1,000 sites (sequentially, each waited for).
token=$(python3 - "$port" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def call(method, path, body=None, headers={}):
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json", **headers},
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers
call("POST", "/api/signup", {"email": "bench@example.org", "name": "Bench", "password": "a long enough password"})
code, me, headers = call("POST", "/api/login", {"email": "bench@example.org", "password": "a long enough password"})
cookie = headers["set-cookie"].split(";")[0]
auth = {"Cookie": cookie, "X-CSRF-Token": me["csrf"]}
code, t, _ = call("POST", "/api/tokens", {"name": "bench", "scopes": ["sites:read", "sites:write"]}, auth)
bearer = {"Authorization": "Bearer " + t["token"]}
blueprint = "name: one\ncomponents:\n  once:\n    job: \"true\"\n"
start = time.time()
for i in range(1000):
    name = f"site-{i:04d}"
    code, body, _ = call("POST", "/api/orgs/bench/sites", {"name": name, "blueprint": blueprint}, bearer)
    assert code == 202, body
    while True:
        code, s, _ = call("GET", f"/api/sites/{name}", None, bearer)
        if s["status"].get("status") == "ok":
            break
        assert s["status"].get("status") != "failed", s
        time.sleep(0.01)
print(f"deployed 1,000 sites in {time.time() - start:.0f} s", file=sys.stderr)
code, page, _ = call("GET", "/api/orgs/bench/sites?limit=1000", None, bearer)
assert len(page["items"]) == 1000 and all(i["status"] == "ok" for i in page["items"]), page["next"]
print(t["token"])
PY
)

measure() {
  local what=$1 path=$2
  local out
  out=$(wrk -t 2 -c 4 -d 10s --latency -H "Authorization: Bearer $token" "http://127.0.0.1:$port$path")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  bytes=$(curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$port$path" | wc -c)
  printf '%-34s p50 %8s  p99 %8s  %8s req/s  %7s bytes\n' "$what" "$p50" "$p99" "$rps" "$bytes"
}
echo "API, listing an organisation's 1,000 sites (wrk, 4 connections, 10 s):"
measure "GET .../sites?limit=100 (a page)" "/api/orgs/bench/sites?limit=100"
measure "GET .../sites?limit=1000 (all)" "/api/orgs/bench/sites?limit=1000"

# A heavy subscriber for the money pages: paid by the signed webhook, used
# 40 of the sites, and the period closed.
python3 - "$port" "$platform_token" <<'PY'
import hashlib, hmac, json, sys, time, urllib.request
base, token = f"http://127.0.0.1:{sys.argv[1]}", sys.argv[2]
def call(method, path, body, headers):
    req = urllib.request.Request(base + path, method=method, data=body, headers=headers)
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
json_headers = {"Content-Type": "application/json"}
me = call("POST", "/api/login", json.dumps({"email": "bench@example.org", "password": "a long enough password"}).encode(), json_headers)
user = me["user"]["id"]
event = json.dumps({"id": "evt_bench", "type": "invoice.paid", "data": {"object": {
    "id": "in_bench", "amount_paid": 2000, "billing_reason": "subscription_create",
    "charge": {"balance_transaction": {"fee": 88}},
    "subscription_details": {"metadata": {"user": user, "tier": "patron"}}}}}).encode()
t = int(time.time())
sig = hmac.new(b"whsec_bench", f"{t}.".encode() + event, hashlib.sha256).hexdigest()
call("POST", "/api/payments/stripe/webhook", event, {**json_headers, "Stripe-Signature": f"t={t},v1={sig}"})
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
events = [{"specversion": "1.0", "id": f"bench-{i}", "source": "gateway/local", "type": "request", "time": now,
           "data": {"user": user, "site": f"site-{i % 40:04d}", "operator": "local", "provider": "local", "bytes_out": 100}}
          for i in range(400)]
auth = {**json_headers, "Authorization": "Bearer " + token}
call("POST", "/api/usage/events", json.dumps(events).encode(), auth)
closed = call("POST", "/api/periods/" + now[:7] + "/close", b"", auth)
assert closed["subscribers"] == 1, closed
PY

# Console page weight: what a browser downloads (HTML with inline CSS; no
# scripts, fonts or images).
jar="$work/jar"
curl -s -c "$jar" -o /dev/null -X POST "http://127.0.0.1:$port/console/login" \
  --data-urlencode email=bench@example.org --data-urlencode "password=a long enough password"
echo "Page weight (the whole page: HTML, inline CSS and SVG, no other requests; target <= 100 KB gzipped):"
for page in /console/login /console/orgs/bench /console/sites/site-0000 /console/tokens /console \
    /console/usage /console/billing /console/money /books "/books/statement?recipient=operator:local"; do
  bytes=$(curl -s -b "$jar" "http://127.0.0.1:$port$page" | wc -c)
  gz=$(curl -s -b "$jar" "http://127.0.0.1:$port$page" | gzip -9 | wc -c)
  printf '  %-42s %7s bytes (%s gzipped)\n' "$page" "$bytes" "$gz"
done
