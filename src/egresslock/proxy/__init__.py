"""The egress proxy: HTTP/1.1 forward proxy and CONNECT tunnels, deciding every request.

``http1`` and ``tls`` are sans-IO (bytes in, values out); ``conn``, ``relay``, ``forward``,
``tunnel`` and ``server`` do the I/O on the event loop.
"""
