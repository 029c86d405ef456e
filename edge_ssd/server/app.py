"""The HTTP application: shared server state, the ASGI callable that runs one request, and
the Starlette routes. Starlette and uvicorn are imported only when an app is built."""
from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import EdgeSSDError
from ..request import Request
from .admission import Gate
from .bridge import GenerationThread
from .hosts import HostPolicy, check_allowed
from .metrics import Metrics
from .protocol import (APIError, bad, check_content_type, choice, dumps, edge_ssd_field, finish_reason,
                       from_engine_error, now, parse_json, request_from_body, usage)

log = logging.getLogger("edge_ssd.server")

MiB = 1 << 20
# Extensions a client may use: per-chunk `edge_ssd_spans` (with "show_sources": true) and
# OpenAI's Predicted Outputs (`prediction`).
FEATURES = ("spans", "prediction")
DISCONNECTED = 499       # status recorded for a client that went away (nginx's convention)
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


# What a request cancelled by a shutdown past its deadline is told (instead of a cut connection).
SHUTTING_DOWN = APIError(503, "the server is shutting down and stopped this request; retry later",
                         type_="server_error", code="server_shutting_down", headers={"retry-after": "5"})


def check_api_key(key: Optional[str], source: str = "api_key") -> None:
    """Refuse, at start, a key that would silently disable auth (empty) or could never match.

    HTTP carries header values as bytes that servers decode as latin-1, while a key typed on a
    command line is UTF-8: a non-ASCII key would compare unequal to what every client sends.
    """
    if key is None:
        return
    if not key:
        raise EdgeSSDError(f"{source} is set but empty, which would turn authentication off; "
                           "give a key, or leave it unset to serve without one")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise EdgeSSDError(f"{source} must be printable ASCII without spaces (what an HTTP header can carry)")


@dataclass
class ServeOptions:
    model_name: Optional[str] = None      # default: the bundle's name
    api_key: Optional[str] = None         # when set, /v1/* and /metrics need `Authorization: Bearer KEY`
    host: str = "127.0.0.1"               # the bind address: with loopback names, what Host may name
    allowed_hosts: tuple = ()             # more Host names (`name` or `name:port`; `*`: no check)
    max_concurrency: int = 1              # requests generating at once (the engine's slots, batched together)
    queue: int = 8                        # requests waiting for a slot; beyond: 429
    max_body_bytes: int = MiB             # larger request bodies: 413
    max_tokens_cap: Optional[int] = None  # largest max_tokens accepted (default: the engine's context)
    defaults: Request = field(default_factory=Request)  # what a request does not set (the CLI's flags)
    metrics_window: int = 32              # requests averaged by the tokens/s and acceptance gauges
    shutdown_join_s: float = 10.0         # how long shutdown waits for generation threads
    # connection limits, applied by `net.server_config` (uvicorn has no header or body timeout)
    header_timeout: float = 10.0          # seconds a client has to send a request's headers
    body_timeout: float = 30.0            # then seconds to send its body (408 beyond)
    keep_alive_timeout: float = 5.0       # an idle keep-alive connection is closed after this
    max_connections: int = 64             # open connections; more are answered 503 and closed
    shutdown_timeout: float = 30.0        # after SIGTERM, seconds in-flight requests get to finish

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        self.allowed_hosts = check_allowed(self.allowed_hosts)
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise EdgeSSDError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise EdgeSSDError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.max_connections < 1:
            raise EdgeSSDError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_concurrency < 1:
            raise EdgeSSDError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.queue < 0:
            raise EdgeSSDError(f"queue must be >= 0, got {self.queue}")
        if self.max_body_bytes < 1024:
            raise EdgeSSDError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


