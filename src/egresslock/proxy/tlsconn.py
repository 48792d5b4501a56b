"""TLS over a proxy connection with ``ssl.SSLObject`` and memory BIOs.

The inspected tunnel speaks TLS on a socket the proxy already owns, whose buffer may hold the
ClientHello the proxy peeked at to check SNI. A memory-BIO TLS object takes those bytes first
and then whatever the socket delivers, and exposes the same interface as :class:`Conn`
(``fill``, ``read_head``, ``read_some``, ``send``), so the plain-HTTP exchange code forwards
decrypted requests unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from egresslock.proxy.conn import RECV_SIZE, Conn


class TLSError(Exception):
    """A TLS handshake or record failed; the message says which side and why."""


class TLSConn(Conn):
    """A TLS session on top of a connected :class:`Conn`."""

    __slots__ = ("_ended", "_in", "_out", "_raw", "_tls")

    def __init__(self, raw: Conn, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        raw.stop_reading()  # the socket is read through the loop's sock_recv from now on
        super().__init__(raw.sock)
        self._raw = raw
        self._ended = False
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        pending = raw.take_buffer()
        if pending:
            self._in.write(pending)

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _recv(self) -> bool:
        data = await self.loop.sock_recv(self.sock, RECV_SIZE)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        """Complete the handshake; raises TLSError with the reason."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._recv():
                    raise TLSError("peer closed the connection during the TLS handshake") from None
                continue
            except ssl.SSLCertVerificationError as exc:
                await self._flush_quietly()
                raise TLSError(f"certificate verification failed: {exc.verify_message}") from exc
            except ssl.SSLError as exc:
                await self._flush_quietly()
                raise TLSError(f"TLS handshake failed: {exc.reason or exc}") from exc
            await self._flush()
            return

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(OSError):
            await self._flush()

    @property
    def alpn(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    async def readable(self, deadline: float | None = None) -> None:
        """Nothing to wait for here: decrypted bytes may already wait inside TLS; ``fill``
        waits when it has to."""

    async def fill(self, deadline: float | None = None) -> bool:
        if deadline is None:
            return await self._fill()
        async with asyncio.timeout_at(deadline):
            return await self._fill()

    async def _fill(self) -> bool:
        while True:
            try:
                data = self._tls.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._recv()  # at end of stream the next read raises SSLEOFError
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return False
            except ssl.SSLError as exc:
                raise OSError(f"TLS error: {exc.reason or exc}") from exc
            if not data:
                return False
            self.buf += data
            return True

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._tls.write(view[:RECV_SIZE])
            view = view[written:]
            await self._flush()

    def _end_session(self) -> None:
        if self.closed or self._ended:
            return
        self._ended = True
        try:
            self._tls.unwrap()
            data = self._out.read()
            if data:
                self.sock.send(data)
        except (ssl.SSLError, OSError, ValueError):
            pass

    def close(self) -> None:
        self._end_session()
        super().close()
