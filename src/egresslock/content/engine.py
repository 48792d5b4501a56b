"""The content checks of one policy, ready for every enforcement point to ask.

:class:`ContentPolicy` is built once per policy load, next to the compiled rules: it reads the
secret and credential sources, builds the scanner, and compiles each rule's transforms,
dynamic-link limits and budget. An enforcement point asks it after the rules allowed a request:

- :meth:`ContentPolicy.check_name` for a name alone (a DNS query, a TLS SNI, a CONNECT target);
- :meth:`ContentPolicy.prepare` for an HTTP request it can read (plain HTTP, or inside an
  inspected tunnel): URL and headers are scanned, the dynamic-link and budget checks run, the
  transforms and credential swaps are applied, and a :class:`BodyFilter` is returned for the body.

A refusal is a :class:`ContentRefusal` whose reason names what was found (a secret by its name,
never its value) and where. In report mode nothing is refused: the reasons are collected on the
:class:`Prepared` request so the audit row says what enforce mode would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from egresslock.content.budget import Meter
from egresslock.content.credentials import Binding, load_bindings
from egresslock.content.decode import BodyDecoder, DecodeError
from egresslock.content.detectors import enabled
from egresslock.content.links import LinkLimits, dynamic_reason
from egresslock.content.scanner import Hit, Kind, Needle, Scanner, StreamScanner
from egresslock.content.sources import secret_needles
from egresslock.content.transform import filter_headers, hash_query, transform_json
from egresslock.errors import InputError
from egresslock.policy.glob import parse_host_pattern
from egresslock.policy.model import DynamicLinkLimits, Policy, Rule

Headers = list[tuple[bytes, bytes]]

# A body that must be transformed is read whole before it is sent; past this it is refused.
MAX_TRANSFORM_BODY = 16 * 2**20


class ContentRefusal(Exception):
    """A request refused by a content check; ``reason`` is the sentence for the client and log."""

    def __init__(self, rule_id: str, reason: str) -> None:
        super().__init__(reason)
        self.rule_id = rule_id
        self.reason = reason


@dataclass(slots=True)
class RuleContent:
    """One rule's content settings, compiled."""

    rule_id: str
    wildcard: str | None  # the suffix after "*." for wildcard rules
    links: LinkLimits | None
    header_allow: tuple[str, ...] | None
    header_strip: tuple[str, ...] | None
    hash_query: tuple[str, ...]
    hash_json: tuple[str, ...]
    redact_json: tuple[str, ...]
    meter: Meter | None

    @property
    def transforms_body(self) -> bool:
        return bool(self.hash_json or self.redact_json)


def _limits(rule: Rule, default: DynamicLinkLimits) -> LinkLimits | None:
    if rule.dynamic_links == "allow":
        return None
    chosen = default if rule.dynamic_links == "deny" else rule.dynamic_links
    assert isinstance(chosen, DynamicLinkLimits)
    return LinkLimits(chosen.max_data_bytes, chosen.min_token_len)


def _rule_content(rule: Rule, policy: Policy) -> RuleContent:
    host = parse_host_pattern(rule.host)
    return RuleContent(
        rule.id, host.suffix, _limits(rule, policy.content.dynamic_links),
        tuple(rule.headers.allow) if rule.headers and rule.headers.allow is not None else None,
        tuple(rule.headers.strip) if rule.headers and rule.headers.strip is not None else None,
        tuple(rule.hash_query or ()), tuple(rule.hash_json or ()),
        tuple(rule.redact_json or ()),
        Meter(rule.budget, f"rule {rule.id}") if rule.budget is not None else None)


@dataclass(slots=True)
class Prepared:
    """A request after the content checks: what to send, and what to log about it."""

    target: str
    headers: Headers
    body: BodyFilter | None
    changes: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)  # report mode: what enforce would deny
    redact: tuple[Binding, ...] = ()  # credentials whose real value responses must not show

    def note(self) -> dict[str, object] | None:
        extra: dict[str, object] = {}
        if self.changes:
            extra["changes"] = self.changes
        if self.reported:
            extra["content"] = self.reported
        return extra or None


