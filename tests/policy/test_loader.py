"""Loading policy files: every bad policy is refused with its file, line, key, the bad value and
what would be valid, so that a user can fix it without reading the source.

Each row of the big table is one policy text, the problem it must produce (line and key) and the
words that problem's message must hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from egresslock.errors import PolicyError, PolicyProblem
from egresslock.policy import Policy, load_policy, parse_policy, strict_warnings

FILE = "policy.yaml"


def problems_of(text: str) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, FILE)
    assert info.value.problems, "a PolicyError must carry at least one problem"
    return info.value.problems


def rule(body: str) -> str:
    """A policy of one rule; ``body`` is the rule's keys after ``id``, one per line, indented 4.

    Line 3 holds ``- id: r``, so the first line of ``body`` is line 4.
    """
    return "version: 1\nrules:\n  - id: r\n" + body


BAD_POLICIES = [
    # --- unknown keys, at every level ---
    pytest.param("version: 1\nfoo: 1\n", 2, "foo",
                 ["unknown key 'foo'", "valid keys here: version, mode, network, rules"],
                 id="unknown top-level key"),
    pytest.param("version: 1\nnetwork:\n  block_private: true\n  allow_range: []\n", 4,
                 "network.allow_range",
                 ["unknown key 'allow_range'", "valid keys here: block_private, allow_ranges"],
                 id="unknown key in network"),
    pytest.param(rule("    host: a.example\n    method: [GET]\n"), 5, "rules[0].method",
                 ["unknown key 'method'", "methods"], id="misspelt methods in a rule"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n"
                      "    query: {params: [a], max_len: 3}\n"), 6, "rules[0].query.max_len",
                 ["unknown key 'max_len'", "valid keys here: params, max_value_len"],
                 id="unknown key in query limits"),
    pytest.param("version: 1\nsecrets:\n  - {name: x, env: X, vaule: 1}\n", 3, "secrets[0].vaule",
                 ["unknown key 'vaule'", "name, value, env, file"], id="unknown key in a secret"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, env: X, hosts: [a.example], "
                 "headers: [A], extra: 1}\n", 3, "credentials[0].extra",
                 ["unknown key 'extra'", "hosts, headers"], id="unknown key in a credential"),
    pytest.param("version: 1\noutput:\n  img: []\n", 3, "output.img",
                 ["unknown key 'img'", "valid keys here: images, links"],
                 id="unknown key in output"),
    pytest.param("version: 1\noutput:\n  images:\n    - host: a.example\n      path: [/x]\n", 5,
                 "output.images[0].path", ["unknown key 'path'", "valid keys here: host, paths"],
                 id="unknown key in an output target"),
    pytest.param("version: 1\n1: x\n", 2, "", ["key 1 must be a string"],
                 id="a non-string key"),
    # --- bad globs ---
    pytest.param(rule("    host: '*'\n"), 4, "rules[0].host", ["'*' would allow every host"],
                 id="star host"),
    pytest.param(rule("    host: '*.com'\n"), 4, "rules[0].host",
                 ["'*.com'", "top-level domain", "'*.example.com'"], id="star on a TLD"),
    pytest.param(rule("    host: 'login.*.example.com'\n"), 4, "rules[0].host",
                 ["'login.*.example.com'", "a wildcard is written '*.example.com'"],
                 id="star in the middle of a host"),
    pytest.param(rule("    host: '**.example.com'\n"), 4, "rules[0].host",
                 ["'**.example.com'", "'*.example.com'"], id="double star host"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    paths: ['/a**']\n"), 6,
                 "rules[0].paths[0]", ["'/a**'", "'**' must be a whole segment, like '/a/**/b'"],
                 id="double star inside a path segment"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    paths: ['a/b']\n"), 6,
                 "rules[0].paths[0]", ["'a/b'", "must begin with '/'"], id="relative path"),
    pytest.param("version: 1\noutput:\n  links: [{host: '*.com'}]\n", 3, "output.links[0].host",
                 ["'*.com'"], id="bad glob in output links"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, env: X, hosts: ['*'], headers: [A]}\n",
                 3, "credentials[0].hosts[0]", ["'*' would allow every host"],
                 id="bad glob in credential hosts"),
    # --- names that are not hosts ---
    pytest.param(rule("    host: 'a b.example'\n"), 4, "rules[0].host",
                 ["'a b.example'", "' '", "no hostname may hold"], id="space in a host"),
    pytest.param(rule("    host: 'xn--zz.example'\n"), 4, "rules[0].host",
                 ["'xn--zz'", "invalid Punycode", "must be the A-label of a name IDNA 2008 "
                  "accepts, like 'xn--e1aybc'"], id="bad punycode"),
    pytest.param(rule("    host: '\U0001f4a9.example'\n"), 4, "rules[0].host",
                 ["cannot be written in Punycode", "labels are a-z, 0-9, '-' and '_', or "
                  "letters and digits IDNA 2008 accepts"], id="a name that cannot be punycoded"),
    pytest.param(rule("    host: 'http://a.example/'\n"), 4, "rules[0].host",
                 ["'/'", "no hostname may hold"], id="a URL instead of a host"),
    # --- duplicates ---
    pytest.param("version: 1\nrules:\n  - id: a\n    host: a.example\n  - id: a\n"
                 "    host: b.example\n", 5, "rules[1].id",
                 ["id 'a' is already used by rules[0] (line 3)", "must be unique"],
                 id="duplicate rule id"),
    pytest.param("version: 1\nsecrets:\n  - {name: k, env: A}\n  - {name: k, env: B}\n", 4,
                 "secrets[1].name", ["name 'k' is already used by secrets[0]"],
                 id="duplicate secret name"),
    pytest.param(rule("    host: a.example\n    host: b.example\n"), 5, "rules[0].host",
                 ["key 'host' appears twice", "first on line 4", "remove one"],
                 id="duplicate YAML key"),
    pytest.param("version: 1\nmode: enforce\nmode: report\n", 3, "mode",
                 ["key 'mode' appears twice", "first on line 2"],
                 id="duplicate top-level YAML key"),
    # --- CIDRs ---
    pytest.param("version: 1\nnetwork:\n  allow_ranges:\n    - 10.0.0.0/8\n    - 10.0.0.1/8\n", 5,
                 "network.allow_ranges[1]",
                 ["'10.0.0.1/8'", "host bits set", "like '10.0.0.0/8'"],
                 id="CIDR with host bits"),
    pytest.param("version: 1\nnetwork:\n  allow_ranges: [300.0.0.0/8]\n", 3,
                 "network.allow_ranges[0]", ["'300.0.0.0/8'", "not a valid CIDR"],
                 id="CIDR out of range"),
    pytest.param("version: 1\nnetwork:\n  allow_ranges: [internal]\n", 3,
                 "network.allow_ranges[0]", ["'internal'", "not a valid CIDR"],
                 id="a name as a CIDR"),
    # --- HTTPS constraints need inspection ---
    pytest.param(rule("    host: a.example\n    methods: [GET]\n"), 5, "rules[0].methods",
                 ["rule 'r' constrains methods on HTTPS port 443", "add 'inspect: true'",
                  "ports' to plain-HTTP ports such as [80]"],
                 id="methods on 443 without inspect"),
    pytest.param(rule("    host: a.example\n    ports: [443]\n    paths: ['/x']\n"), 6,
                 "rules[0].paths", ["constrains paths on HTTPS port 443"],
                 id="paths on 443 without inspect"),
    pytest.param(rule("    host: a.example\n    ports: [443]\n    query: deny\n"), 6,
                 "rules[0].query", ["constrains query on HTTPS port 443"],
                 id="query on 443 without inspect"),
    pytest.param(rule("    host: a.example\n    ports: [443]\n    max_body_bytes: 0\n"), 6,
                 "rules[0].max_body_bytes", ["constrains max_body_bytes on HTTPS port 443"],
                 id="body cap on 443 without inspect"),
    pytest.param(rule("    host: a.example\n    ports: [8443]\n    paths: ['/x']\n"), 6,
                 "rules[0].paths", ["HTTPS port 8443"], id="paths on 8443 without inspect"),
    pytest.param(rule("    host: a.example\n    action: deny\n    methods: [POST]\n"), 6,
                 "rules[0].methods", ["constrains methods on HTTPS port 443"],
                 id="a deny rule's methods on 443 need inspect too"),
    # --- deny rules match by host, ports, methods, paths only ---
    pytest.param(rule("    host: a.example\n    ports: [80]\n    action: deny\n    query: deny\n"),
                 7, "rules[0].query",
                 ["rule 'r' is a deny rule", "query belongs on an allow rule"],
                 id="deny rule with query"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    action: deny\n"
                      "    max_body_bytes: 10\n"), 7, "rules[0].max_body_bytes",
                 ["max_body_bytes belongs on an allow rule"], id="deny rule with body cap"),
    # --- strict types: no coercion ---
    pytest.param(rule("    host: a.example\n    ports: ['443']\n"), 5, "rules[0].ports[0]",
                 ["valid integer", "(got '443')"], id="port as a string"),
    pytest.param(rule("    host: a.example\n    ports: [true]\n"), 5, "rules[0].ports[0]",
                 ["valid integer", "(got True)"], id="port as a boolean"),
    pytest.param(rule("    host: a.example\n    ports: [0]\n"), 5, "rules[0].ports[0]",
                 ["greater than or equal to 1", "(got 0)"], id="port 0"),
    pytest.param(rule("    host: a.example\n    ports: [65536]\n"), 5, "rules[0].ports[0]",
                 ["less than or equal to 65535", "(got 65536)"], id="port 65536"),
    pytest.param(rule("    host: a.example\n    ports: []\n"), 5, "rules[0].ports",
                 ["at least 1 item"], id="no ports"),
    pytest.param(rule("    host: a.example\n    inspect: 'true'\n"), 5, "rules[0].inspect",
                 ["valid boolean", "(got 'true')"], id="inspect as a string"),
    pytest.param(rule("    host: a.example\n    inspect: yes please\n"), 5, "rules[0].inspect",
                 ["valid boolean", "(got 'yes please')"], id="inspect as words"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    max_body_bytes: 1.5\n"), 6,
                 "rules[0].max_body_bytes", ["valid integer", "(got 1.5)"],
                 id="body cap as a float"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    max_body_bytes: -1\n"), 6,
                 "rules[0].max_body_bytes", ["greater than or equal to 0", "(got -1)"],
                 id="negative body cap"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    methods: [get]\n"), 6,
                 "rules[0].methods[0]", ["'get'", "upper-case HTTP method name, like GET"],
                 id="lower-case method"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    methods: GET\n"), 6,
                 "rules[0].methods", ["valid list", "(got 'GET')"], id="method not in a list"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    query: maybe\n"), 6,
                 "rules[0].query", ["'allow', 'deny' or a mapping", "(got 'maybe')"],
                 id="query as a word"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    query: {params: page}\n"), 6,
                 "rules[0].query.params", ["valid list", "(got 'page')"],
                 id="query params not a list"),
    pytest.param(rule("    host: a.example\n    action: block\n"), 5, "rules[0].action",
                 ["'allow' or 'deny'", "(got 'block')"], id="unknown action"),
    pytest.param("version: 1\nrules:\n  - id: 'bad id'\n    host: a.example\n", 3, "rules[0].id",
                 ["'bad id'", "1-64 characters of letters, digits"], id="bad rule id"),
    pytest.param("version: 1\nrules:\n  - host: a.example\n", 3, "rules[0].id", ["is required"],
                 id="missing rule id"),
    pytest.param("version: 1\nrules: {id: a}\n", 2, "rules", ["valid list"],
                 id="rules as a mapping"),
    pytest.param("version: 2\n", 1, "version", ["(got 2)"], id="version 2"),
    pytest.param("version: true\n", 1, "version", ["integer 1", "(got True)"],
                 id="version as a boolean"),
    pytest.param("version: 1.0\n", 1, "version", ["integer 1", "(got 1.0)"],
                 id="version as a float"),
    pytest.param("version: '1'\n", 1, "version", ["integer 1", "(got '1')"],
                 id="version as a string"),
    pytest.param("mode: enforce\n", 1, "version", ["is required"], id="missing version"),
    pytest.param("version: 1\nmode: audit\n", 2, "mode",
                 ["'enforce' or 'report'", "(got 'audit')"], id="unknown mode"),
    pytest.param("version: 1\nnetwork:\n  block_private: 1\n", 3, "network.block_private",
                 ["valid boolean", "(got 1)"], id="block_private as a number"),
    # --- secrets and credentials need exactly one source ---
    pytest.param("version: 1\nsecrets:\n  - {name: x}\n", 3, "secrets[0]",
                 ["secret 'x' must have exactly one of value, env or file (has none)"],
                 id="secret without a source"),
    pytest.param("version: 1\nsecrets:\n  - {name: x, env: X, value: y}\n", 3, "secrets[0]",
                 ["exactly one of value, env or file (has value, env)"],
                 id="secret with two sources"),
    pytest.param("version: 1\nsecrets:\n  - {name: x, env: 'NOT A VAR'}\n", 3, "secrets[0]",
                 ["'NOT A VAR'", "not an environment variable name"],
                 id="secret with a bad env name"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, hosts: [a.example], headers: [A]}\n",
                 3, "credentials[0]",
                 ["credential 'x' must have exactly one of value, env or file (has none)"],
                 id="credential without a source"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, env: X, file: /f, hosts: [a.example], "
                 "headers: [A]}\n", 3, "credentials[0]", ["(has env, file)"],
                 id="credential with two sources"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, env: X, hosts: [], headers: [A]}\n",
                 3, "credentials[0].hosts", ["at least 1 item"], id="credential without hosts"),
    pytest.param("version: 1\ncredentials:\n  - {name: x, env: X, hosts: [a.example], "
                 "headers: ['Bad Header']}\n", 3, "credentials[0].headers[0]",
                 ["'Bad Header'", "not a valid HTTP header name"], id="bad header name"),
    # --- not a policy at all ---
    pytest.param("", None, "", ["is empty", "begins with 'version: 1'"], id="empty file"),
    pytest.param("# only a comment\n", None, "", ["is empty"], id="only a comment"),
    pytest.param("version: 1\n---\nversion: 1\n", None, "",
                 ["holds 2 documents", "one YAML mapping"], id="two documents"),
    pytest.param("- a\n- b\n", 1, "", ["must be a YAML mapping"], id="a list"),
    pytest.param("just words\n", 1, "", ["must be a YAML mapping"], id="a scalar"),
    pytest.param("version: 1\nrules: [\n", 3, "", ["not valid YAML"], id="unclosed flow list"),
    pytest.param("version: 1\nrules:\n  - id: a\n   host: b\n", 4, "", ["not valid YAML"],
                 id="bad indentation, with its line"),
    pytest.param("version: 1\nrules:\n\t- id: a\n", 3, "", ["not valid YAML"], id="a tab"),
    pytest.param("version: 1\nmode: !foo x\n", 2, "", ["not valid YAML", "'!foo'"],
                 id="an unknown tag"),
    pytest.param("version: 1\nmode: !!python/object/apply:os.system [id]\n", 2, "",
                 ["not valid YAML", "python/object/apply:os.system"],
                 id="a python tag is never constructed"),
    pytest.param("version: 1\nrules: !!set {a: null}\n", 2, "",
                 ["not valid YAML", "the tag 'tag:yaml.org,2002:set' is not allowed"],
                 id="a tag on a collection"),
    pytest.param("version: 1\n<<: {mode: report}\n", 2, "", ["not valid YAML", "merge"],
                 id="a merge key"),
    pytest.param("version: 1\nmode: *nowhere\n", 2, "", ["not valid YAML"],
                 id="an undefined alias"),
]


@pytest.mark.parametrize(("text", "line", "key", "needles"), BAD_POLICIES)
def test_bad_policy_is_refused_with_line_key_and_what_is_valid(
    text: str, line: int | None, key: str, needles: list[str]
) -> None:
    problems = problems_of(text)
    found = [p for p in problems if p.key == key]
    assert found, f"no problem for key {key!r} in {problems}"
    problem = found[0]
    assert problem.file == FILE
    assert problem.line == line, problem
    for needle in needles:
        assert needle in problem.message, (needle, problem.message)


def test_every_problem_is_reported_not_only_the_first() -> None:
    text = (
        "version: 1\n"
        "rules:\n"
        "  - id: a\n"
        "    host: '*.com'\n"
        "    method: [GET]\n"
        "  - id: a\n"
        "    host: b.example\n"
        "network:\n"
        "  allow_ranges: [10.0.0.1/8]\n"
    )
    keys = {(p.key, p.line) for p in problems_of(text)}
    assert keys >= {("rules[0].host", 4), ("rules[0].method", 5), ("rules[1].id", 6),
                    ("network.allow_ranges[0]", 9)}


def test_problem_str_names_file_line_and_key() -> None:
    problem = problems_of(rule("    host: '*'\n"))[0]
    assert str(problem).startswith(f"{FILE}:4: rules[0].host: ")
    error = PolicyError([problem])
    assert str(problem) in str(error)


@pytest.mark.parametrize("text", [
    pytest.param(rule("    host: a.example\n    ports: [80]\n    methods: [GET]\n"
                      "    paths: ['/x']\n    query: deny\n    max_body_bytes: 0\n"),
                 id="constraints on plain HTTP need no inspection"),
    pytest.param(rule("    host: a.example\n    inspect: true\n    methods: [GET]\n"
                      "    paths: ['/x']\n    query: {params: [a], max_value_len: 3}\n"
                      "    max_body_bytes: 0\n"), id="constraints on HTTPS with inspection"),
    pytest.param(rule("    host: a.example\n    action: deny\n"), id="a host-only deny rule"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    action: deny\n"
                      "    methods: [POST]\n    paths: ['/admin/**']\n"),
                 id="a deny rule with methods and paths on plain HTTP"),
    pytest.param(rule("    host: '*.example.com'\n"), id="a wildcard rule"),
    pytest.param(rule("    host: '[::1]'\n    ports: [8080]\n"), id="an IPv6 literal rule"),
    pytest.param(rule("    host: тест.example\n"), id="an IDN rule"),
    pytest.param("version: 1\n", id="the smallest policy"),
    pytest.param("version: 1\nsecrets:\n  - {name: k, file: /run/k}\ncredentials:\n"
                 "  - {name: T, value: v, hosts: ['*.example.com'], headers: [Authorization]}\n",
                 id="secrets and credentials with one source each"),
])
def test_good_policy_loads(text: str) -> None:
    assert isinstance(parse_policy(text, FILE), Policy)


def test_the_shipped_starter_policy_loads() -> None:
    starter = Path(__file__).resolve().parents[2] / "src" / "egresslock" / "policy" / "starter.yaml"
    policy = load_policy(starter)
    assert [r.id for r in policy.rules][:1] == ["github-read"]


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - id: a\n    host: '*'\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.problems[0].file == str(path)
    assert str(info.value).startswith(f"{path}:4: rules[0].host:")


def test_load_policy_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "absent.yaml")
    assert "cannot be read" in str(info.value)


def test_load_policy_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert "cannot be read" in str(info.value)


def test_defaults_of_a_rule() -> None:
    r = parse_policy(rule("    host: a.example\n")).rules[0]
    assert (r.ports, r.methods, r.paths, r.query, r.max_body_bytes, r.inspect, r.action) == (
        [80, 443], None, None, "allow", None, False, "allow")


def test_defaults_of_a_policy() -> None:
    policy = parse_policy("version: 1\n")
    assert policy.mode == "enforce"
    assert policy.network.block_private is True
    assert policy.network.allow_ranges == []


# --- strict warnings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param(rule("    host: a.example\n"),
                 ["rule 'r' states no methods, paths, max_body_bytes, query: any value is allowed"],
                 id="a host-only rule states no limits"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    methods: [GET]\n"),
                 ["rule 'r' states no paths, max_body_bytes, query: any value is allowed"],
                 id="methods only"),
    pytest.param(rule("    host: a.example\n    ports: [80]\n    methods: [GET]\n"
                      "    paths: ['/x']\n    query: deny\n    max_body_bytes: 0\n"),
                 [], id="a rule that states every limit"),
    pytest.param(rule("    host: a.example\n    action: deny\n"), [],
                 id="deny rules need no limits"),
    pytest.param("version: 1\nmode: report\n",
                 ["mode is 'report': nothing is denied, denials are only logged"],
                 id="report mode"),
    pytest.param("version: 1\nnetwork: {block_private: false}\n",
                 ["network.block_private is false: private and metadata addresses are reachable"],
                 id="block_private off"),
])
def test_strict_warnings(text: str, expected: list[str]) -> None:
    assert strict_warnings(parse_policy(text)) == expected


@pytest.mark.parametrize(("text", "key", "needle"), [
    pytest.param("version: 1\nrules:\n  - {id: a, host: a.example, ports: [0443]}\n",
                 "rules[0].ports[0]", "'0443'", id="yaml-1.1-octal-port-is-not-291"),
    pytest.param("version: 1\nrules:\n  - {id: a, host: a.example, ports: [80], inspect: yes}\n",
                 "rules[0].inspect", "write true or false", id="yaml-1.1-yes-is-not-a-boolean"),
    pytest.param("version: 1\nnetwork: {block_private: off}\n", "network.block_private",
                 "'off'", id="yaml-1.1-off-is-not-a-boolean"),
    pytest.param("version: 1\nrules:\n  - {id: a, host: a.example, methods: []}\n",
                 "rules[0].methods", "at least 1", id="empty-methods-list"),
    pytest.param("version: 1\nsecrets:\n  - {name: '', value: x}\n", "secrets[0].name",
                 "at least 1", id="empty-secret-name"),
])
def test_yaml_1_1_coercions_and_empty_lists_are_refused(text: str, key: str,
                                                         needle: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    problems = {p.key: p.message for p in err.value.problems}
    assert key in problems, problems
    assert needle in problems[key], problems[key]
