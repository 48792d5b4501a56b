"""Content controls: secrets in any encoding, transforms, dynamic links, credential placeholders
and budgets. Every enforcement point asks one :class:`~egresslock.content.engine.ContentPolicy`.
Submodules are imported where they are used, so a tool call that needs none of them pays nothing.
"""
