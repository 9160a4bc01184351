#!/usr/bin/env python3
"""Issue 18's control-plane figure: mutating API calls with three
control-plane instances sharing one PostgreSQL, a fleet of simulated nodes
(`commons agent simulate`: each joins with its own token over mutual TLS,
beats, takes its assignments and reports them done, running nothing), and
sites placed on them through the API until there are 1k, 10k and 50k.

Prints, at each size, the placements' p50/p99/max latency and rate over the
last WINDOW placements (target: p99 <= 1 s at 50,000 sites on 1,000 nodes),
then checks that every instance sees every placement and that the nodes
reported every site running. Usage:
    python3 bench/control-planes.py [path/to/commons]
Environment: COMMONS_BENCH_POSTGRES (default "host=127.0.0.1 user=postgres
dbname=test"), NODES (default 1000), SITES (default 1000,10000,50000),
CLIENTS (concurrent API clients, default 12, spread over the instances),
WINDOW (default 1000). Everything listens on loopback.
"""
import http.client, json, os, shutil, subprocess, sys, tempfile, threading, time

COMMONS = sys.argv[1] if len(sys.argv) > 1 else "target/release/commons"
PG = os.environ.get("COMMONS_BENCH_POSTGRES", "host=127.0.0.1 user=postgres dbname=test")
NODES = int(os.environ.get("NODES", "1000"))
SIZES = [int(s) for s in os.environ.get("SITES", "1000,10000,50000").split(",")]
CLIENTS = int(os.environ.get("CLIENTS", "12"))
WINDOW = int(os.environ.get("WINDOW", "1000"))
ROOT = tempfile.mkdtemp(prefix="commons-bench-cp-")
SCHEMA = "bench_cp_%d" % os.getpid()
CHILDREN = []

BLUEPRINT = """name: site
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"""


def env(home):
    e = dict(os.environ, COMMONS_HOME=home, COMMONS_DAEMON="off", COMMONS_SANDBOX="0",
             COMMONS_SINGLE_USER="1", COMMONS_DATABASE_URL=PG, COMMONS_DATABASE_SCHEMA=SCHEMA,
             COMMONS_AGENT_LISTEN="127.0.0.1:0", COMMONS_DATA_LISTEN="127.0.0.1:0")
    for k in ("COMMONS_NATS_URL", "COMMONS_JOIN_TOKEN"):
        e.pop(k, None)
    return e


def serve(i):
    home = os.path.join(ROOT, "cp%d" % i)
    p = subprocess.Popen([COMMONS, "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
                          "--https", "off", "--admin", "off"],
                         env=env(home), stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    ports, said = {}, []
    while not {"api", "agents"} <= set(ports):
        line = p.stderr.readline()
        said.append(line)
        if not line:
            sys.exit("serve %d stopped:\n%s" % (i, "".join(said)))
        w = line.split()
        if w[:1] == ["Listening"] and w[1].startswith("http://"):
            ports["api"] = int(w[1].rsplit(":", 1)[1])
        elif w[:1] == ["Listening"] and w[1].startswith("https://"):
            ports["agents"] = int(w[1].rsplit(":", 1)[1])
    # Drained, so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return home, ports


def share_keys(src, dst):
    """What an operator copies to every instance of one platform."""
    for rel in ("secrets/key", "datacommons/platform.key"):
        if os.path.exists(os.path.join(src, rel)):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), mode=0o700, exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
            os.chmod(os.path.join(dst, rel), 0o600)