class ContentPolicy:
    """Secrets, detectors, placeholders, transforms, dynamic links and budgets of one policy."""

    def __init__(self, policy: Policy, environ: Mapping[str, str] | None = None,
                 key: Callable[[], bytes] | None = None) -> None:
        import os

        env = os.environ if environ is None else environ
        needles, warnings = secret_needles(policy, env)
        self.bindings, cred_warnings = load_bindings(policy, env)
        self.warnings: tuple[str, ...] = (*warnings, *cred_warnings)
        for b in self.bindings:
            needles.append(Needle(b.name, b.placeholder, Kind.PLACEHOLDER))
            needles.append(Needle(b.name, b.real, Kind.CREDENTIAL))
        self.scanner = Scanner(needles, enabled(policy.content.detectors.model_dump()))
        self.rules = {r.id: _rule_content(r, policy) for r in policy.rules
                      if r.action == "allow"}
        self.run_meter = Meter(policy.budget, "run") if policy.budget is not None else None
        self.max_decoded = policy.content.max_decoded_bytes
        self.report_only = policy.mode == "report"
        self._key_source = key
        self._key: bytes | None = None
        # (host, path, sni) of audit rows -> the same, redacted where a secret showed: what
        # egresslock.proxy.context.scrub found, since the answer depends on these values only.
        self.scrubbed: dict[tuple[str | None, str | None, str | None],
                            tuple[str | None, str | None, str | None]] = {}

    def adopt_meters(self, previous: ContentPolicy) -> None:
        """Keep the use of budgets that a reload left unchanged: editing a policy must not
        refill a spent budget."""
        for rule_id, rule in self.rules.items():
            old = previous.rules.get(rule_id)
            if rule.meter is not None and old is not None and old.meter is not None and (
                    old.meter.same_budget(rule.meter)):
                rule.meter = old.meter
        if (self.run_meter is not None and previous.run_meter is not None
                and previous.run_meter.same_budget(self.run_meter)):
            self.run_meter = previous.run_meter

    @property
    def key(self) -> bytes:
        if self._key is None:
            if self._key_source is None:
                raise InputError("a rule hashes values, and no key directory was given")
            self._key = self._key_source()
        return self._key

    # -- names ----------------------------------------------------------------------------

    def name_refusal(self, host: str, rule_id: str | None = None) -> str | None:
        """Why a name must not be sent (a DNS query, SNI or CONNECT host), or None.

        Secrets, credential values and placeholders are looked for in the name; for a wildcard
        rule the labels left of its suffix are judged as data too.
        """
        hits = self.scanner.scan_name(host)
        if hits:
            return f"the name {redact_name(host)} holds {_hits(hits)}"
        rule = self.rules.get(rule_id or "")
        if rule is not None and rule.links is not None and rule.wildcard is not None:
            labels = _wild_labels(host, rule.wildcard)
            why = dynamic_reason(None, None, labels, rule.links)
            if why is not None:
                return f"dynamic name {host} refused by rule {rule.rule_id}: {why}"
        return None

    def check_name(self, host: str, rule_id: str | None = None) -> str | None:
        """:meth:`name_refusal`, or None in report mode (the caller logs the reason)."""
        return None if self.report_only else self.name_refusal(host, rule_id)

    def admit_tunnel(self, rule_id: str) -> str | None:
        """Budget check for a tunnel the proxy cannot see into: it counts as one request."""
        for meter in self._meters(rule_id):
            why, _ = meter.admit(0)
            if why is not None:
                return why
        return None

    # -- requests -------------------------------------------------------------------------

    def prepare(self, rule_id: str, host: str, path: str, query: str | None,
                headers: Sequence[tuple[bytes, bytes]], content_encoding: bytes | None,
                has_body: bool, body_size: int | None = None) -> Prepared:
        """Check and transform one readable request. Raises :class:`ContentRefusal`.

        ``body_size`` is the declared Content-Length, charged to the budgets up front so that a
        body over budget is refused before any of it is sent; a chunked body (None) is charged
        as it streams."""
        rule = self.rules.get(rule_id)
        prepared = Prepared(path + (f"?{query}" if query is not None else ""), list(headers),
                            None)

        def refuse(reason: str) -> None:
            if self.report_only:
                prepared.reported.append(reason)
            else:
                raise ContentRefusal(rule_id, reason)

        why = self.name_refusal(host, rule_id)
        if why is not None:
            refuse(why)
        hits = self.scanner.scan(prepared.target.encode("utf-8", "surrogateescape"),
                                 "in the URL")
        if hits:
            refuse(_hits(hits))
        self._check_headers(prepared, host, refuse)
        if rule is not None and rule.links is not None:
            why = dynamic_reason(path, query, _wild_labels(host, rule.wildcard), rule.links)
            if why is not None:
                refuse(f"dynamic link refused by rule {rule.rule_id}: {why}")
        size = len(prepared.target) + sum(len(n) + len(v) + 4 for n, v in prepared.headers)
        size += body_size or 0
        entries = []
        for meter in self._meters(rule_id):
            why, entry = meter.admit(size)
            if why is not None:
                refuse(why)
            entries.append((meter, entry))
        if rule is not None:
            self._transform(rule, prepared, query, path)
        prepared.headers = self._swap(prepared.headers, host, prepared)
        prepared.redact = tuple(b for b in self.bindings if b.serves(host))
        if has_body:
            prepared.body = BodyFilter(self, rule, rule_id, content_encoding,
                                       [] if body_size is not None else entries, prepared)
        return prepared

    def repeatable(self, rule_id: str) -> bool:
        """Whether :meth:`prepare` under ``rule_id`` has no effect, so that the same request
        always gets the same answer: no budget to charge, and enforce mode."""
        return not self.report_only and not self._meters(rule_id)

    def _meters(self, rule_id: str) -> list[Meter]:
        rule = self.rules.get(rule_id)
        meters = [rule.meter] if rule is not None and rule.meter is not None else []
        return meters + ([self.run_meter] if self.run_meter is not None else [])

    def _check_headers(self, prepared: Prepared, host: str,
                       refuse: Callable[[str], None]) -> None:
        blob = b"".join(b"%s: %s\r\n" % (n, v) for n, v in prepared.headers
                        if n.lower() != b"host")
        hits = self.scanner.scan(blob, "in the request headers")
        if not hits:
            return
        bad = [h for h in hits if h.kind is not Kind.PLACEHOLDER]
        if bad:
            refuse(_hits(bad))
        for hit in (h for h in hits if h.kind is Kind.PLACEHOLDER):
            binding = next(b for b in self.bindings if b.name == hit.name)
            for name, value in prepared.headers:
                low = name.decode("latin-1").lower()
                if low == "host" or not any(
                        h.kind is Kind.PLACEHOLDER and h.name == binding.name
                        for h in self.scanner.scan(b"%s: %s" % (name, value))):
                    continue
                if low not in binding.headers or not binding.serves(host):
                    refuse(f"placeholder of credential {binding.name} in header {low} of a "
                           f"request to {host}; it is replaced only in {binding.where()}")
                elif binding.swap_header(low, value) == value:
                    refuse(f"placeholder of credential {binding.name} in header {low} is "
                           "encoded in a way the proxy cannot replace; send it as it is "
                           "(or in Basic authentication)")

    def _swap(self, headers: Headers, host: str, prepared: Prepared) -> Headers:
        out = headers
        for b in self.bindings:
            if not b.serves(host):
                continue
            swapped = [(n, b.swap_header(n.decode("latin-1"), v)) for n, v in out]
            if swapped != out:
                prepared.changes.append(f"credential {b.name} inserted")
                out = swapped
        return out

    def _transform(self, rule: RuleContent, prepared: Prepared, query: str | None,
                   path: str) -> None:
        if rule.header_allow is not None or rule.header_strip is not None:
            keep = frozenset(h for b in self.bindings for h in b.headers)
            prepared.headers, changed = filter_headers(prepared.headers, rule.header_allow,
                                                       rule.header_strip, keep)
            prepared.changes += changed
        if rule.hash_query and query:
            new_query, changed = hash_query(query, rule.hash_query, self.key)
            prepared.target = f"{path}?{new_query}"
            prepared.changes += changed


