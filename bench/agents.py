#!/usr/bin/env python3
"""Milestone 5's figures with real agents on this machine: node join to
ready, a lost node detected, a stateless site's move seen through the
gateway, and a site with SQLite data moved under continuous writes.

Runs `commons serve` with the agent listener and `commons agent` processes,
each with a data directory of its own, everything on loopback. Usage:
    python3 bench/agents.py [path/to/commons] [--data-mb N] [--pg-mb M]
The moved site has N MiB of SQLite and N MiB in a volume (default 64); a
second site has M MiB in a PostgreSQL database (default 256; 0 skips it),
moved under writes, its pause printed beside what a dump and load of the
same database takes (what a move by dump would pause at least). The
PostgreSQL server is COMMONS_TEST_POSTGRES's (wal_level=logical).
"""
import json, os, shutil, signal, subprocess, sys, tempfile, threading, time
import http.client

COMMONS = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "target/release/commons"
DATA_MB = int(sys.argv[sys.argv.index("--data-mb") + 1]) if "--data-mb" in sys.argv else 64
PG_MB = int(sys.argv[sys.argv.index("--pg-mb") + 1]) if "--pg-mb" in sys.argv else 256
PG = os.environ.get("COMMONS_TEST_POSTGRES", "host=127.0.0.1 user=postgres dbname=test")
ROOT = tempfile.mkdtemp(prefix="commons-bench-agents-")
CHILDREN = []
MOVES = []


def env(home, extra=None):
    e = dict(os.environ, COMMONS_HOME=home, COMMONS_DAEMON="off", COMMONS_SANDBOX="0",
             COMMONS_POSTGRES_URL=PG)
    e.pop("COMMONS_JOIN_TOKEN", None)
    e.update(extra or {})
    return e


def serve():
    home = os.path.join(ROOT, "cp")
    p = subprocess.Popen(
        [COMMONS, "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--https", "off", "--admin", "off"],
        env=env(home, {"COMMONS_AGENT_LISTEN": "127.0.0.1:0", "COMMONS_SINGLE_USER": "1"}),
        stderr=subprocess.PIPE, text=True)
    CHILDREN.append(p)
    ports = {}
    while not {"api", "agents", "http"} <= set(ports):
        line = p.stderr.readline()
        if not line:
            sys.exit("serve stopped")
        w = line.split()
        if w[:1] != ["Listening"]:
            continue
        if w[1].startswith("http://"):
            ports["api"] = int(w[1].rsplit(":", 1)[1])
        elif w[1].startswith("https://"):
            ports["agents"] = int(w[1].rsplit(":", 1)[1])
        else:
            ports[w[1]] = int(w[2].rsplit(":", 1)[1])
    # The control plane's own account of each move ("Moved SITE ... held T").
    threading.Thread(target=lambda: [MOVES.append(l.strip()) for l in p.stderr
                                     if l.split()[:1] in (["Moved"], ["Failed"])], daemon=True).start()
    tok = os.path.join(home, "secrets", "admin.token")
    while not os.path.exists(tok):
        time.sleep(0.05)
    return ports, open(tok).read().strip()


def call(port, method, path, body=None, token=None, host=None, timeout=130):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if token:
        h["Authorization"] = "Bearer " + token
    if host:
        h["Host"] = host
    c.request(method, path, json.dumps(body) if body is not None else None, h)
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def nodes(api, admin):
    return {n["id"]: n for n in call(api, "GET", "/api/nodes", token=admin)[1]["items"]}


