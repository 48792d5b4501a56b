"""The courier: a separate, sandboxed "dumb worker" that makes declared external calls for an agent.

An agent that needs to open an issue or post a message does not get a token and a free hand. The
policy declares ``actions``, each a request template and a JSON Schema for its parameters; the
agent calls ``POST /actions/NAME`` with parameters, and the courier fills the template in and sends
the request through the same proxy. The agent never chooses a URL, a header or a body shape, and
never holds the credential the request carries.

::

    template.py     the request template of an action, parsed (pure; no policy import)
    definitions.py  checks actions against the policy: schemas, placeholders, credentials, rules
    render.py       params -> the one request they stand for (validated, percent-encoded)
    screen.py       the parent's checks of params: secrets in any encoding, dynamic links
    wire.py         the JSON-lines channel between egresslock and the worker
    lockdown.py     Landlock: the worker gives up every file before it takes a call
    worker.py       ``python -m egresslock.courier.worker``: the process in its own sandbox

The wiring (the worker's sandbox, the agent's endpoint, labels and audit rows) is in
:mod:`egresslock.cli.courier_session`. The user's guide is docs/courier.md.
"""
