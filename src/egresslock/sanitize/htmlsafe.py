"""HTML that is safe to render: nh3 (ammonia, on html5ever) with an allowlist, and the policy
deciding every URL that survives it.

nh3 parses the way a browser does, drops every element and attribute not listed here, and
calls back for each allowed attribute, where ``href`` and ``src`` are judged by the policy
(:meth:`SanitizePolicy.judge`). What is never kept, whatever the policy: scripts, styles and
``style`` attributes (CSS ``url()``), ``srcset``, forms, frames, ``<object>``/``<embed>``,
``<meta>`` (refresh), ``<base>``, ``<link>``, SVG and MathML (external references), media
elements, and every event handler. Relative URLs are removed: the renderer's base is unknown.

nh3 says what it kept, not what it removed, so a second pass over the input with the standard
library's tokenizer lists the URLs and elements that did not survive, for the report and the
audit log. That pass only reports; what is removed is nh3's decision.

Raw HTML inside markdown comes as fragments: a block (``<div>...``) or a single tag between
markdown text (``<kbd>``, ``</a>``). nh3 completes a fragment into a tree, so a single start
tag comes back closed (``<kbd></kbd>``): :meth:`HtmlCleaner.clean_tag` cleans the tag with nh3
and keeps only its start, and keeps an end tag when its element is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html import unescape as html_unescape
from html.parser import HTMLParser

import nh3

from egresslock.sanitize.removal import Removal
from egresslock.sanitize.urls import LOOSE_URL, RULE_OF, SanitizePolicy, Use

TAGS = frozenset({
    "a", "abbr", "b", "bdi", "bdo", "blockquote", "br", "caption", "cite", "code", "col",
    "colgroup", "dd", "del", "details", "dfn", "div", "dl", "dt", "em", "figcaption", "figure",
    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p",
    "pre", "q", "rp", "rt", "ruby", "s", "samp", "small", "span", "strong", "sub", "summary",
    "sup", "table", "tbody", "td", "tfoot", "th", "thead", "time", "tr", "u", "ul", "var", "wbr",
})
# Removed together with their content: code, styles, embedded documents and vector graphics,
# whose text is either not meant to be read or can reference external resources.
CLEAN_CONTENT_TAGS = frozenset({
    "script", "style", "iframe", "frame", "frameset", "object", "embed", "applet", "svg",
    "math", "template", "noscript", "noembed", "noframes", "textarea", "select", "title",
    "xmp", "portal",
})
_ALIGN = {"align"}
ATTRIBUTES: dict[str, set[str]] = {
    "*": {"title", "lang", "dir"},
    "a": {"href"},
    "img": {"src", "alt", "width", "height", "align"},
    "td": {"colspan", "rowspan", "align"}, "th": {"colspan", "rowspan", "align", "scope"},
    "ol": {"start", "reversed", "type"}, "li": {"value"}, "time": {"datetime"},
    "details": {"open"}, "col": {"span"}, "colgroup": {"span"},
    "div": _ALIGN, "p": _ALIGN, "h1": _ALIGN, "h2": _ALIGN, "h3": _ALIGN, "h4": _ALIGN,
    "h5": _ALIGN, "h6": _ALIGN,
}
# The attributes the policy decides, and how their URL is used.
URL_USE: dict[tuple[str, str], Use] = {("a", "href"): "link", ("img", "src"): "image"}
# Attributes that hold a URL a browser may fetch or follow; none but URL_USE is ever kept.
URL_ATTRIBUTES = frozenset({
    "href", "src", "srcset", "action", "formaction", "data", "poster", "background", "cite",
    "longdesc", "lowsrc", "dynsrc", "ping", "xlink:href", "manifest", "codebase", "archive",
    "icon", "profile", "imagesrcset", "srcdoc",
})
_CSS_URL = re.compile(r"url\s*\(\s*['\"]?([^'\")]*)", re.IGNORECASE)
_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\"\s]*)", re.IGNORECASE)
_END_TAG = re.compile(r"</\s*([A-Za-z][A-Za-z0-9-]*)\s*>\Z")
_START_NAME = re.compile(r"<([a-z][a-z0-9]*)")
_SERIALISED_TAG = re.compile(r'<[^<>"]*(?:"[^"]*"[^<>"]*)*>')
_IMG = re.compile(r'<img(?:\s[^<>"]*(?:"[^"]*"[^<>"]*)*)?>')
_ALT = re.compile(r'\salt="([^"]*)"')


class HtmlCleaner:
    """nh3 configured for one policy; every call reports removals to the list it is given."""

    __slots__ = ("policy",)

    def __init__(self, policy: SanitizePolicy) -> None:
        self.policy = policy

    def clean(self, fragment: str, report: list[Removal]) -> str:
        """``fragment`` with everything unsafe removed, as HTML nh3 serialised."""
        seen = _scan(fragment, self.policy, report)
        denied: list[Removal] = []
        out = nh3.clean(fragment, tags=set(TAGS), clean_content_tags=set(CLEAN_CONTENT_TAGS),
                        attributes=ATTRIBUTES, attribute_filter=self._filter(denied),
                        strip_comments=True, link_rel="noopener noreferrer",
                        url_schemes={"https"}, url_relative="deny")
        # nh3 parses as a browser does; the report's tokenizer may have missed something.
        report.extend(r for r in denied if (r.element, r.url) not in seen)
        if "<img" in out:
            out = _IMG.sub(_img_without_src, out)
        lowered = out.lower()
        return self._unlink_text(out, report) if "://" in out or "www." in lowered else out

    def _unlink_text(self, html: str, report: list[Removal]) -> str:
        """Remove forbidden URLs from the text of cleaned HTML: a renderer that links URLs in
        text (a chat client's linkifier) would make them clickable. nh3's output is canonical
        (attribute values double-quoted, '<' in text escaped), so a tag is one regex match."""
        out: list[str] = []
        last = 0
        for tag in _SERIALISED_TAG.finditer(html):
            out.append(self._unlink(html[last : tag.start()], report))
            out.append(tag.group())
            last = tag.end()
        out.append(self._unlink(html[last:], report))
        return "".join(out)

    def _unlink(self, text: str, report: list[Removal]) -> str:
        def replace(found: re.Match[str]) -> str:
            decision = self.policy.judge_text(html_unescape(found.group()))
            if decision.allowed:
                return found.group()
            report.append(Removal.of_url("bare URL in html", RULE_OF["link"], found.group(),
                                         decision))
            return "(link removed)"

        return LOOSE_URL.sub(replace, text)

    def clean_tag(self, tag: str, report: list[Removal]) -> str:
        """One tag of raw inline HTML (``<kbd>``, ``</a>``, ``<img src=...>``), cleaned.

        Comments, processing instructions, declarations and CDATA give "": none renders.
        """
        end = _END_TAG.match(tag)
        if end is not None:
            name = end.group(1).lower()
            return f"</{name}>" if name in TAGS else ""
        out = self.clean(tag, report)
        start = _START_NAME.match(out)
        if start is None:
            return ""
        closing = f"</{start.group(1)}>"
        if out.endswith(closing):
            out = out[: -len(closing)]
        # A newline inside an attribute value would end the markdown line the tag sits on.
        return out.replace("\n", "&#10;")

    def _filter(self, denied: list[Removal]) -> Callable[[str, str, str], str | None]:
        def decide(element: str, attribute: str, value: str) -> str | None:
            use = URL_USE.get((element, attribute))
            if use is None:
                return value
            decision = self.policy.judge(value, use)
            if decision.allowed:
                return value
            denied.append(Removal.of_url(f"html <{element}>", RULE_OF[use], value, decision))
            return None

        return decide


class _Scan(HTMLParser):
    """Lists every URL-bearing attribute and every never-kept element of an HTML fragment."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, str | None, str | None]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        urls = 0
        for name, value in attrs:
            for url in _urls_of(tag, name, value or ""):
                self.found.append((tag, name, url))
                urls += 1
        if not urls and tag not in TAGS:
            self.found.append((tag, None, None))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)