def agent(name, url, token, provider_env=None):
    home = os.path.join(ROOT, "agent-" + name)
    os.makedirs(home, exist_ok=True)
    subprocess.run([COMMONS, "agent", "join", url, "--token", token, "--region", "eu",
                    "--cpu-millis", "8000", "--memory-mib", "16384", "--disk-gib", "100"],
                   env=env(home), check=True, capture_output=True)
    node = json.load(open(os.path.join(home, "agent", "identity.json")))["node"]
    # Agents share the suite's server, each under a prefix of its own.
    p = subprocess.Popen([COMMONS, "agent", "run", "--poll-seconds", "25"],
                         env=env(home, {"COMMONS_POSTGRES_PREFIX": "bench" + name}),
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(home, "agent.log"), "w"))
    CHILDREN.append(p)
    return node, p, home


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


WEB = """name: hello
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"""

WRITES = """name: ledger
components:
  db:
    sqlite: {}
  files:
    volume: {}
  web:
    process: |
      exec python3 - "${components.db.path}" "${components.files.path}" <<'PY'
      import os, sqlite3, sys
      from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
      path = sys.argv[1]
      blob = os.path.join(sys.argv[2], "blob")
      if not os.path.exists(blob):
          with open(blob + ".part", "wb") as f:
              for _ in range(int(os.environ.get("FILL_MB", "0"))):
                  f.write(os.urandom(1048576))
          os.rename(blob + ".part", blob)
      c = sqlite3.connect(path)
      c.execute("CREATE TABLE IF NOT EXISTS w (n INTEGER PRIMARY KEY)")
      c.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
      if c.execute("SELECT COUNT(*) FROM filler").fetchone()[0] == 0:
          for _ in range(int(os.environ.get("FILL_MB", "0"))):
              c.execute("INSERT INTO filler VALUES (randomblob(1048576))")
      c.commit()
      class H(BaseHTTPRequestHandler):
          protocol_version = "HTTP/1.1"
          def reply(self, code, body):
              b = body.encode(); self.send_response(code)
              self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
          def do_GET(self):
              db = sqlite3.connect(path)
              if self.path.startswith("/has/"):
                  self.reply(200 if db.execute("SELECT 1 FROM w WHERE n = ?", (int(self.path[5:]),)).fetchone() else 404, "")
              else:
                  self.reply(200, str(db.execute("SELECT COUNT(*) FROM w").fetchone()[0]))
          def do_POST(self):
              db = sqlite3.connect(path); db.execute("INSERT OR IGNORE INTO w VALUES (?)", (int(self.path[1:]),)); db.commit()
              self.reply(200, "ok")
          def log_message(self, *a): pass
      ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
      PY
    env: { FILL_MB: "%d" }
    health: { http: "/" }
"""


BOOKS = """name: books
components:
  pg:
    postgres: {}
  web:
    process: |
      exec python3 - <<'PY'
      import os, subprocess
      from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
      def psql(sql):
          return subprocess.run(["psql", os.environ["PG_URL"], "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                                check=True, capture_output=True, text=True).stdout.strip()
      psql("CREATE TABLE IF NOT EXISTS w (n bigint PRIMARY KEY); "
           "CREATE TABLE IF NOT EXISTS filler (id bigint PRIMARY KEY, body text)")
      if psql("SELECT count(*) FROM (SELECT 1 FROM filler LIMIT 1) x") == "0":
          psql("INSERT INTO filler SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, %d) g")
      class H(BaseHTTPRequestHandler):
          protocol_version = "HTTP/1.1"
          def reply(self, code, body):
              b = body.encode(); self.send_response(code)
              self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
          def do_GET(self):
              if self.path.startswith("/has/"):
                  self.reply(200 if psql("SELECT 1 FROM w WHERE n = %%d" %% int(self.path[5:])) == "1" else 404, "")
              else:
                  self.reply(200, psql("SELECT count(*) FROM w"))
          def do_POST(self):
              psql("INSERT INTO w VALUES (%%d) ON CONFLICT DO NOTHING" %% int(self.path[1:]))
              self.reply(200, "ok")
          def log_message(self, *a): pass
      ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
      PY
    env: { PG_URL: "${components.pg.url}" }
    health: { http: "/" }
"""


