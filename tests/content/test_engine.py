"""``ContentPolicy``: one policy's content checks asked the way the proxy asks them.

Every row is a request (rule, host, URL, headers) and the decision it must get: refused with a
reason that names what was found (a secret by name, never its value) and where, or prepared
with the headers and target to send and the changes the audit row records. Bodies go through
:class:`BodyFilter` as plain, chunk-split and gzip streams; names through ``name_refusal``.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable

import pytest

from egresslock.content.engine import BodyFilter, ContentPolicy, ContentRefusal, Prepared
from egresslock.content.transform import hash_value
from egresslock.errors import InputError
from egresslock.policy import parse_policy
from tests.content.helpers import json_escaped, percent_subset

CANARY = "CANARY-7f3a9c2e51b84d60"
PASSPHRASE = "correct horse battery staple"
DB_PASSWORD = "pg-Secr3t-Passw0rd-99"
REAL_TOKEN = "ghp_R8kq2ZbV1mXc9Lp4Tn7Ws0Yd3Fh6Ja5Ue2Qo"
KEY = b"k" * 32

POLICY = """
version: 1
mode: {mode}
rules:
  - id: api
    host: api.example.com
    inspect: true
    headers: {{strip: [User-Agent]}}
    hash_query: [user]
  - id: gh
    host: api.github.com
    inspect: true
  - id: json
    host: log.example.com
    inspect: true
    hash_json: [/user/email]
    redact_json: [/prompt]
  - id: cdn
    host: "*.cdn.example"
  - id: open
    host: open.example
    dynamic_links: allow
  - id: limited
    host: limited.example
    dynamic_links: allow
    budget: {{requests: 2, per: run}}
  - id: loose
    host: loose.example
    dynamic_links: {{max_data_bytes: 64}}
secrets:
  - name: canary
    value: {canary}
  - name: passphrase
    value: {passphrase}
  - name: db-password
    env: DB_PASSWORD
  - name: unset
    env: NOT_SET_ANYWHERE
credentials:
  - name: GITHUB_TOKEN
    env: REAL_GITHUB_TOKEN
    hosts: [api.github.com]
    headers: [Authorization, X-Api-Key]
  - name: SEARCH_KEY
    value: search-real-key-0123456789
    hosts: [api.github.com]
    headers: [X-Search-Key]