async def send_json(send, status: int, obj: Any, headers: Optional[dict] = None) -> None:
    body = dumps(obj)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class EdgeServer:
    """State shared by the routes: engine, options, gate, metrics, live jobs."""

    def __init__(self, engine, options: ServeOptions):
        self.engine = engine
        self.options = options
        self.model = options.model_name or getattr(getattr(engine, "bundle", None), "name", None) or "edge-ssd"
        ctx = int(getattr(engine, "max_context", 0) or 0) or 1_000_000
        self.cap = min(options.max_tokens_cap or ctx, ctx)
        self.gate = Gate(options.max_concurrency, options.queue)
        self.metrics = Metrics(options.metrics_window)
        self.jobs: set = set()
        self.created = now()
        self.hosts = HostPolicy(options.host, options.allowed_hosts)
        # generations using the engine at once: its slots (see GenerationThread); more admitted
        # requests wait for one
        self.turn = threading.Semaphore(getattr(engine, "slots", 1))
        self._key = options.api_key.encode("ascii") if options.api_key is not None else None

    # -- checks ------------------------------------------------------------------------------
    def check_auth(self, request) -> None:
        if self._key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        # header values arrive as latin-1 text: their bytes are what the client sent
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self._key)
        if not ok:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           type_="authentication_error", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})

    async def read_body(self, request) -> dict:
        limit = self.options.max_body_bytes
        too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    raise too_big
            except ValueError:
                raise bad("invalid Content-Length header") from None
        from starlette.requests import ClientDisconnect

        async def read() -> bytes:
            buf = bytearray()
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise too_big
            return bytes(buf)

        try:
            raw = await asyncio.wait_for(read(), self.options.body_timeout)
        except ClientDisconnect:
            raise APIError(DISCONNECTED, "the client went away while sending the request") from None
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.options.body_timeout:g} s",
                           code="request_timeout", headers={"connection": "close"}) from None
        return parse_json(raw)

    # -- endpoints ---------------------------------------------------------------------------
    async def generation(self, request, endpoint: str):
        """Validate, admit, prepare; the returned ASGI callable runs the request."""
        self.check_auth(request)
        check_content_type(request.headers.get("content-type"))
        body = await self.read_body(request)
        req = request_from_body(body, self.options.defaults, self.cap, endpoint)
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise bad("stream must be a boolean", param="stream")
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        if not self.gate.try_admit():
            raise APIError(429, f"the server is busy ({self.gate.running} running, {self.gate.waiting} queued); "
                           "retry later", type_="rate_limit_error", code="server_busy",
                           headers={"retry-after": "1"})
        try:
            import anyio.to_thread

            # tokenization and the chat template: the engine's own checks, off the event loop
            stream = await anyio.to_thread.run_sync(functools.partial(self.engine.stream, request=req))
        except EdgeSSDError as e:
            self.gate.leave()
            raise from_engine_error(e) from None
        except BaseException:
            self.gate.leave()
            raise
        return RequestRun(self, endpoint, stream, stream_flag, include_usage)

    def health(self) -> dict:
        out = {"status": "ok", "model": self.model, "running": self.gate.running, "queued": self.gate.waiting,
               "max_context": getattr(self.engine, "max_context", None), "features": list(FEATURES)}
        plan = getattr(self.engine, "plan", None)  # the memory governor's sizing, when the engine has one
        if plan is not None and hasattr(plan, "to_json"):
            out["memory"] = plan.to_json()
        return out

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "edge-ssd"}

    async def shutdown(self) -> None:
        """Lifespan end: stop generations still running and wait (bounded) for their threads."""
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel.set()
        deadline = time.monotonic() + self.options.shutdown_join_s
        for job in jobs:
            if job.thread is not None:
                import anyio.to_thread

                await anyio.to_thread.run_sync(job.thread.join, max(0.0, deadline - time.monotonic()))
        if jobs:
            log.info("stopped %d generation(s) at shutdown", len(jobs))


