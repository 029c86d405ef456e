"""The network side of `edge-ssd serve`: the listening socket, and uvicorn's settings with the
limits uvicorn lacks.

uvicorn closes idle keep-alive connections, but a connection that never finishes its request
headers stays open for ever (its keep-alive timer only runs after a response), and
`limit_concurrency` neither closes connections nor answers in OpenAI's shape. `guarded_h11`
adds both limits to uvicorn's h11 protocol.
"""
from __future__ import annotations

import asyncio
import copy
import errno
import socket
import time
from typing import Optional

from ..errors import EdgeSSDError
from .app import ServeOptions
from .protocol import APIError, dumps

MAX_HEADER_BYTES = 16 * 1024  # request line + headers: h11 answers 400 beyond (an API key fits many times)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the address as uvicorn would (IPv6 when the host has a colon), before the bundle is
    loaded and before anything is printed, so a busy port fails at once; asyncio listens on it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
    except OSError as e:  # socket.gaierror too: an unknown host name
        sock.close()
        hint = " (is another server running there? choose a port with --port)" if e.errno == errno.EADDRINUSE else ""
        raise EdgeSSDError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _busy_response(max_connections: int) -> bytes:
    err = APIError(503, f"the server has {max_connections} open connections, its limit; retry later",
                   type_="server_error", code="too_many_connections")
    body = dumps(err.body())
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            "\r\nretry-after: 1\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def guarded_h11(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with a header timeout and a connection limit.

    * A connection gets `header_timeout` seconds, from when it opens or from the first byte of
      its next request, to complete the request's headers; then it is closed.
    * Beyond `max_connections` open connections, a new one is answered 503 (JSON) and closed.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _busy_response(max_connections)
    warned = [0.0]  # when a refusal was last logged: a flood of connections is one line per minute

    class GuardedH11Protocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if time.monotonic() - warned[0] > 60:
                    warned[0] = time.monotonic()
                    self.logger.warning("refusing connections: %d are open, the limit (--max-connections) is %d",
                                        len(self.connections) - 1, max_connections)
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of a keep-alive connection's next request
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self._arm()  # part of a pipelined request is already buffered

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def log_config() -> dict:
    """uvicorn's logging with its access log on stderr too: stdout carries only the banner."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return cfg


def server_config(app, options: ServeOptions, verbose: bool = False, **overrides):
    """The uvicorn.Config that `edge-ssd serve` runs `app` with (tests run the same one)."""
    import uvicorn

    settings = dict(http=guarded_h11(options.header_timeout, options.max_connections),
                    timeout_keep_alive=options.keep_alive_timeout, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                    timeout_graceful_shutdown=options.shutdown_timeout, server_header=False, proxy_headers=False,
                    log_config=log_config(), log_level="info" if verbose else "warning", access_log=verbose,
                    lifespan="on")
    settings.update(overrides)
    return uvicorn.Config(app, **settings)