def move_under_load(api, gw, admin, site, to):
    """Moves `site` to `to` under a writer and a reader; answers the move's
    time, the writer, the reader, and the acknowledged writes not found."""
    host = site + ".localhost"
    writer, reader = Load(gw, host, True), Load(gw, host, False)
    time.sleep(1)
    t = time.time()
    code, v = call(api, "POST", "/api/placements/%s/move" % site, {"to": to}, token=admin)
    assert code == 202, v
    wait_for(lambda: site in nodes(api, admin)[to]["placed"], 900)
    moved = time.time() - t
    time.sleep(1)
    writer.end()
    reader.end()
    lost = [n for n in writer.acked if call(gw, "GET", "/has/%d" % n, host=host)[0] != 200]
    return moved, writer, reader, lost


class Load:
    """A writer (or reader) through the gateway, recording every answer."""

    def __init__(self, gw, host, write):
        self.gw, self.host, self.write = gw, host, write
        self.stop = False
        self.acked, self.failed, self.waits = [], 0, []
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        n = 0
        while not self.stop:
            t = time.time()
            try:
                code, _ = call(self.gw, "POST" if self.write else "GET", "/%d" % n if self.write else "/", host=self.host)
            except Exception:
                code = 0
            self.waits.append(time.time() - t)
            if code == 200:
                self.acked.append(n)
            else:
                self.failed += 1
            n += 1

    def end(self):
        self.stop = True
        self.t.join()


def wait_for(f, limit):
    end = time.time() + limit
    while time.time() < end:
        if f():
            return True
        time.sleep(0.02)
    return False