class Api:
    def __init__(self, port, token):
        self.port, self.token, self.c = port, token, None

    def call(self, method, path, body=None):
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self.c.request(method, path, json.dumps(body) if body is not None else None,
                               {"Content-Type": "application/json", "Authorization": "Bearer " + self.token})
                r = self.c.getresponse()
                data = r.read()
                return r.status, json.loads(data or b"null")
            except (http.client.HTTPException, ConnectionError):
                self.c = None
                if attempt:
                    raise


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    homes, ports = [], []
    home, p = serve(0)
    tok = os.path.join(home, "secrets", "admin.token")
    while not os.path.exists(tok):
        time.sleep(0.05)
    admin = open(tok).read().strip()
    homes.append(home)
    ports.append(p)
    for i in (1, 2):
        h = os.path.join(ROOT, "cp%d" % i)
        share_keys(home, h)
        h, p = serve(i)
        homes.append(h)
        ports.append(p)
    apis = [Api(p["api"], admin) for p in ports]

    # Join tokens for the fleet, made through every instance in turn.
    tokens = []
    for i in range(NODES):
        code, v = apis[i % 3].call("POST", "/api/orgs/provider-%d/join-tokens" % (i % 20), {"ttl_seconds": 3600})
        assert code == 201, v
        tokens.append(v["token"])
    tokens_file = os.path.join(ROOT, "tokens")
    with open(tokens_file, "w") as f:
        f.write("\n".join(tokens) + "\n")
    fleet_cmd = [COMMONS, "agent", "simulate", "--tokens", tokens_file, "--json"]
    for p in ports:
        fleet_cmd += ["--control-plane", "https://127.0.0.1:%d" % p["agents"]]
    fleet = subprocess.Popen(fleet_cmd, env=env(os.path.join(ROOT, "fleet")), stdout=subprocess.PIPE,
                             stderr=open(os.path.join(ROOT, "fleet.log"), "w"), text=True)
    CHILDREN.append(fleet)
    said = ""
    while True:
        line = fleet.stdout.readline()
        if not line:
            sys.exit("the fleet stopped: see " + os.path.join(ROOT, "fleet.log"))
        said += line
        try:
            joined = json.loads(said)
            break
        except ValueError:
            continue
    print("%d simulated nodes joined 3 control planes in %.1f s (%.0f joins/s)" % (
        joined["joined"], joined["seconds"], joined["joined"] / joined["seconds"]), flush=True)

    # Placements through every instance at once, each client its own
    # connection to one instance.
    latencies = {}
    lock = threading.Lock()
    counter = [0]
    failures = []

    def client(n, until):
        api = Api(ports[n % 3]["api"], admin)
        while True:
            with lock:
                i = counter[0]
                if i >= until:
                    return
                counter[0] += 1
            t = time.perf_counter()
            code, v = api.call("POST", "/api/placements", {
                "site": "s%d" % i, "blueprint": BLUEPRINT,
                "needs": {"cpu_millis": 250, "memory_bytes": 256 << 20, "disk_bytes": 1 << 30}})
            took = time.perf_counter() - t
            if code != 200 or v.get("node") is None:
                failures.append((i, code, v))
            with lock:
                latencies[i] = (took, time.perf_counter())

    print("%8s %10s %10s %10s %10s" % ("sites", "p50 ms", "p99 ms", "max ms", "placed/s"))
    for size in SIZES:
        threads = [threading.Thread(target=client, args=(n, size)) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures[:3]
        window = [latencies[i] for i in range(max(0, size - WINDOW), size)]
        lat = [w[0] for w in window]
        ends = sorted(w[1] for w in window)
        rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else float("nan")
        print("%8d %10.1f %10.1f %10.1f %10.0f" % (size, pct(lat, 50) * 1000, pct(lat, 99) * 1000,
                                                  max(lat) * 1000, rate), flush=True)

    # Every instance sees every placement, and the nodes ran (noted) them all.
    total = SIZES[-1]
    deadline = time.time() + 120
    for n, api in enumerate(apis):
        while True:
            code, v = api.call("GET", "/api/nodes")
            items = v["items"]
            placed = sum(len(x["placed"]) for x in items)
            running = sum(1 for x in items for s in x["sites"] if s["state"] == "running")
            ready = sum(1 for x in items if x["state"] == "ready")
            if (placed, running, ready) == (total, total, NODES) or time.time() > deadline:
                break
            time.sleep(1)
        print("instance %d: %d nodes ready, %d sites placed, %d reported running" % (n, ready, placed, running))
        assert (placed, running, ready) == (total, total, NODES), "an instance or node fell behind"


if __name__ == "__main__":
    try:
        main()
    finally:
        for c in CHILDREN:
            c.kill()
            c.wait()
        subprocess.run(["psql", PG, "-qc", "DROP SCHEMA IF EXISTS %s CASCADE; DROP SCHEMA IF EXISTS %s_meter CASCADE; "
                        "DROP SCHEMA IF EXISTS %s_data CASCADE" % (SCHEMA, SCHEMA, SCHEMA)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(ROOT, ignore_errors=True)
