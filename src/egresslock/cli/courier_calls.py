"""One call to an action, from the agent's request to its reply and audit row.

The checks run in this order, each a refusal with its own reason (403 and
``X-Egresslock-Deny: <action>; <reason>``):

1. the action exists (else 404) and the body is a JSON object (else 400);
2. the parameters satisfy the schema and hold no control character where they go
   (:func:`egresslock.courier.render.validate_params`, ``check_characters``);
3. no write down: the session's mark is not above the action's ``level``; the reason names the
   read that raised it;
4. no secret, credential or placeholder in any encoding, and no dynamic link, in the parameters
   (:func:`egresslock.courier.screen.screen`).

In report mode, 3 and 4 are logged as ``report`` and the call goes on; 1 and 2 always refuse,
since a request cannot be rendered from parameters its schema refuses. The worker then validates
and renders again and sends; its answer becomes 200 ``{status, headers, body}`` (the upstream's
status inside, whatever it is), 403 when the proxy refused the request, 502 when the upstream
could not be reached, 504 when the worker did not answer in time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from egresslock.audit import AuditRecord
from egresslock.cli.courier_session import json_reply, log_call
from egresslock.proxy.actions import ActionCall, ActionReply

if TYPE_CHECKING:
    from egresslock.cli.courier_session import Courier
    from egresslock.courier.template import Template


def listing(courier: Courier) -> dict[str, Any]:
    """``GET /actions``: every action with its description and parameter schema, in the shape
    agent frameworks take as tool definitions."""
    out = []
    for name, template in courier.templates.items():
        action = courier.actions[name]
        entry: dict[str, Any] = {"name": name, "description": action.description,
                                 "params": dict(template.params),
                                 "request": f"{template.method} {action.request.url}"}
        if action.reads is not None:
            entry["reads"] = action.reads
        if action.level is not None:
            entry["level"] = action.level
        out.append(entry)
    return {"actions": out, "call": "POST /actions/NAME with a JSON object of parameters",
            "courier": {"filesystem": courier.filesystem}}


def _deny(name: str, reason: str, status: int = 403) -> ActionReply:
    from egresslock.proxy.http1 import header_safe

    return json_reply(status, {"action": name, "error": reason},
                 ((b"X-Egresslock-Deny", header_safe(f"{name}; {reason}")),))


async def handle_call(courier: Courier, call: ActionCall) -> ActionReply:
    from egresslock.content.links import LinkLimits
    from egresslock.courier.render import CallRefused, check_characters, validate_params
    from egresslock.courier.screen import screen

    name = call.name or ""
    template = courier.templates.get(name)
    if call.method != "POST":
        return json_reply(405, {"action": name, "error": f"call an action with POST /actions/"
                                                    f"{name or 'NAME'}"})
    if template is None:
        reason = f"no action named {name[:64]!r}; GET /actions lists them"
        log_call(courier, name[:64] or "?", "deny", reason)
        return json_reply(404, {"error": reason})
    try:
        params = json.loads(call.body or b"{}", parse_constant=_no_constant)
    except ValueError:
        reason = "the request body must be a JSON object of parameters"
        log_call(courier, name, "deny", reason, template=template, schema="invalid")
        return _deny(name, reason, 400)
    try:
        validate_params(template, params)
        check_characters(template, params)
    except CallRefused as exc:
        log_call(courier, name, "deny", exc.reason, template=template,
                 schema="valid" if exc.schema_valid else "invalid")
        return _deny(name, exc.reason)
    reasons = []
    why = _label_refusal(courier, name, template)
    if why is not None:
        reasons.append(why)
    content = courier.ctx.policy.current.source.content.dynamic_links
    reasons += screen(template, params, courier.ctx.content.scanner,
                      LinkLimits(content.max_data_bytes, content.min_token_len))
    report_only = courier.ctx.policy.current.report_only
    if reasons and not report_only:
        log_call(courier, name, "deny", reasons[0], template=template, schema="valid")
        return _deny(name, reasons[0])
    reply = await courier.ask(name, params)
    return _answer(courier, name, template, reply,
                   f"report mode, enforce would deny: {reasons[0]}" if reasons else None)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python's json module would accept NaN


def _label_refusal(courier: Courier, name: str, template: Template) -> str | None:
    level = courier.actions[name].level
    mark = courier.ctx.mark
    if level is None or mark is None:
        return None
    return mark.refusal(level, template.host, f"action {name}")


def _raise_mark(courier: Courier, name: str) -> None:
    reads = courier.actions[name].reads
    mark = courier.ctx.mark
    if reads is None or mark is None:
        return
    source = f"action {name}"
    step = mark.raise_to(reads, source, name)
    if step is not None:
        courier.ctx.log(AuditRecord(
            layer="flow", verdict="allow", rule_id=name,
            reason=f"session mark raised from {step.previous or mark.levels[0]} to "
                   f"{step.level} by {source}",
            extra={"mark": step.level, "previous": step.previous, "source": source}))


def _answer(courier: Courier, name: str, template: Template, reply: dict[str, Any],
            reported: str | None) -> ActionReply:
    if not reply.get("ok"):
        kind = reply.get("kind")
        reason = str(reply.get("reason") or "the courier failed")
        schema = "invalid" if reply.get("schema_valid") is False else "valid"
        log_call(courier, name, "deny" if kind in ("refused", "denied") else "allow", reason,
                 template=template, reply=reply, schema=schema)
        if kind in ("refused", "denied"):
            return _deny(name, reason)
        return json_reply(504 if kind == "timeout" else 502, {"action": name, "error": reason})
    status = int(reply.get("status", 0))
    if status < 400:
        _raise_mark(courier, name)
    verdict, reason = ("report", reported) if reported else \
        ("allow", f"action {name} called: upstream answered {status}")
    log_call(courier, name, verdict, reason, template=template, reply=reply, schema="valid")
    payload = {"action": name, "status": status, "headers": reply.get("headers", {}),
               "body": reply.get("body", ""), "truncated": bool(reply.get("truncated"))}
    return json_reply(200, _redact(courier, payload))


def _redact(courier: Courier, payload: dict[str, Any]) -> dict[str, Any]:
    """Every credential's placeholder and real value, wherever the reply holds them, becomes
    ``[credential NAME]``: the agent must not learn the courier's placeholder from an echo."""
    text = json.dumps(payload)
    for b in courier.ctx.content.bindings:
        marker = f"[credential {b.name}]"
        for value in (b.placeholder, b.real):
            needle = json.dumps(value.decode("utf-8", "replace"))[1:-1]
            if needle:
                text = text.replace(needle, marker)
    result: dict[str, Any] = json.loads(text)
    return result