def _img_without_src(found: re.Match[str]) -> str:
    """An image whose source was removed becomes its alt text, as markdown images do."""
    tag = found.group()
    if ' src="' in tag:
        return tag
    alt = _ALT.search(tag)
    return alt.group(1) if alt else ""


def _urls_of(tag: str, name: str, value: str) -> list[str]:
    if name == "style":
        return _CSS_URL.findall(value)
    if name == "content" and tag == "meta":
        return _REFRESH_URL.findall(value)
    if name in ("srcset", "imagesrcset"):
        return [part.strip().split(" ")[0] for part in value.split(",") if part.strip()]
    if name in URL_ATTRIBUTES and value.strip():
        return [value]
    return []


def _scan(fragment: str, policy: SanitizePolicy,
          report: list[Removal]) -> set[tuple[str, str | None]]:
    """Report what of ``fragment`` nh3 will not keep; return (element, url) pairs reported."""
    if "<" not in fragment:
        return set()
    scanner = _Scan()
    try:
        scanner.feed(fragment)
        scanner.close()
    except Exception:  # noqa: S110 - html.parser asserts on some markup ("<![a")
        # This pass only reports: what it found so far is kept, and nh3 still decides.
        pass
    seen: set[tuple[str, str | None]] = set()
    for tag, attribute, url in scanner.found:
        element = f"html <{tag}>"
        removal = _removal(policy, tag, attribute, url)
        if removal is not None:
            report.append(removal)
            seen.add((element, url))
    return seen


def _removal(policy: SanitizePolicy, tag: str, attribute: str | None,
             url: str | None) -> Removal | None:
    element = f"html <{tag}>"
    if attribute is None or url is None:
        if tag in CLEAN_CONTENT_TAGS or tag in _NOTED:
            return Removal(element, "html", f"<{tag}> elements are never kept: {_why(tag)}")
        return None
    use = URL_USE.get((tag, attribute))
    if use is not None:
        decision = policy.judge(url, use)
        return None if decision.allowed else Removal.of_url(element, RULE_OF[use], url, decision)
    judged = policy.judge(url, "link")
    if tag not in TAGS:
        reason = f"<{tag}> elements are never kept: {_why(tag)}"
    else:
        reason = f"attribute {attribute} is never kept: it loads or sends to a URL"
    return Removal(element, "html", reason, url, judged.host, judged.path, judged.secret,
                   judged.port)


# Elements dropped (content kept) that are worth a line in the report.
_NOTED = frozenset({"form", "input", "button", "meta", "base", "link", "video", "audio",
                    "source", "track", "picture", "area", "map", "body", "html", "head"})
_WHY = {
    "script": "it runs code", "style": "CSS can load URLs", "form": "it sends data on submit",
    "meta": "a refresh redirects the reader", "base": "it changes where every relative URL "
    "points", "link": "it loads a resource", "iframe": "it embeds another page",
    "svg": "it can reference external resources", "math": "it can reference external "
    "resources",
}


def _why(tag: str) -> str:
    return _WHY.get(tag, "it can load, embed or send to another location")
