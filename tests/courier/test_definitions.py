"""Action definitions checked against the policy: each problem named, with key and reason.

Tables keyed by a sentence: each row is one action definition that must be refused, with the key
the problem must name and words its message must hold.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from egresslock.courier.definitions import check_schema, compile_actions
from egresslock.courier.template import Template, parse_template
from egresslock.errors import PolicyError
from egresslock.policy import compile_policy, parse_policy

BASE = """\
version: 1
network:
  allow_ranges: ["198.51.100.10/32"]
credentials:
  - {name: TOKEN, value: "tok-0123456789abcdefXYZ", hosts: [api.test], headers: [Authorization]}
  - {name: TLS_TOKEN, value: "tok-0123456789abcdefXYZ", hosts: [secure.test],
     headers: [Authorization]}
rules:
  - {id: api, host: api.test, ports: [80], methods: [POST], paths: ["/repos/*/issues"],
     via: courier}
  - {id: open, host: open.test, ports: [80]}
  - {id: secure-plain, host: secure.test, ports: [443]}
  - {id: inspected, host: inspected.test, ports: [443], inspect: true, methods: [POST]}
"""

GOOD_PARAMS: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["repo"],
    "properties": {"repo": {"type": "string", "enum": ["widgets", "gadgets"]},
                   "title": {"type": "string", "pattern": "^[a-z ]{1,40}$", "maxLength": 40}},
}


def _policy(actions: list[dict[str, Any]]) -> str:
    return BASE + yaml.safe_dump({"actions": actions}, sort_keys=False)


def _action(url: str = "http://api.test/repos/{repo}/issues", params: Any = None,
            headers: dict[str, str] | None = None, body: Any = None,
            method: str = "POST") -> dict[str, Any]:
    request: dict[str, Any] = {"method": method, "url": url}
    if headers is not None:
        request["headers"] = headers
    if body is not None:
        request["body"] = body
    return {"name": "act", "request": request,
            "params": GOOD_PARAMS if params is None else params}


def _check(action: dict[str, Any]) -> tuple[dict[str, Template], list[str], list[str]]:
    policy = parse_policy(_policy([action]))
    templates, problems, warnings = compile_actions(policy, compile_policy(policy))
    return templates, [f"{p.key}: {p.message}" for p in problems], warnings


def _props(**props: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["repo"],
            "properties": {"repo": {"type": "string", "enum": ["a"]}, **props}}


def test_a_good_action_compiles() -> None:
    templates, problems, warnings = _check(_action(body={"title": "{title}"}))
    assert problems == []
    assert warnings == []
    t = templates["act"]
    assert (t.method, t.scheme, t.host, t.port, t.path) == ("POST", "http", "api.test", 80,
                                                            ("repos", "{repo}", "issues"))
    assert t.body_params() == {"title"}
    assert t.path_params() == {"repo"}


SCHEMA_PROBLEMS: dict[str, tuple[dict[str, Any], str, str]] = {
    "not a JSON schema": ({"type": "object", "properties": {"x": {"type": "strung"}}},
                          "params.properties.x.type", "not a valid JSON Schema"),
    "not an object": ({"type": "string", "maxLength": 3, "pattern": "^a$"}, "params.type",
                      "must be 'object'"),
    "open object": ({"type": "object", "properties": {}}, "params.additionalProperties",
                    "must be false"),
    "string without any bound": (_props(title={"type": "string"}), "params.properties.title",
                                 "needs enum, const, a pattern"),
    "pattern without maxLength": (_props(title={"type": "string", "pattern": "^a+$"}),
                                  "params.properties.title.maxLength", "needs maxLength"),
    "free text without maxLength": (_props(title={"type": "string", "x-free-text": True}),
                                    "params.properties.title.maxLength", "free text needs"),
    "free text not true": (_props(title={"type": "string", "x-free-text": "yes",
                                         "maxLength": 9}),
                           "params.properties.title.x-free-text", "must be true"),
    "unanchored pattern": (_props(title={"type": "string", "pattern": "[a-z]+",
                                         "maxLength": 9}),
                           "params.properties.title.pattern", "anchored"),
    "bad regex": (_props(title={"type": "string", "pattern": "^(a$", "maxLength": 9}),
                  "params.properties.title.pattern", "not a valid JSON Schema"),
    "anyOf escapes the bounds": (_props(title={"anyOf": [{"type": "string"}]}),
                                 "params.properties.title.anyOf", "not supported"),
    "ref escapes the bounds": (_props(title={"$ref": "#/$defs/x"}),
                               "params.properties.title.$ref", "not supported"),
    "no type": (_props(title={"maxLength": 3}), "params.properties.title", "needs a 'type'"),
    "nested open object": (_props(meta={"type": "object", "properties": {}}),
                           "params.properties.meta.additionalProperties", "must be false"),
    "array without maxItems": (_props(tags={"type": "array", "items": {"type": "string",
                                                                       "enum": ["a"]}}),
                               "params.properties.tags.maxItems", "maxItems"),
    "array of free strings": (_props(tags={"type": "array", "maxItems": 3,
                                           "items": {"type": "string"}}),
                              "params.properties.tags.items", "needs enum"),
    "required names nothing": ({**_props(), "required": ["repo", "ghost"]}, "params.required",
                               "'ghost'"),
}


@pytest.mark.parametrize("case", SCHEMA_PROBLEMS, ids=list(SCHEMA_PROBLEMS))
def test_schema_problems(case: str) -> None:
    params, key, words = SCHEMA_PROBLEMS[case]
    problems = check_schema(params)
    assert any(k == key and words in m for k, m in problems), problems
    if words == "not a valid JSON Schema" or case == "bad regex":
        # Not a JSON Schema at all: the policy loader refuses it before the courier sees it.
        with pytest.raises(PolicyError, match="not a valid JSON Schema"):
            _check(_action(params=params))
        return
    templates, found, _ = _check(_action(params=params))
    assert "act" not in templates
    assert found


TEMPLATE_PROBLEMS = {
    "placeholder inside a segment": (_action("http://api.test/repos/{repo}.git/issues"),
                                     "request.url", "inside other text"),
    "placeholder in the host": (_action("http://{repo}.api.test/x"), "request.url",
                                "host and port"),
    "placeholder as query name": (_action("http://api.test/repos/{repo}/issues?{repo}=1"),
                                  "request.url", "query name"),
    "placeholder inside a query value": (_action("http://api.test/repos/{repo}/issues?q=a{repo}"),
                                         "request.url", "inside other text"),
    "fragment": (_action("http://api.test/repos/{repo}/issues#x"), "request.url", "fragment"),
    "not http": (_action("ftp://api.test/{repo}"), "request.url", "only http and https"),
    "userinfo": (_action("http://u:p@api.test/repos/{repo}/issues"), "request.url",
                 "refused"),
    "dot segment": (_action("http://api.test/repos/../{repo}/issues"), "request.url",
                    "dot segment"),
    "credential in the URL": (_action("http://api.test/repos/{repo}/{credential.TOKEN}"),
                              "request.url", "only in headers"),
    "credential in the body": (_action(body={"t": "{credential.TOKEN}"}), "request.body.t",
                               "only in headers"),
    "placeholder inside a body string": (_action(body={"t": "Title: {title}"}),
                                         "request.body.t", "inside other text"),
    "placeholder as a JSON key": (_action(body={"{title}": "x"}), "request.body.{title}",
                                  "keys must be fixed"),
    "placeholder before header text": (_action(headers={"X-A": "{title} please"}),
                                       "request.headers.X-A", "at the end"),
    "reserved header": (_action(headers={"Host": "evil.test"}), "request.headers.Host",
                        "written by the courier"),
    "non-ASCII header": (_action(headers={"X-A": "caf\u00e9"}), "request.headers.X-A",
                         "printable ASCII"),
}


@pytest.mark.parametrize("case", TEMPLATE_PROBLEMS, ids=list(TEMPLATE_PROBLEMS))
def test_template_problems(case: str) -> None:
    action, key, words = TEMPLATE_PROBLEMS[case]
    templates, problems, _ = _check(action)
    assert "act" not in templates
    assert any(p.startswith(f"{key}: ") and words in p for p in problems), problems


POLICY_PROBLEMS = {
    "undeclared placeholder": (_action("http://api.test/repos/{owner}/issues"), "request",
                               "{owner} is not a declared parameter"),
    "optional path parameter": (_action(params={**GOOD_PARAMS, "required": []}),
                                "params.required", "must be required"),
    "object in the URL": (_action(params=_props(title={
        "type": "object", "additionalProperties": False, "properties": {}}),
        url="http://api.test/repos/{repo}/issues?t={title}"),
        "params.properties.title.type", "string, integer"),
    "unknown credential": (_action(headers={"Authorization": "Bearer {credential.NOPE}"}),
                           "request.headers.Authorization", "not declared"),
    "credential for another host": (_action("http://open.test/{repo}", headers={
        "Authorization": "Bearer {credential.TOKEN}"}), "request.headers.Authorization",
        "serves hosts api.test, not open.test"),
    "credential in another header": (_action(headers={"X-Token": "{credential.TOKEN}"}),
                                     "request.headers.X-Token", "only in headers"),
    "no rule for the host": (_action("http://nowhere.test/{repo}"), "request.url",
                             "no rule allows host nowhere.test"),
    "method the rule refuses": (_action(method="DELETE"), "request.url", "method DELETE"),
    "path the rule refuses": (_action("http://api.test/orgs/{repo}"), "request.url",
                              "path /orgs/widgets not allowed"),
    "credential to an uninspected https host": (_action(
        "https://secure.test/{repo}", headers={"Authorization": "{credential.TLS_TOKEN}"}),
        "request.headers", "add 'inspect: true'"),
}


@pytest.mark.parametrize("case", POLICY_PROBLEMS, ids=list(POLICY_PROBLEMS))
def test_problems_against_the_policy(case: str) -> None:
    action, key, words = POLICY_PROBLEMS[case]
    templates, problems, _ = _check(action)
    assert "act" not in templates
    assert any(p.startswith(f"{key}: ") and words in p for p in problems), problems


def test_warnings_name_a_rule_the_agent_could_use_directly() -> None:
    templates, problems, warnings = _check(_action("http://open.test/{repo}"))
    assert problems == []
    assert "act" in templates
    assert any("rule open lets the agent send to open.test directly" in w and
               "via: courier" in w for w in warnings), warnings
    _, problems, warnings = _check(_action("https://secure.test/{repo}"))
    assert problems == []
    assert any("does not inspect secure.test" in w for w in warnings), warnings


def test_an_inspected_https_action_is_decided_inside_the_tunnel() -> None:
    templates, problems, _ = _check(_action("https://inspected.test/{repo}"))
    assert problems == []
    assert templates["act"].port == 443
    _, problems, _ = _check(_action("https://inspected.test/{repo}", method="PUT"))
    assert any("method PUT" in p for p in problems), problems


def test_an_action_without_params_takes_none() -> None:
    action = {"name": "ping", "request": {"method": "POST", "url": "http://open.test/ping"}}
    policy = parse_policy(_policy([action]))
    templates, problems, _ = compile_actions(policy, compile_policy(policy))
    assert problems == []
    assert templates["ping"].params["additionalProperties"] is False


def test_problems_name_every_action() -> None:
    bad = [{"name": "one", "request": {"method": "POST", "url": "http://open.test/{x}"}},
           {"name": "two", "request": {"method": "POST", "url": "http://nowhere.test/"}}]
    policy = parse_policy(_policy(bad))
    _, problems, _ = compile_actions(policy, compile_policy(policy))
    assert {p.action for p in problems} == {"one", "two"}
    assert str(problems[0]).startswith("action one: request: placeholder {x}")


def test_templates_survive_the_trip_to_the_worker() -> None:
    template, problems = parse_template(
        "t", "POST", "http://api.test/a/{x}?q={y}&fixed=1&flag",
        {"Authorization": "Bearer {credential.T}", "Accept": "text/plain"},
        {"a": ["{x}", 1, None, True], "b": {"c": "{y}"}}, {"type": "object"})
    assert problems == []
    assert template is not None
    assert Template.from_json(template.to_json()) == template
    assert template.query == (("q", "{y}"), ("fixed", "1"), ("flag", None))
    assert template.credentials() == {"T"}
    assert template.wire_params() == {"x", "y"}


def test_the_starter_example_of_the_docs_is_valid() -> None:
    text = textwrap.dedent("""\
        version: 1
        credentials:
          - {name: GITHUB_TOKEN, env: GITHUB_TOKEN, hosts: [api.github.com],
             headers: [Authorization]}
        rules:
          - id: github-issues
            host: api.github.com
            ports: [443]
            inspect: true
            methods: [POST]
            paths: ["/repos/acme/*/issues"]
            via: courier
        actions:
          - name: create_issue
            description: Open an issue in one of acme's public repositories.
            request:
              method: POST
              url: "https://api.github.com/repos/acme/{repo}/issues"
              headers:
                Authorization: "Bearer {credential.GITHUB_TOKEN}"
                Accept: application/vnd.github+json
              body: {title: "{title}", body: "{body}", labels: ["{label}"]}
            params:
              type: object
              additionalProperties: false
              required: [repo, title]
              properties:
                repo: {type: string, enum: [widgets, gadgets]}
                title: {type: string, pattern: "^[A-Za-z0-9 ,.:!?'()-]{1,120}$",
                        maxLength: 120}
                body: {type: string, x-free-text: true, maxLength: 4000}
                label: {type: string, enum: [bug, feature, question]}
        """)
    policy = parse_policy(text)
    templates, problems, warnings = compile_actions(policy, compile_policy(policy))
    assert problems == []
    assert warnings == []
    assert set(templates) == {"create_issue"}