class RequestRun:
    """The ASGI callable that runs one admitted request: wait for a slot, generate, answer.

    Owns the admission: whatever happens (error, disconnect, cancellation), the slot and the
    queue place are given back and the generation thread is stopped.
    """

    def __init__(self, srv: EdgeServer, endpoint: str, stream, streaming: bool, include_usage: bool):
        self.srv, self.endpoint, self.stream, self.streaming = srv, endpoint, stream, streaming
        self.include_usage = include_usage
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = now()
        self.started = False  # the event stream's 200 is sent: errors are events from now on

    async def __call__(self, scope, receive, send) -> None:
        srv = self.srv
        loop = asyncio.get_running_loop()
        job = GenerationThread(self.stream, loop, srv.turn)
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch(receive, gone, job))
        status = 500
        try:
            if not await srv.gate.acquire(gone):
                status = DISCONNECTED
                return
            try:
                srv.jobs.add(job)
                job.start()
                status = await (self._stream(send, job) if self.streaming else self._collect(send, job))
            except asyncio.CancelledError:  # shutdown past its deadline (uvicorn cancels the request)
                status = SHUTTING_DOWN.status
                if not self.started:
                    raise  # nothing sent yet: `Guard` answers with a JSON 503
                await self._end_stream(send, SHUTTING_DOWN.body())
            finally:
                await job.finish()
                srv.jobs.discard(job)
                srv.gate.release()
        except asyncio.CancelledError:
            status = SHUTTING_DOWN.status
            raise
        finally:
            watcher.cancel()
            srv.gate.leave()
            if status == DISCONNECTED:
                srv.metrics.disconnects += 1
            srv.metrics.requests[(self.endpoint, status)] += 1

    @staticmethod
    async def _watch(receive, gone: asyncio.Event, job: GenerationThread) -> None:
        """The body is read: the next message is http.disconnect (client gone or response done)."""
        try:
            while True:
                msg = await receive()
                if msg.get("type") == "http.disconnect":
                    break
        except Exception:  # noqa: BLE001 - a broken connection is a gone client
            pass
        gone.set()
        job.cancel.set()
        job.events.put_nowait(("gone", None))

    # -- answers -----------------------------------------------------------------------------
    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.srv.model,
                "system_fingerprint": _fingerprint()}

    def _choice(self, text: Optional[str], finish: Optional[str], delta: bool, first: bool = False) -> dict:
        return choice(self.endpoint, text, finish, delta, first)

    async def _collect(self, send, job: GenerationThread) -> int:
        pieces = []
        while True:
            kind, val = await job.next()
            if kind == "piece":
                pieces.append(val)
            elif kind == "gone":
                return DISCONNECTED
            elif kind == "error":
                err = self._error(val)
                await send_json(send, err.status, err.body())
                return err.status
            else:  # done
                res = val
                if res is None:
                    return DISCONNECTED
                self.srv.metrics.finished(res.stats, res.finish_reason)
                obj = self._envelope("chat.completion" if self.endpoint == "chat" else "text_completion")
                obj["choices"] = [self._choice(res.text, finish_reason(res.finish_reason), delta=False)]
                obj["usage"] = usage(res.stats)
                obj["edge_ssd"] = edge_ssd_field(res)
                await send_json(send, 200, obj)
                return 200

    async def _event(self, send, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else dumps(payload)
        await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

    async def _end_stream(self, send, last: Optional[dict] = None) -> None:
        """A stream always ends the same way: its last event (an error, or usage), then [DONE]."""
        if last is not None:
            await self._event(send, last)
        await self._event(send, b"[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send, job: GenerationThread) -> int:
        obj_name = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
            c = self._envelope(obj_name)
            c["choices"] = [self._choice(text, finish, delta=True, first=first)]
            return c

        while True:
            kind, val = await job.next()
            if kind == "gone":
                return DISCONNECTED
            if kind == "error" and not self.started:  # nothing sent yet: a plain error response
                err = self._error(val)
                await send_json(send, err.status, err.body())
                return err.status
            if not self.started:
                self.started = True
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                if self.endpoint == "chat":
                    await self._event(send, chunk(None, first=True))
            if kind == "piece":
                c = chunk(val)
                if getattr(val, "spans", None):  # asked for with show_sources: where each token came from
                    c["edge_ssd_spans"] = [{"text": t, "source": src} for t, src in val.spans]
                await self._event(send, c)
                continue
            if kind == "error":
                err = self._error(val)
                await self._end_stream(send, err.body())
                return err.status
            res = val
            if res is None:
                return DISCONNECTED
            self.srv.metrics.finished(res.stats, res.finish_reason)
            last = chunk(None, finish_reason(res.finish_reason))
            last["usage"] = usage(res.stats)
            last["edge_ssd"] = edge_ssd_field(res)
            await self._event(send, last)
            u = None
            if self.include_usage:
                u = self._envelope(obj_name)
                u["choices"], u["usage"] = [], usage(res.stats)
            await self._end_stream(send, u)
            return 200

    def _error(self, e: BaseException) -> APIError:
        if isinstance(e, EdgeSSDError):
            return from_engine_error(e)
        log.error("generation failed", exc_info=(type(e), e, e.__traceback__))
        return APIError(500, f"generation failed: {type(e).__name__}", type_="server_error", code="internal_error")


class Guard:
    """The outermost ASGI layer, around every route.

    * Refuses a request whose Host is not a name of this server (421), before auth or any
      route runs: see `hosts.HostPolicy`.
    * A request that uvicorn cancels because a shutdown ran past its deadline, before it sent
      anything, is answered with a JSON 503 (uvicorn would log a traceback and send a
      plain-text 500). The cancellation ends here: the request is over, nothing is left to stop.
    """

    def __init__(self, app, srv: EdgeServer):
        self.app, self.srv = app, srv

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
        refusal = self.srv.hosts.refusal(host, (scope.get("server") or (None, None))[1])
        if refusal is not None:
            self.srv.metrics.requests[("host", 421)] += 1
            await send_json(send, 421, APIError(421, refusal, code="invalid_host").body())
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            log.info("shutdown deadline: %s %s stopped", scope["method"], scope["path"])
            if not started:
                await send_json(send, SHUTTING_DOWN.status, SHUTTING_DOWN.body(), SHUTTING_DOWN.headers)


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    from .. import __version__

    return f"edge-ssd-{__version__}"




def require_serve_deps() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise EdgeSSDError(f"edge-ssd serve needs the serve extra (pip install 'edge-ssd[serve]'): {e}") from e


def build_app(engine, options: Optional[ServeOptions] = None):
    """A Starlette app serving `engine` (an edge_ssd.Engine, or anything with its `stream`)."""
    require_serve_deps()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    from .web import routes as page_routes

    srv = EdgeServer(engine, options or ServeOptions())

    def api_error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def handles_errors(fn):
        @functools.wraps(fn)
        async def wrapper(request):
            try:
                return await fn(request)
            except APIError as e:
                srv.metrics.requests[(fn.__name__, e.status)] += 1
                return api_error(e)
            except Exception as e:  # noqa: BLE001 - a bug, not the client's fault: log it, answer 500
                log.error("%s failed", fn.__name__, exc_info=(type(e), e, e.__traceback__))
                srv.metrics.requests[(fn.__name__, 500)] += 1
                return api_error(APIError(500, f"internal error: {type(e).__name__}", type_="server_error",
                                          code="internal_error"))
        return wrapper

    @handles_errors
    async def completions(request):
        return await srv.generation(request, "completions")

    @handles_errors
    async def chat(request):
        return await srv.generation(request, "chat")

    @handles_errors
    async def models(request):
        srv.check_auth(request)
        return JSONResponse(srv.models())

    @handles_errors
    async def model(request):
        srv.check_auth(request)
        if request.path_params["model"] != srv.model:
            raise APIError(404, f"model {request.path_params['model']!r} not found", code="model_not_found",
                           param="model")
        return JSONResponse(srv.model_card())

    async def health(request):
        return JSONResponse(srv.health())

    @handles_errors
    async def metrics(request):
        srv.check_auth(request)
        batch = srv.engine.batch_stats() if hasattr(srv.engine, "batch_stats") else None
        return PlainTextResponse(srv.metrics.render(srv.gate, srv.model, batch),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request, exc: HTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return api_error(APIError(exc.status_code, str(exc.detail), type_=type_))

    async def server_error(request, exc: Exception):
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
        return api_error(APIError(500, "internal server error", type_="server_error", code="internal_error"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        await srv.shutdown()

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *page_routes(),  # the chat page: / and /static/NAME (server/web.py)
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, srv=srv)],
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.edge_ssd = srv
    return app