def main():
    ports, admin = serve()
    api, gw, url = ports["api"], ports["http"], "https://127.0.0.1:%d" % ports["agents"]

    def join_token(org):
        return call(api, "POST", "/api/orgs/%s/join-tokens" % org, {"ttl_seconds": 600}, token=admin)[1]["token"]

    # Join to ready: from `agent join` to the control plane hearing the
    # running agent's first heartbeat.
    joins, agents = [], []
    for i in range(5):
        t = time.time()
        node, p, home = agent("n%d" % i, url, join_token("acme" if i % 2 == 0 else "globex"))
        started = time.time()
        wait_for(lambda: (nodes(api, admin)[node].get("last_heartbeat_ms_ago") or 1e9) / 1000 < time.time() - started, 30)
        joins.append(time.time() - t)
        agents.append((node, p, home))
    print("node join to ready: p50 %.0f ms, max %.0f ms over %d joins (target <= 30 s)" % (
        pct(joins, 50) * 1000, max(joins) * 1000, len(joins)))

    # A stateless site moved back and forth: how long until the gateway
    # answers from the new node, and the longest a request waited meanwhile.
    (a, _, _), (b, _, _) = agents[0], agents[1]
    call(api, "POST", "/api/placements", {"site": "hello", "blueprint": WEB, "preferred": ["acme"]}, token=admin)
    wait_for(lambda: call(gw, "GET", "/", host="hello.localhost")[0] == 200, 60)
    reader = Load(gw, "hello.localhost", write=False)
    switches = []
    for i in range(6):
        to = b if i % 2 == 0 else a
        t = time.time()
        code, v = call(api, "POST", "/api/placements/hello/move", {"to": to}, token=admin)
        assert code == 202, v
        wait_for(lambda: "hello" in nodes(api, admin)[to]["placed"], 60)
        switches.append(time.time() - t)
    reader.end()
    print("stateless site moved between nodes: switch p50 %.0f ms, p99 %.0f ms over %d moves; "
          "%d requests, %d failed, longest wait %.0f ms (route change target p99 <= 1 s)" % (
              pct(switches, 50) * 1000, pct(switches, 99) * 1000, len(switches), len(reader.waits),
              reader.failed, max(reader.waits) * 1000))

    # A site with DATA_MB of SQLite moved under continuous writes and reads.
    code, placed = call(api, "POST", "/api/placements", {"site": "ledger", "blueprint": WRITES % DATA_MB}, token=admin)
    assert code == 200 and placed["node"], placed
    to = b if placed["node"] != b else a
    wait_for(lambda: call(gw, "GET", "/", host="ledger.localhost")[0] == 200, 600)
    moved, writer, reader, lost = move_under_load(api, gw, admin, "ledger", to)
    print("site with %d MiB of SQLite and %d MiB in a volume moved under writes: move %.2f s; write pause "
          "(the longest write) %.0f ms (target p95 <= 2 s with 1 GiB); %d writes acknowledged, %d lost, %d refused; "
          "%d reads, %d failed" % (
              DATA_MB, DATA_MB, moved, max(writer.waits) * 1000, len(writer.acked),
              len(lost), writer.failed, len(reader.waits), reader.failed))
    for line in MOVES:
        if "ledger" in line:
            print("  control plane: " + line)

    if PG_MB:
        # A site with PG_MB in PostgreSQL moved under writes: by its changes.
        code, placed = call(api, "POST", "/api/placements", {"site": "books", "blueprint": BOOKS % (PG_MB * 1024)},
                            token=admin)
        assert code == 200 and placed["node"], placed
        source = placed["node"]
        to = b if source != b else a
        wait_for(lambda: call(gw, "GET", "/", host="books.localhost")[0] == 200, 900)
        moved, writer, reader, lost = move_under_load(api, gw, admin, "books", to)
        pause = max(writer.waits)
        # What a move by dump would pause at least: the same database
        # dumped and loaded (the source keeps its stopped copy until the
        # move is confirmed).
        home = [h for (n, _, h) in agents if n == source][0]
        src_db = "bench" + os.path.basename(home)[len("agent-"):] + "_books_pg"
        scratch = "bench_books_dump"
        subprocess.run(["psql", PG, "-qc", "DROP DATABASE IF EXISTS %s" % scratch], check=True, capture_output=True)
        subprocess.run(["psql", PG, "-qc", "CREATE DATABASE %s" % scratch], check=True)
        t = time.time()
        subprocess.run("pg_dump --no-owner --dbname \"%s dbname=%s\" | psql -q --dbname \"%s dbname=%s\""
                       % (PG, src_db, PG, scratch), shell=True, check=True, capture_output=True)
        dump_load = time.time() - t
        subprocess.run(["psql", PG, "-qc", "DROP DATABASE IF EXISTS %s" % scratch], check=True)
        print("site with %d MiB in PostgreSQL moved under writes: move %.2f s; write pause %.0f ms, "
              "a dump and load of the same database %.2f s (pause / dump = %.2f); "
              "%d writes acknowledged, %d lost, %d refused; %d reads, %d failed" % (
                  PG_MB, moved, pause * 1000, dump_load, pause / dump_load, len(writer.acked), len(lost),
                  writer.failed, len(reader.waits), reader.failed))
        for line in MOVES:
            if "books" in line:
                print("  control plane: " + line)

    # A node killed with kill -9, at the default heartbeat (5 s) and loss
    # (15 s) settings.
    node, p, _ = agents[4]
    t = time.time()
    p.send_signal(signal.SIGKILL)
    wait_for(lambda: nodes(api, admin)[node]["state"] == "lost", 60)
    print("lost node detected after %.1f s (target <= 30 s)" % (time.time() - t))


try:
    main()
finally:
    for p in CHILDREN:
        p.kill()
    for d in os.listdir(ROOT):
        if d.startswith("agent-"):
            subprocess.run([COMMONS, "list", "--json"], env=env(os.path.join(ROOT, d)), capture_output=True)
            for name in ("hello", "ledger", "books"):
                subprocess.run([COMMONS, "destroy", name], env=env(os.path.join(ROOT, d)), capture_output=True)
    shutil.rmtree(ROOT, ignore_errors=True)
