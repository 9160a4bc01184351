"""A hosted application signing a user in with the platform, using a real
OpenID Connect client library (Authlib, from PyPI): discovery, the
authorization-code flow with PKCE, the user's log-in and consent (as their
browser would send them), the token exchange, the ID token checked against
the published JWKS, userinfo; then a code reused, and a user who says no.

Usage: oidc_client.py BASE_URL CLIENT_ID CLIENT_SECRET EMAIL PASSWORD
Prints one JSON object of what it saw.
"""

import html.parser
import json
import sys
from urllib.parse import parse_qs, urljoin, urlparse

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from authlib.jose import JsonWebKey, jwt

base, client_id, client_secret, email, password = sys.argv[1:6]
redirect_uri = "http://app.localhost/callback"


class Inputs(html.parser.HTMLParser):
    """The named inputs of a page's forms."""

    def __init__(self):
        super().__init__()
        self.fields = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and "name" in a:
            self.fields[a["name"]] = a.get("value", "")


def consent_page(browser, url):
    """Follows the sign-in to the consent page: log-in form first if needed."""
    r = browser.get(url, allow_redirects=False)
    if r.status_code in (302, 303, 307):
        login = urljoin(base, r.headers["location"])
        assert urlparse(login).path == "/console/login", login
        nxt = parse_qs(urlparse(login).query)["next"][0]
        r = browser.post(
            base + "/console/login",
            data={"email": email, "password": password, "next": nxt},
            allow_redirects=False,
        )
        assert r.status_code == 303, (r.status_code, r.text)
        r = browser.get(urljoin(base, r.headers["location"]), allow_redirects=False)
    assert r.status_code == 200 and "asks to know" in r.text, (r.status_code, r.text)
    p = Inputs()
    p.feed(r.text)
    return r.text, p.fields


conf = requests.get(base + "/.well-known/openid-configuration").json()
client = OAuth2Session(
    client_id,
    client_secret,
    scope="openid profile email",
    redirect_uri=redirect_uri,
    code_challenge_method="S256",
    token_endpoint_auth_method="client_secret_basic",
)
verifier = generate_token(48)
nonce = generate_token(16)
url, state = client.create_authorization_url(
    conf["authorization_endpoint"], code_verifier=verifier, nonce=nonce
)

browser = requests.Session()
page, fields = consent_page(browser, url)
fields["decision"] = "allow"
r = browser.post(base + "/oidc/authorize", data=fields, allow_redirects=False)
assert r.status_code == 303, (r.status_code, r.text)
callback = r.headers["location"]
assert callback.startswith(redirect_uri), callback
token = client.fetch_token(
    conf["token_endpoint"],
    authorization_response=callback,
    code_verifier=verifier,
    state=state,
)

keys = JsonWebKey.import_key_set(requests.get(conf["jwks_uri"]).json())
claims = jwt.decode(
    token["id_token"],
    keys,
    claims_options={
        "iss": {"essential": True, "value": conf["issuer"]},
        "aud": {"essential": True, "value": client_id},
        "nonce": {"essential": True, "value": nonce},
    },
)
claims.validate()
userinfo = client.get(conf["userinfo_endpoint"]).json()

# The same code again: refused.
code = parse_qs(urlparse(callback).query)["code"][0]
again = requests.post(
    conf["token_endpoint"],
    data={
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    },
    auth=(client_id, client_secret),
)

# A second sign-in, with the wrong verifier at the exchange.
verifier2 = generate_token(48)
url2, state2 = client.create_authorization_url(
    conf["authorization_endpoint"], code_verifier=verifier2, nonce=nonce
)
_, fields = consent_page(browser, url2)
fields["decision"] = "allow"
r = browser.post(base + "/oidc/authorize", data=fields, allow_redirects=False)
code2 = parse_qs(urlparse(r.headers["location"]).query)["code"][0]
wrong_verifier = requests.post(
    conf["token_endpoint"],
    data={
        "grant_type": "authorization_code",
        "code": code2,
        "redirect_uri": redirect_uri,
        "code_verifier": generate_token(48),
        "client_id": client_id,
        "client_secret": client_secret,
    },
)

# The user says no.
url3, state3 = client.create_authorization_url(
    conf["authorization_endpoint"], code_verifier=generate_token(48)
)
_, fields = consent_page(browser, url3)
fields["decision"] = "deny"
r = browser.post(base + "/oidc/authorize", data=fields, allow_redirects=False)
denied = parse_qs(urlparse(r.headers["location"]).query)

print(
    json.dumps(
        {
            "consent_page": page,
            "claims": dict(claims),
            "header_alg": json.loads(
                __import__("base64").urlsafe_b64decode(
                    token["id_token"].split(".")[0] + "=="
                )
            )["alg"],
            "userinfo": userinfo,
            "reused": [again.status_code, again.json()],
            "wrong_verifier": [wrong_verifier.status_code, wrong_verifier.json()],
            "denied": {k: v[0] for k, v in denied.items()},
            "denied_state_ok": denied.get("state", [""])[0] == state3,
        }
    )
)
