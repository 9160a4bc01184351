"""Notes: each user's notes live in their own DataCommons repository.

The platform tells the app where its data API is (COMMONS_DATA_URL) and
gives it a credential (COMMONS_SERVICE_TOKEN); the gateway hands it the
signed-in user's identity assertion (X-Commons-Identity), which it passes
on, so the app acts only for the user in front of it. It keeps nothing.
"""

import datetime
import html
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API = os.environ["COMMONS_DATA_URL"].rstrip("/")
TOKEN = os.environ["COMMONS_SERVICE_TOKEN"]
NSID = "org.onecommons.notes.note"
RECORDS = f"/data/v1/records/{NSID}"
RKEY = re.compile(r"^[A-Za-z0-9._:~-]{1,512}$")

STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #1d2733; }
h1 { font-size: 1.6rem; } .note { border: 1px solid #d8dee6; border-radius: 8px; padding: .75rem 1rem; margin: .75rem 0; }
.note h2 { font-size: 1.1rem; margin: 0 0 .25rem; } .meta { color: #5b6b7c; font-size: .85rem; }
textarea, input[type=text] { width: 100%; box-sizing: border-box; font: inherit; padding: .4rem; }
button { font: inherit; padding: .3rem .9rem; } .problem { background: #fff4e5; border: 1px solid #f0b45b; padding: 1rem; border-radius: 8px; }
form.inline { display: inline; }
"""


def call(method, path, identity, body=None):
    """One data API call; (status, JSON body)."""
    headers = {"X-Commons-Service": TOKEN, "X-Commons-Identity": identity}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(API + path, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, {"title": e.reason, "detail": ""}


def consent_url(problem):
    """Where the user grants what the app asks, from a 403's detail."""
    m = re.search(r"(https?://\S+/console/data/consent/\S+)", (problem or {}).get("detail", ""))
    return m.group(1) if m else None


def note_value(fields):
    """A note record from a form's or a JSON object's fields."""
    fields = fields if isinstance(fields, dict) else {}
    value = {
        "$type": NSID,
        "text": str(fields.get("text", "")),
        "createdAt": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if fields.get("title"):
        value["title"] = str(fields["title"])
    return value


def page(title, body):
    return (
        "<!doctype html><html lang=en><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style><body>{body}</body></html>"
    )


class Notes(BaseHTTPRequestHandler):
    server_version = "notes/0.1"

    def send(self, code, body, content_type="text/html; charset=utf-8", location=None):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if location:
            self.send_header("Location", location)
        self.end_headers()
        self.wfile.write(data)

    def json(self, code, obj):
        self.send(code, json.dumps(obj), "application/json")

    def identity(self):
        return self.headers.get("X-Commons-Identity", "")

    def refused(self, code, problem, as_json):
        """A data API refusal, said to the user (with where to consent)."""
        if as_json:
            return self.json(code, problem)
        url = consent_url(problem)
        if code == 403 and url:
            body = (
                "<h1>Notes</h1><div class=problem><p>Notes keeps your notes in your own "
                "DataCommons repository, not on its own. It may do so only once you allow it.</p>"
                f"<p><a href='{html.escape(url)}'>Review what Notes asks for and allow it</a></p></div>"
            )
            return self.send(403, page("Notes: allow it first", body))
        detail = html.escape((problem or {}).get("detail") or (problem or {}).get("title") or "")
        return self.send(code, page("Notes", f"<h1>Notes</h1><div class=problem>{detail}</div>"))

    def notes(self):
        status, body = call("GET", RECORDS + "?limit=100", self.identity())
        if status != 200:
            return status, body
        notes = sorted(body.get("records", []), key=lambda r: r["value"].get("createdAt", ""), reverse=True)
        return 200, notes

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            return self.json(200, {"ok": True})
        if path == "/api/notes":
            status, notes = self.notes()
            if status != 200:
                return self.refused(status, notes, True)
            return self.json(200, [{"rkey": n["rkey"], **n["value"], "provenance": n["provenance"]} for n in notes])
        if path != "/":
            return self.send(404, page("Not found", "<h1>Not found</h1>"))
        status, notes = self.notes()
        if status != 200:
            return self.refused(status, notes, False)
        items = "".join(
            "<div class=note>"
            f"<h2>{html.escape(n['value'].get('title') or 'Untitled')}</h2>"
            f"<p>{html.escape(n['value'].get('text', ''))}</p>"
            f"<div class=meta>{html.escape(n['value'].get('createdAt', ''))} · "
            f"<form class=inline method=post action='/notes/{html.escape(n['rkey'])}/delete'>"
            "<button>Delete</button></form></div></div>"
            for n in notes
        ) or "<p class=meta>No notes yet.</p>"
        body = (
            "<h1>Notes</h1>"
            "<form method=post action=/notes>"
            "<p><input type=text name=title placeholder=Title maxlength=200></p>"
            "<p><textarea name=text rows=4 required placeholder='Write a note' maxlength=20000></textarea></p>"
            "<p><button>Save</button> <span class=meta>Kept in your DataCommons repository: "
            "see, export or erase it under My data in the console.</span></p></form>"
            f"{items}"
        )
        self.send(200, page("Notes", body))

    def read_body(self):
        length = min(int(self.headers.get("Content-Length") or 0), 64 * 1024)
        raw = self.rfile.read(length)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(raw or b"{}"), True
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        return {k: v[0] for k, v in form.items()}, False

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        try:
            fields, as_json = self.read_body()
        except ValueError:
            return self.json(400, {"title": "Bad request", "detail": "the body is not JSON"})
        if path == "/api/notes" and isinstance(fields, list):
            # Several notes at once: one commit, all of them or none.
            writes = [{"collection": NSID, "create": True, "value": note_value(f)} for f in fields]
            status, body = call("POST", "/data/v1/batch", self.identity(), {"writes": writes})
            if status != 200:
                return self.refused(status, body, True)
            return self.json(201, body["results"])
        if path in ("/notes", "/api/notes"):
            status, body = call("POST", RECORDS, self.identity(), {"value": note_value(fields)})
            if status not in (200, 201):
                return self.refused(status, body, as_json or path.startswith("/api/"))
            if path.startswith("/api/"):
                return self.json(201, body)
            return self.send(303, b"", location="/")
        m = re.fullmatch(r"/(?:api/)?notes/([^/]+)/delete", path)
        if m and RKEY.match(m.group(1)):
            status, body = call("DELETE", f"{RECORDS}/{m.group(1)}", self.identity())
            if status not in (200, 204):
                return self.refused(status, body, path.startswith("/api/"))
            if path.startswith("/api/"):
                return self.json(200, {"deleted": m.group(1)})
            return self.send(303, b"", location="/")
        self.send(404, page("Not found", "<h1>Not found</h1>"))

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Notes).serve_forever()
