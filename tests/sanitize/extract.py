"""An independent look at sanitised output: what would a renderer fetch or link?

It shares nothing with the sanitizer but the markdown parser library: the output is rendered
to HTML by markdown-it's own GFM-like preset (link validation off, so that even a
``javascript:`` link renders as one), and the HTML is read with the standard library's parser,
collecting every attribute that can hold a URL, every CSS ``url()``, every event handler, every
element that is never allowed, and every scheme URL or ``www.`` name in visible text outside
links and code (which some renderers link). :func:`allowed` restates the test policy with plain
string checks instead of the policy engine.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from markdown_it import MarkdownIt

from tests.sanitize.conftest import SECRET

URL_ATTRIBUTES = frozenset({
    "href", "src", "srcset", "action", "formaction", "data", "poster", "background", "cite",
    "longdesc", "lowsrc", "dynsrc", "ping", "xlink:href", "manifest", "codebase", "archive",
    "icon", "profile", "srcdoc", "imagesrcset",
})
NEVER = frozenset({"script", "style", "iframe", "frame", "object", "embed", "form", "meta",
                   "base", "link", "svg", "math", "input", "button", "video", "audio", "source"})
_CSS_URL = re.compile(r"url\s*\(\s*['\"]?([^'\")]*)", re.IGNORECASE)
_TEXT_URL = re.compile(r"(?i)\b(?:https?|ftp)://[^\s<>\"']+|(?<![\w/.@-])www\.[^\s<>\"']+")
_SKIP = frozenset({"a", "code", "pre"})

Found = tuple[str, str, str]  # (element, attribute or "text" or "element", value)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[Found] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in NEVER:
            self.found.append((tag, "element", tag))
        for name, given in attrs:
            value = given or ""
            if name.startswith("on"):
                self.found.append((tag, name, value))
            elif name in ("srcset", "imagesrcset"):
                self.found += [(tag, name, p.strip().split(" ")[0]) for p in value.split(",")
                               if p.strip()]
            elif name in URL_ATTRIBUTES:
                self.found.append((tag, name, value.strip()))
            elif name == "style":
                self.found += [(tag, "style", u) for u in _CSS_URL.findall(value)]
        if tag in _SKIP:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.found += [("text", "text", m.group()) for m in _TEXT_URL.finditer(data)]


def html_urls(html: str) -> list[Found]:
    collect = _Collect()
    collect.feed(html)
    collect.close()
    return collect.found


def rendered_urls(markdown: str) -> list[Found]:
    md = MarkdownIt("gfm-like", {"html": True})
    md.validateLink = lambda url: True  # type: ignore[method-assign]
    return html_urls(md.render(markdown))


def allowed(found: Found) -> bool:
    """The test policy, restated: images from the CDN's /img/ and the wildcard and proxy image
    hosts, links to the docs site and github.com/acme/, https only, no secret anywhere."""
    element, attribute, url = found
    if attribute == "element" or attribute.startswith("on") or attribute == "style":
        return False
    if SECRET in url or "AKIA" in url:
        return False
    if attribute == "href" and url.startswith("#"):
        return True  # footnote anchors
    if element == "img" and attribute == "src":
        return (url.startswith(("https://cdn.acme-corp.example/img/",
                                "https://eu-prod.asyncgw.teams.example/urlp/"))
                or re.match(r"https://[a-z0-9.-]+\.(?:usercontent\.acme-corp|googleusercontent)"
                            r"\.example/", url) is not None)
    if (element, attribute) in (("a", "href"), ("text", "text")):
        return (url.startswith(("https://docs.acme-corp.example/", "https://github.com/acme/"))
                or _mention(url))
    return False


def _mention(url: str) -> bool:
    """A bare host name a renderer linked (``python.org``): no path, no query, and labels
    that are short or plain words (no mix of letters and digits to carry data)."""
    found = re.fullmatch(r"(?:http://)?((?:[a-z0-9-]+\.)+[a-z0-9-]+)(?::\d+)?/?", url, re.I)
    return found is not None and all(
        len(label) < 16 or label.isalpha() or label.startswith("xn--")
        for label in found.group(1).split("."))


def forbidden(found: list[Found]) -> list[Found]:
    return [f for f in found if not allowed(f)]