def redact_name(host: str) -> str:
    """``host`` with the labels that could carry data replaced: where it was going (the last
    two labels) stays for the log, what it carried does not."""
    labels = host.rstrip(".").split(".")
    if len(labels) <= 2:
        return "<redacted>"
    return "<redacted>." + ".".join(labels[-2:])


def _wild_labels(host: str, suffix: str | None) -> tuple[str, ...]:
    if suffix is None or not host.endswith("." + suffix):
        return ()
    return tuple(host[: -len(suffix) - 1].split("."))


def _hits(hits: Sequence[Hit]) -> str:
    return ", ".join(h.describe() for h in hits[:3]) + (
        f" and {len(hits) - 3} more" if len(hits) > 3 else "")


class BodyFilter:
    """A request body on its way out: decoded, scanned, charged to budgets, maybe transformed.

    ``whole`` bodies (a rule with hash_json or redact_json) are read completely, transformed and
    sent by :meth:`finish`; others stream, each chunk released by :meth:`feed` once the scanner
    has proved it holds no secret's start. An encoded body (gzip, deflate, br) is decoded and
    scanned as it arrives but released only at the end, since a compressed byte cannot be
    proven clean until the text it expands to has been seen.
    """

    def __init__(self, content: ContentPolicy, rule: RuleContent | None, rule_id: str,
                 content_encoding: bytes | None, meters: list[tuple[Meter, list[float]]],
                 prepared: Prepared) -> None:
        self.content = content
        self.rule = rule
        self.rule_id = rule_id
        self.prepared = prepared
        self.whole = rule is not None and rule.transforms_body
        self._meters = meters
        self._stream = StreamScanner(content.scanner)
        self._passthrough = content.report_only  # report mode: scan, log, hold nothing back
        self._held: list[bytes] = []
        self._held_size = 0
        coding = (content_encoding or b"").decode("latin-1")
        try:
            self._decoder = BodyDecoder(coding, content.max_decoded)
        except DecodeError as exc:
            raise ContentRefusal(rule_id, str(exc)) from exc
        if self.whole and not self._decoder.identity:
            raise ContentRefusal(rule_id, f"rule {rule_id} transforms JSON bodies, and this "
                                 f"body is {coding}-encoded; send it unencoded")

    def _refuse(self, reason: str) -> None:
        if self.content.report_only:
            if reason not in self.prepared.reported:
                self.prepared.reported.append(reason)
            return
        raise ContentRefusal(self.rule_id, reason)

    def feed(self, data: bytes) -> bytes:
        """Bytes of the body that may be sent now. Raises :class:`ContentRefusal`."""
        for meter, entry in self._meters:
            why = meter.charge(entry, len(data))
            if why is not None:
                self._refuse(why)
        if self.whole or not self._decoder.identity:
            self._held.append(data)
            self._held_size += len(data)
            if self.whole and self._held_size > MAX_TRANSFORM_BODY:
                self._refuse(f"body over {MAX_TRANSFORM_BODY} bytes cannot be transformed by "
                             f"rule {self.rule_id}")
            try:
                for piece in self._decoder.feed(data):
                    _, hits = self._stream.feed(piece, "in the decompressed body")
                    if hits:
                        self._refuse(_hits(hits))
            except DecodeError as exc:
                self._refuse(str(exc))
            return b""
        out, hits = self._stream.feed(data)
        if hits:
            self._refuse(_hits(hits))
        return data if self._passthrough else out

    def finish(self) -> bytes:
        """The rest of the body (all of it for a held or transformed body)."""
        tail = self._stream.finish()
        if not (self.whole or not self._decoder.identity):
            return b"" if self._passthrough else tail
        body = b"".join(self._held)
        self._held = []
        if not self.whole or self.rule is None:
            return body
        try:
            body, changes = transform_json(body, self.rule.hash_json, self.rule.redact_json,
                                           self.content.key)
        except InputError as exc:
            self._refuse(str(exc))
            return body
        self.prepared.changes += changes
        return body


def key_loader(directory: Path | None) -> Callable[[], bytes]:
    """A loader of the installation's hashing key in ``directory`` (default: the CA's)."""

    def load() -> bytes:
        from egresslock.content.keys import load_or_create_key

        if directory is not None:
            return load_or_create_key(directory)
        from egresslock.paths import default_ca_dir

        return load_or_create_key(default_ca_dir())

    return load