budget: {{bytes_out: {run_bytes}, per: run}}
"""


def content(mode: str = "enforce", run_bytes: str = "1MiB") -> ContentPolicy:
    text = POLICY.format(mode=mode, canary=CANARY, passphrase=PASSPHRASE, run_bytes=run_bytes)
    return ContentPolicy(parse_policy(text),
                         environ={"DB_PASSWORD": DB_PASSWORD, "REAL_GITHUB_TOKEN": REAL_TOKEN},
                         key=lambda: KEY)


Headers = list[tuple[bytes, bytes]]


def prepare(c: ContentPolicy, rule: str, host: str, target: str, headers: Headers | None = None,
            encoding: bytes | None = None, body: bool = False) -> Prepared:
    """Ask ``c`` about one request as the proxy does, with a Host header first."""
    path, q, query = target.partition("?")
    return c.prepare(rule, host, path, query if q else None,
                     [(b"Host", host.encode()), *(headers or [])], encoding, body)


def placeholder(c: ContentPolicy, name: str = "GITHUB_TOKEN") -> bytes:
    return next(b.placeholder for b in c.bindings if b.name == name)


def test_sources_loaded_and_warned() -> None:
    c = content()
    assert c.scanner.names[:3] == ("canary", "passphrase", "db-password")
    assert len(c.warnings) == 1
    assert "NOT_SET_ANYWHERE is not set" in c.warnings[0]
    assert [b.name for b in c.bindings] == ["GITHUB_TOKEN", "SEARCH_KEY"]


# -- secrets in the URL and headers -----------------------------------------------------------

B = CANARY.encode()

# (why, URL target on rule "open", the phrase the refusal must hold)
URL_ROWS: list[tuple[str, str, str]] = [
    ("plain in the path", f"/upload/{CANARY}", "secret canary in the URL (plain)"),
    ("plain in the query", f"/s?q={CANARY}", "secret canary in the URL (plain)"),
    ("lower-cased", f"/s?q={CANARY.lower()}", "secret canary in the URL (plain)"),
    ("base64", "/s?d=" + base64.b64encode(b"id=" + B).decode().replace("=", "%3D"),
     "secret canary in the URL (base64"),
    ("base64url in the path", "/p/" + base64.urlsafe_b64encode(b"xy" + B).decode().rstrip("="),
     "secret canary in the URL (base64"),
    ("hex", f"/s?h={B.hex()}", "secret canary in the URL (hex)"),
    ("hex upper-case", f"/s?h={B.hex().upper()}", "secret canary in the URL (hex)"),
    ("percent-encoded subset", "/s?q=" + percent_subset(B, 1).decode(),
     "secret canary in the URL (plain, percent-encoded)"),
    ("percent-encoded twice", "/s?q=" + percent_subset(B, 2, twice=True).decode(),
     "secret canary in the URL (plain, percent-encoded twice)"),
    ("+ for space", "/s?q=" + PASSPHRASE.replace(" ", "+"),
     "secret passphrase in the URL (plain, form-encoded)"),
    ("a secret read from the environment", f"/s?pw={DB_PASSWORD}",
     "secret db-password in the URL (plain)"),
]


@pytest.mark.parametrize(("target", "phrase"), [r[1:] for r in URL_ROWS],
                         ids=[r[0] for r in URL_ROWS])
def test_secret_in_url_refused(target: str, phrase: str) -> None:
    with pytest.raises(ContentRefusal) as info:
        prepare(content(), "open", "open.example", target)
    assert info.value.rule_id == "open"
    assert phrase in info.value.reason
    for value in (CANARY, PASSPHRASE, DB_PASSWORD):
        assert value.lower() not in info.value.reason.lower()


# (why, headers, phrase)
HEADER_ROWS: list[tuple[str, Headers, str]] = [
    ("custom header", [(b"X-Debug", B)], "secret canary in the request headers (plain)"),
    ("cookie", [(b"Cookie", b"sid=1; c=" + B.hex().encode())],
     "secret canary in the request headers (hex)"),
    ("basic auth", [(b"Authorization", b"Basic " + base64.b64encode(b"u:" + B))],
     "secret canary in the request headers (base64"),
    ("json escapes", [(b"X-Payload", json_escaped(B))],
     "secret canary in the request headers (plain, escaped)"),
    ("a credential shape", [(b"X-Key", b"AKIAZ7Q3LTRM4XWPY2BN")],
     "credential-shaped value aws-access-key-id in the request headers"),
]


@pytest.mark.parametrize(("headers", "phrase"), [r[1:] for r in HEADER_ROWS],
                         ids=[r[0] for r in HEADER_ROWS])
def test_secret_in_header_refused(headers: Headers, phrase: str) -> None:
    with pytest.raises(ContentRefusal) as info:
        prepare(content(), "open", "open.example", "/", headers)
    assert phrase in info.value.reason
    assert CANARY.lower() not in info.value.reason.lower()


# -- credential placeholders --------------------------------------------------------------------

def test_placeholder_swapped_in_named_header_to_named_host() -> None:
    c = content()
    p = prepare(c, "gh", "api.github.com", "/user",
                [(b"Authorization", b"token " + placeholder(c)), (b"Accept", b"*/*")])
    assert (b"Authorization", b"token " + REAL_TOKEN.encode()) in p.headers
    assert (b"Accept", b"*/*") in p.headers
    assert p.changes == ["credential GITHUB_TOKEN inserted"]
    assert [b.name for b in p.redact] == ["GITHUB_TOKEN", "SEARCH_KEY"]
    assert p.note() == {"changes": ["credential GITHUB_TOKEN inserted"]}


def test_placeholder_swapped_inside_basic_auth() -> None:
    c = content()
    sent = b"Basic " + base64.b64encode(b"x-access-token:" + placeholder(c))
    p = prepare(c, "gh", "api.github.com", "/repos", [(b"Authorization", sent)])
    value = dict(p.headers)[b"Authorization"]
    assert base64.b64decode(value[6:]) == b"x-access-token:" + REAL_TOKEN.encode()


def test_no_placeholder_no_change() -> None:
    p = prepare(content(), "gh", "api.github.com", "/user", [(b"Accept", b"*/*")])
    assert p.changes == []
    assert p.note() is None


# (why, rule, host, target, headers builder, phrase)
PLACEHOLDER_REFUSALS: list[tuple[str, str, str, str, Callable[[bytes], Headers], str]] = [
    ("to another host", "open", "open.example", "/",
     lambda ph: [(b"Authorization", b"token " + ph)],
     "placeholder of credential GITHUB_TOKEN in header authorization of a request to "
     "open.example; it is replaced only in header authorization, x-api-key of requests to "
     "api.github.com"),
    ("in another header", "gh", "api.github.com", "/",
     lambda ph: [(b"X-Other", ph)],
     "placeholder of credential GITHUB_TOKEN in header x-other of a request to api.github.com"),
    ("in the URL", "gh", "api.github.com", "/user?token={ph}", lambda ph: [],
     "placeholder of credential GITHUB_TOKEN in the URL (plain)"),
    ("in the URL, base64", "open", "open.example", "/x?d={ph64}", lambda ph: [],
     "placeholder of credential GITHUB_TOKEN in the URL (base64"),
    ("real value sent by the agent", "gh", "api.github.com", "/user",
     lambda ph: [(b"Authorization", b"token " + REAL_TOKEN.encode())],
     "real value of credential GITHUB_TOKEN in the request headers"),
    ("real value in the URL", "open", "open.example", f"/x?t={REAL_TOKEN}", lambda ph: [],
     "real value of credential GITHUB_TOKEN in the URL"),
]


@pytest.mark.parametrize(("rule", "host", "target", "headers", "phrase"),
                         [r[1:] for r in PLACEHOLDER_REFUSALS],
                         ids=[r[0] for r in PLACEHOLDER_REFUSALS])
def test_placeholder_elsewhere_refused(rule: str, host: str, target: str,
                                       headers: Callable[[bytes], Headers], phrase: str) -> None:
    c = content()
    ph = placeholder(c)
    target = target.format(ph=ph.decode(), ph64=base64.b64encode(b"t:" + ph).decode())
    with pytest.raises(ContentRefusal) as info:
        prepare(c, rule, host, target, headers(ph))
    assert phrase in info.value.reason
    assert REAL_TOKEN not in info.value.reason


def test_two_credentials_for_one_host_each_in_its_header() -> None:
    c = content()
    p = prepare(c, "gh", "api.github.com", "/search",
                [(b"Authorization", b"token " + placeholder(c)),
                 (b"X-Search-Key", placeholder(c, "SEARCH_KEY"))])
    assert sorted(p.changes) == ["credential GITHUB_TOKEN inserted",
                                 "credential SEARCH_KEY inserted"]


def test_report_mode_collects_instead_of_refusing() -> None:
    c = content(mode="report")
    p = prepare(c, "open", "other-host.example", f"/s?q={CANARY}",
                [(b"Authorization", b"token " + placeholder(c))])
    assert len(p.reported) == 2
    assert "secret canary in the URL (plain)" in p.reported[0]
    assert "placeholder of credential GITHUB_TOKEN" in p.reported[1]
    assert p.note() == {"content": p.reported}
    assert c.check_name(B.hex() + ".evil.example") is None
    assert c.name_refusal(B.hex() + ".evil.example") is not None


# -- dynamic links, budgets, transforms -----------------------------------------------------------

SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
DATA40 = base64.urlsafe_b64encode(bytes(range(40, 80))).decode()


@pytest.mark.parametrize(("rule", "host", "target", "phrase"), [
    ("api", "api.example.com", f"/collect?d={DATA40}",
     "dynamic link refused by rule api: URL carries about"),
    ("api", "api.example.com", "/go?next=https://evil.example/", "holds a URL (a nested link)"),
    ("api", "api.example.com", f"/blobs/sha256:{SHA256}", None),
    ("loose", "loose.example", f"/collect?d={DATA40}", None),
    ("loose", "loose.example", f"/c?d={DATA40}&e={DATA40}", "over max_data_bytes 64"),
    ("open", "open.example", f"/c?d={DATA40}&e={DATA40}&u=https://x.example/", None),
    ("cdn", f"{SHA256}.{SHA256[:40]}.cdn.example", "/",
     "dynamic name 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08."),
    ("cdn", "img-eu-1.cdn.example", "/logo.png", None),
])
def test_dynamic_links(rule: str, host: str, target: str, phrase: str | None) -> None:
    if phrase is None:
        prepare(content(), rule, host, target)
        return
    with pytest.raises(ContentRefusal) as info:
        prepare(content(), rule, host, target)
    assert phrase in info.value.reason


def test_rule_budget_refuses_the_third_request() -> None:
    c = content()
    prepare(c, "limited", "limited.example", "/a")
    prepare(c, "limited", "limited.example", "/b")
    with pytest.raises(ContentRefusal, match="rule limited budget of 2 requests per run is spent"):
        prepare(c, "limited", "limited.example", "/c")
    prepare(c, "open", "open.example", "/other-rule-still-fine")


def test_run_budget_cuts_a_body() -> None:
    c = content(run_bytes="2000")
    p = prepare(c, "open", "open.example", "/upload", body=True)
    assert p.body is not None
    p.body.feed(b"x" * 1000)
    with pytest.raises(ContentRefusal, match="run budget of 2000 bytes out per run is spent"):
        p.body.feed(b"x" * 1000)


def test_header_and_query_transforms_listed_in_changes() -> None:
    p = prepare(content(), "api", "api.example.com", "/search?user=alice&page=2",
                [(b"User-Agent", b"curl/8"), (b"Cookie", b"sid=1"), (b"Accept", b"*/*")])
    assert p.target == f"/search?user={hash_value(KEY, 'alice')}&page=2"
    assert [n for n, _ in p.headers] == [b"Host", b"Accept"]
    assert sorted(p.changes) == ["hashed query parameter user", "stripped header cookie",
                                 "stripped header user-agent"]


def test_hash_query_without_a_key_is_an_input_error() -> None:
    c = ContentPolicy(parse_policy(POLICY.format(mode="enforce", canary=CANARY,
                                                 passphrase=PASSPHRASE, run_bytes="1MiB")),
                      environ={})
    with pytest.raises(InputError, match="no key directory"):
        prepare(c, "api", "api.example.com", "/search?user=alice")


# -- bodies ---------------------------------------------------------------------------------------

def _body_filter(c: ContentPolicy, rule: str = "open", host: str = "open.example",
                 encoding: bytes | None = None) -> BodyFilter:
    p = prepare(c, rule, host, "/upload", encoding=encoding, body=True)
    assert p.body is not None
    return p.body


def _send(body: BodyFilter, chunks: list[bytes], released: list[bytes] | None = None) -> bytes:
    """Send ``chunks`` through ``body``; what was released so far is kept in ``released``
    (when given), so a test can look at it after a refusal."""
    out = [] if released is None else released
    for chunk in chunks:
        out.append(body.feed(chunk))
    out.append(body.finish())
    return b"".join(out)


FILLER = json.dumps({"messages": [{"role": "user", "content": "lorem ipsum " * 900}]}).encode()
SECRET_BODY = FILLER[:6000] + b"\"key\": \"" + B.hex().encode() + b"\"" + FILLER[6000:]


@pytest.mark.parametrize("split", [1, 4096, 6005, 6010, 6020, len(SECRET_BODY) - 1])
def test_secret_in_body_split_anywhere(split: int) -> None:
    bf = _body_filter(content())
    released: list[bytes] = []
    with pytest.raises(ContentRefusal) as info:
        _send(bf, [SECRET_BODY[:split], SECRET_BODY[split:]], released)
    assert "secret canary in the body (hex)" in info.value.reason
    assert B.hex().encode()[:4] not in b"".join(released)


def test_clean_body_passes_unchanged_in_any_chunks() -> None:
    for size in (1000, 4096, 65536):
        chunks = [FILLER[i:i + size] for i in range(0, len(FILLER), size)]
        assert _send(_body_filter(content()), chunks) == FILLER


def test_gzip_body_with_secret_refused() -> None:
    data = gzip.compress(SECRET_BODY)
    bf = _body_filter(content(), encoding=b"gzip")
    released: list[bytes] = []
    with pytest.raises(ContentRefusal) as info:
        _send(bf, [data[i:i + 100] for i in range(0, len(data), 100)], released)
    assert "secret canary in the decompressed body (hex)" in info.value.reason
    assert not any(released)  # an encoded body is held until its end


def test_gzip_clean_body_sent_as_it_came() -> None:
    data = gzip.compress(FILLER)
    bf = _body_filter(content(), encoding=b"gzip")
    assert _send(bf, [data[i:i + 333] for i in range(0, len(data), 333)]) == data


@pytest.mark.parametrize(("encoding", "data", "phrase"), [
    (b"zstd", b"whatever", "content encoding 'zstd' cannot be scanned"),
    (b"gzip", b"not gzip", "not valid for its content encoding"),
])
def test_unreadable_body_refused(encoding: bytes, data: bytes, phrase: str) -> None:
    with pytest.raises(ContentRefusal, match=phrase):
        _send(_body_filter(content(), encoding=encoding), [data])


def test_json_body_transformed_and_listed() -> None:
    c = content()
    p = prepare(c, "json", "log.example.com", "/ingest", body=True)
    assert p.body is not None
    assert p.body.whole
    doc = {"user": {"email": "a@example.com"}, "prompt": "tell me", "n": 1}
    raw = json.dumps(doc).encode()
    assert p.body.feed(raw[:10]) == b""
    assert p.body.feed(raw[10:]) == b""
    sent = json.loads(p.body.finish())
    assert sent == {"user": {"email": hash_value(KEY, "a@example.com")},
                    "prompt": "[redacted]", "n": 1}
    assert p.changes == ["hashed /user/email", "redacted /prompt"]


def test_json_rule_refuses_a_non_json_body() -> None:
    bf = _body_filter(content(), "json", "log.example.com")
    bf.feed(b"not json")
    with pytest.raises(ContentRefusal, match="body is not JSON"):
        bf.finish()


def test_json_rule_refuses_an_encoded_body() -> None:
    with pytest.raises(ContentRefusal, match="transforms JSON bodies"):
        _body_filter(content(), "json", "log.example.com", encoding=b"gzip")


def test_placeholder_in_body_refused_even_to_its_host() -> None:
    c = content()
    bf = _body_filter(c, "gh", "api.github.com")
    with pytest.raises(ContentRefusal, match="placeholder of credential GITHUB_TOKEN in the body"):
        _send(bf, [b"{\"token\": \"" + placeholder(c) + b"\"}"])


def test_report_mode_body_passes_through_and_records() -> None:
    c = content(mode="report")
    p = prepare(c, "open", "open.example", "/upload", body=True)
    assert p.body is not None
    assert p.body.feed(SECRET_BODY) == SECRET_BODY
    assert p.body.finish() == b""
    assert any("secret canary in the body" in r for r in p.reported)


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "phrase"), [
    (f"{B.hex()}.evil.example", "holds secret canary in the name (hex)"),
    (".".join(B.hex()[i:i + 8] for i in range(0, 46, 8)) + ".evil.example",
     "holds secret canary across the name's labels (hex)"),
    (base64.b32encode(B).decode().rstrip("=").lower() + ".t.example", "(base32)"),
    (f"{CANARY.lower()}.evil.example", "holds secret canary in the name (plain)"),
    ("pypi.org", None),
    ("files.pythonhosted.org", None),
])
def test_name_refusal(host: str, phrase: str | None) -> None:
    why = content().name_refusal(host)
    if phrase is None:
        assert why is None
    else:
        assert why is not None
        assert phrase in why


def test_name_refusal_reason_does_not_repeat_the_secret() -> None:
    why = content().name_refusal(f"{CANARY.lower()}.evil.example")
    assert why is not None
    assert CANARY.lower() not in why.lower()


def test_placeholder_in_a_name_refused() -> None:
    c = content()
    why = c.name_refusal(placeholder(c).decode().lower() + ".evil.example")
    assert why is not None
    assert "placeholder of credential GITHUB_TOKEN" in why


def test_admit_tunnel_counts_against_the_rule_budget() -> None:
    c = content()
    assert c.admit_tunnel("limited") is None
    assert c.admit_tunnel("limited") is None
    assert c.admit_tunnel("limited") == "rule limited budget of 2 requests per run is spent"


def test_reload_keeps_spent_budgets() -> None:
    old = content()
    for _ in range(2):
        old.admit_tunnel("limited")
    new = content()
    new.adopt_meters(old)
    assert new.admit_tunnel("limited") is not None


def test_audit_rows_never_hold_a_secret_in_host_path_or_sni() -> None:
    """What the proxy logs passes ``scrub``: a secret in the host, path or SNI is redacted,
    every time (the answer is remembered per value), and a clean row is left as it was."""
    from egresslock.audit import AuditRecord
    from egresslock.proxy.context import scrub

    checks = content()
    clean = AuditRecord(layer="http", verdict="allow", rule_id="api", reason="ok",
                        host="api.example.com", path="/v1/items")
    leaky = AuditRecord(layer="tls", verdict="deny", rule_id="default", reason="no",
                        host=f"{CANARY.lower()}.evil.test", path=f"/x?k={CANARY}",
                        extra={"sni": f"{CANARY.lower()}.evil.test", "ended": "reset"})
    for _ in range(3):  # first computed, then remembered: the same answer
        assert scrub(clean, checks) is clean
        out = scrub(leaky, checks)
        assert CANARY.lower() not in str(out).lower()
        assert out.path == "<redacted: it held a secret>"
        assert str(out.host).startswith("<redacted>")
        assert out.extra is not None
        assert str(out.extra["sni"]).startswith("<redacted>")
        assert out.extra["ended"] == "reset"
    assert len(checks.scrubbed) == 2
