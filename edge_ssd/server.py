"""`edge-ssd serve`: an OpenAI-compatible HTTP server on Starlette + uvicorn.

    edge-ssd serve --bundle models/qwen2.5-coder-0.5b-1.5b --port 8080

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus text).

How a request runs. The handler checks auth, body size and parameters (4xx in OpenAI's error
shape), then asks the gate for admission: at most `max_concurrency` requests run and `queue`
wait; anyone beyond that gets 429 at once, so memory and latency stay bounded under load.
The engine's own checks (tokenization, chat template, context length) run in a worker thread,
then the request waits for a running slot. Generation is blocking numpy/onnxruntime work, so
each running request iterates its `Stream` in a dedicated thread that hands the text pieces to
the event loop through an asyncio queue; the loop stays free for other clients, /health and
/metrics. A task watches the connection: when the client goes away (queued or mid-stream) a
cancel flag is set, the worker closes the Stream's generator after the current round (which
releases the engine's lock) and the slot is freed. On SIGTERM uvicorn stops accepting, lets
in-flight requests finish for up to `--shutdown-timeout` seconds, then cancels them; the
lifespan hook stops and joins whatever generation threads are left.

Starlette and uvicorn are imported lazily (the `serve` extra): the runtime core and the CLI
parser import this module without them.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import EdgeSSDError, MemoryBudgetError

log = logging.getLogger("edge_ssd.server")

MiB = 1 << 20
MAX_STOP = 16            # stop strings per request
MAX_STOP_CHARS = 256     # characters per stop string
DISCONNECTED = 499       # status recorded for a client that went away (nginx's convention)
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
# The engine's parameter names as they appear in its RequestError messages -> OpenAI names.
_PARAM_OF = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "stop": "stop"}


@dataclass
class ServeOptions:
    model_name: Optional[str] = None      # default: the bundle's name
    api_key: Optional[str] = None         # when set, /v1/* and /metrics need `Authorization: Bearer KEY`
    max_concurrency: int = 1              # requests generating at once (the engine runs one at a time)
    queue: int = 8                        # requests waiting for a slot; beyond: 429
    max_body_bytes: int = MiB             # larger request bodies: 413
    max_tokens_cap: Optional[int] = None  # largest max_tokens accepted (default: the engine's context)
    defaults: dict = field(default_factory=dict)  # engine.stream keywords: mode, k, max_new_tokens, ...
    metrics_window: int = 32              # requests averaged by the tokens/s and acceptance gauges
    shutdown_join_s: float = 10.0         # how long shutdown waits for generation threads

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise EdgeSSDError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.queue < 0:
            raise EdgeSSDError(f"queue must be >= 0, got {self.queue}")
        if self.max_body_bytes < 1024:
            raise EdgeSSDError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


# --------------------------------------------------------------------------------------------
# Errors and request parsing (no Starlette needed)


class APIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(e: EdgeSSDError, endpoint: str) -> APIError:
    """A RequestError (or other user-facing error) from the engine as a 400 naming its param;
    a MemoryBudgetError as 503."""
    msg = str(e)
    if isinstance(e, MemoryBudgetError):  # the device, not the request, is short: retry later or smaller
        return APIError(503, msg, type_="server_error", code="insufficient_memory", headers={"retry-after": "5"})
    first = msg.split(" ", 1)[0].strip(",:")
    param = _PARAM_OF.get(first, first if first in _EXTRA_TYPES else None)
    code = None
    if msg.startswith("the prompt has") and "context limit" in msg:
        param, code = ("messages" if endpoint == "chat" else "prompt"), "context_length_exceeded"
    elif msg.startswith(("message ", "messages ", "chat template")):
        param = "messages"
    elif msg.startswith("stop strings"):
        param = "stop"
    elif msg.startswith("need 0 <= k_min"):
        param = "k_min"
    elif msg.startswith(("the prompt", "give exactly one")):
        param = "messages" if endpoint == "chat" else "prompt"
    return APIError(400, msg, param=param, code=code)


def parse_json(raw: bytes) -> dict:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", code="invalid_json")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt(body: dict, name: str, check, what: str) -> Any:
    v = body.get(name)
    if v is not None and not check(v):
        raise _bad(f"{name} must be {what}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    return v


def _unsupported(body: dict) -> None:
    """OpenAI fields this server does not implement: refused unless they ask for the default."""
    if body.get("n") not in (None, 1):
        raise _bad("only n = 1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise _bad("only best_of = 1 is supported", param="best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported (speculative decoding samples the model's own distribution)",
                       param=name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs are not supported", param="logprobs")
    if body.get("echo") not in (None, False):
        raise _bad("echo is not supported", param="echo")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix is not supported", param="suffix")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias is not supported", param="logit_bias")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools and function calling are not supported", param="tools")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("only response_format {\"type\": \"text\"} is supported", param="response_format")


# Request fields that map to engine keywords under another name, or need a type of their own.
_OPENAI = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"}
# Non-standard fields passed to the engine as they are, when its `stream` takes them.
_EXTRA_TYPES = {
    "top_k": (_is_int, "an integer"),
    "mode": (lambda v: isinstance(v, str), "a string"),
    "drafter": (lambda v: isinstance(v, str), "a string"),
    "k": (lambda v: _is_int(v) or v == "auto", "an integer or \"auto\""),
    "k_min": (_is_int, "an integer"),
    "k_max": (_is_int, "an integer"),
    "fanout": (_is_int, "an integer"),
}
_NOT_EXTRA = {"prompt", "messages", "raw", "max_new_tokens", "temperature", "top_p", "seed", "stop", "self"}


def engine_params(engine) -> frozenset:
    """Keyword names the engine's `stream` accepts (all known ones when it takes **kwargs)."""
    import inspect

    try:
        sig = inspect.signature(engine.stream)
    except (TypeError, ValueError):
        return frozenset(_EXTRA_TYPES)
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(_EXTRA_TYPES)
    return frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)) - _NOT_EXTRA


def gen_kwargs(body: dict, defaults: dict, cap: int, extras: frozenset = frozenset(_EXTRA_TYPES)) -> dict:
    """Engine keyword arguments from an OpenAI request body (types checked here, ranges by the engine).

    `defaults` are the server's (from the command line); a field neither set nor defaulted is
    left to the engine's own default. `extras` are the non-standard fields the engine takes.
    """
    _unsupported(body)
    kw = dict(defaults)
    for name in ("max_completion_tokens", "max_tokens"):
        mt = _opt(body, name, _is_int, "an integer")
        if mt is not None:
            if mt < 1:
                raise _bad(f"{name} must be >= 1, got {mt}", param=name)
            if mt > cap:
                raise _bad(f"{name} must be <= {cap} on this server, got {mt}", param=name)
            kw["max_new_tokens"] = mt
            break
    else:
        kw["max_new_tokens"] = min(kw.get("max_new_tokens", 128), cap)
    for name in ("temperature", "top_p"):
        v = _opt(body, name, _is_num, "a number")
        if v is not None:
            kw[name] = v
    seed = _opt(body, "seed", _is_int, "an integer")
    if seed is not None:
        kw["seed"] = seed
    for name in extras:
        check, what = _EXTRA_TYPES.get(name, (lambda v: isinstance(v, (str, int, float)), "a string or number"))
        v = _opt(body, name, check, what)
        if v is not None:
            kw[name] = v
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop must be a non-empty string or a list of non-empty strings", param="stop")
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise _bad(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters", param="stop")
        kw["stop"] = stops
    if "stop" in kw:
        kw["stop"] = list(kw["stop"] or ())
    return kw


def chat_messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"message {i} must be an object with a string role", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"message {i}: only text content parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise _bad(f"message {i}: content must be a string or a list of text parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, list):
        raise _bad("prompt must be one string (batches and token-id prompts are not supported)", param="prompt")
    if not isinstance(p, str):
        raise _bad("prompt must be a string", param="prompt")
    return p


# --------------------------------------------------------------------------------------------
# Admission, metrics, and the worker thread


class Gate:
    """At most `running` requests hold a slot and `waiting` wait for one; beyond that: turned away.

    Used from the event loop only, so plain counters are safe.
    """

    def __init__(self, running: int, waiting: int):
        self.max_running, self.max_total = running, running + waiting
        self.admitted = 0   # running + waiting
        self.running = 0
        self._sem: Optional[asyncio.Semaphore] = None  # made in the serving loop (Python 3.9 binds at creation)

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def try_admit(self) -> bool:
        if self.admitted >= self.max_total:
            return False
        self.admitted += 1
        return True

    def leave(self) -> None:
        self.admitted -= 1

    async def acquire(self, gone: asyncio.Event) -> bool:
        """Wait for a running slot; False (and no slot) if the client went away first."""
        if gone.is_set():
            return False
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_running)
        if not self._sem.locked():
            await self._sem.acquire()  # a free slot: no wait
        else:
            acq = asyncio.ensure_future(self._sem.acquire())
            waiter = asyncio.ensure_future(gone.wait())
            try:
                await asyncio.wait({acq, waiter}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if acq.done() and not acq.cancelled() and acq.exception() is None:
                    self._sem.release()
                else:
                    acq.cancel()  # Semaphore.acquire hands a slot it was woken for to the next waiter
                raise
            finally:
                waiter.cancel()
            if not acq.done():
                acq.cancel()
                try:
                    await acq
                except asyncio.CancelledError:
                    pass
            if acq.cancelled() or acq.exception() is not None:
                return False
        self.running += 1
        if gone.is_set():
            self.release()
            return False
        return True

    def release(self) -> None:
        self.running -= 1
        self._sem.release()


class Metrics:
    def __init__(self, window: int):
        self.requests: Counter = Counter()      # (endpoint, status) -> count
        self.finishes: Counter = Counter()      # engine finish reason -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.drafted = 0
        self.accepted = 0
        self.generation_s = 0.0
        self.disconnects = 0
        self.recent: deque = deque(maxlen=window)  # stats dicts of the last requests

    def finished(self, stats: dict, reason: str = "") -> None:
        self.finishes[reason or stats.get("finish_reason") or "stop"] += 1
        self.prompt_tokens += int(stats.get("prompt_tokens", 0))
        self.completion_tokens += int(stats.get("new_tokens", 0))
        self.drafted += int(stats.get("drafted", 0))
        self.accepted += int(stats.get("accepted", 0))
        self.generation_s += float(stats.get("total_s", 0.0))
        self.recent.append(stats)

    def render(self, gate: Gate, model: str) -> str:
        import psutil

        out = []

        def metric(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP edge_ssd_{name} {help_}")
            out.append(f"# TYPE edge_ssd_{name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{_label(val)}"' for k, val in labels.items()) + "}" if labels else ""
                out.append(f"edge_ssd_{name}{lab} {v}")

        recent = list(self.recent)
        rates = [float(s.get("tokens_per_s", 0.0)) for s in recent if s.get("new_tokens", 0) > 1]
        drafted = sum(int(s.get("drafted", 0)) for s in recent)
        accepted = sum(int(s.get("accepted", 0)) for s in recent)
        spec = [float(s.get("mean_accepted_len", 0.0)) for s in recent if s.get("drafted", 0)]
        proc = psutil.Process()
        metric("info", "gauge", "Served model.", [({"model": model}, 1)])
        metric("requests_total", "counter", "Requests answered, by endpoint and HTTP status "
               "(499: the client went away).",
               [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(self.requests.items())])
        metric("finished_total", "counter", "Finished generations by the engine's finish reason "
               "(stop, length, context, memory).", [({"reason": r}, n) for r, n in sorted(self.finishes.items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [({}, self.prompt_tokens)])
        metric("completion_tokens_total", "counter", "Tokens generated by finished requests.",
               [({}, self.completion_tokens)])
        metric("draft_tokens_total", "counter", "Draft tokens proposed.", [({}, self.drafted)])
        metric("draft_tokens_accepted_total", "counter", "Draft tokens accepted.", [({}, self.accepted)])
        metric("generation_seconds_total", "counter", "Time spent generating.", [({}, round(self.generation_s, 4))])
        metric("client_disconnects_total", "counter", "Requests stopped because the client went away.",
               [({}, self.disconnects)])
        metric("tokens_per_second", "gauge", f"Mean decode rate of the last {self.recent.maxlen} requests.",
               [({}, round(sum(rates) / len(rates), 3) if rates else 0.0)])
        metric("acceptance_rate", "gauge", f"Draft acceptance rate over the last {self.recent.maxlen} requests.",
               [({}, round(accepted / drafted, 4) if drafted else 0.0)])
        metric("mean_accepted_length", "gauge", "Mean draft tokens accepted per round, last requests.",
               [({}, round(sum(spec) / len(spec), 4) if spec else 0.0)])
        metric("requests_running", "gauge", "Requests holding a generation slot.", [({}, gate.running)])
        metric("queue_depth", "gauge", "Requests waiting for a generation slot.", [({}, gate.waiting)])
        metric("queue_capacity", "gauge", "Slots plus queue places; more requests get 429.", [({}, gate.max_total)])
        metric("process_resident_memory_bytes", "gauge", "Resident set size of the server process.",
               [({}, proc.memory_info().rss)])
        metric("memory_available_bytes", "gauge", "Memory available to new allocations (system).",
               [({}, psutil.virtual_memory().available)])
        return "\n".join(out) + "\n"


def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Job:
    """One request's generation: a thread iterates the engine's Stream and posts to the loop.

    Events on `events`: ("piece", text), then ("done", Result or None when cancelled) or
    ("error", exception); ("gone", None) is posted by the connection watcher.
    """

    def __init__(self, stream, loop: asyncio.AbstractEventLoop):
        self.stream = stream
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.ended = False  # the loop has seen the terminal event

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="edge-ssd-generate", daemon=True)
        self.thread.start()

    def _post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel.set()

    def _run(self) -> None:
        it = iter(self.stream)
        final: tuple = ("done", None)
        try:
            if not self.cancel.is_set():
                for piece in it:
                    self._post(("piece", piece))
                    if self.cancel.is_set():
                        break
        except BaseException as e:  # noqa: BLE001 - reported to the request, never lost
            final = ("error", e)
        finally:
            try:
                it.close()  # a cancelled generation stops here and releases the engine's lock
            except Exception:  # noqa: BLE001
                log.exception("closing a generation failed")
        if final[0] == "done" and not self.cancel.is_set():
            final = ("done", getattr(self.stream, "result", None))
        self._post(final)

    async def next(self) -> tuple:
        item = await self.events.get()
        if item[0] in ("done", "error"):
            self.ended = True
        return item

    async def finish(self) -> None:
        """Stop the generation (if running) and wait until its thread has let go of the engine."""
        self.cancel.set()
        if self.thread is None:
            return
        while not self.ended:
            try:
                await self.next()
            except asyncio.CancelledError:  # shutdown: the thread is a daemon and stops at its next round
                return


def _now() -> int:
    return int(time.time())


def _plain(o: Any) -> Any:
    """json.dumps fallback for numpy scalars and arrays in a stats dict."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


async def _send_json(send, status: int, obj: Any, headers: Optional[dict] = None) -> None:
    body = _dumps(obj)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _finish_reason(reason: str) -> str:
    """OpenAI's finish_reason: "stop" (EOS or a stop string), else "length" (the token budget,
    the context, or the memory governor cut it short; `edge_ssd.finish_reason` says which)."""
    return "stop" if reason in ("stop", "") else "length"


def _extra(res) -> dict:
    """The `edge_ssd` field: the engine's stats, plus its error when it ended a request early."""
    out = dict(res.stats)
    out.setdefault("finish_reason", res.finish_reason)
    if getattr(res, "error", ""):
        out["error"] = res.error
    return out


# --------------------------------------------------------------------------------------------
# The server


class EdgeServer:
    """State shared by the routes: engine, options, gate, metrics, live jobs."""

    def __init__(self, engine, options: ServeOptions):
        self.engine = engine
        self.options = options
        self.model = options.model_name or getattr(getattr(engine, "bundle", None), "name", None) or "edge-ssd"
        ctx = int(getattr(engine, "max_context", 0) or 0) or 1_000_000
        self.cap = min(options.max_tokens_cap or ctx, ctx)
        self.extras = engine_params(engine)
        known = self.extras | {"max_new_tokens", "temperature", "top_p", "seed", "stop"}
        self.defaults = {k: v for k, v in options.defaults.items() if k in known}
        self.gate = Gate(options.max_concurrency, options.queue)
        self.metrics = Metrics(options.metrics_window)
        self.jobs: set = set()
        self.created = _now()
        self._key = options.api_key.encode() if options.api_key else None

    # -- checks ------------------------------------------------------------------------------
    def check_auth(self, request) -> None:
        if self._key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key)
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
                raise _bad("invalid Content-Length header") from None
        from starlette.requests import ClientDisconnect

        buf = bytearray()
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise too_big
        except ClientDisconnect:
            raise APIError(DISCONNECTED, "the client went away while sending the request") from None
        return parse_json(bytes(buf))

    # -- endpoints ---------------------------------------------------------------------------
    async def generation(self, request, endpoint: str):
        """Validate, admit, prepare; the returned ASGI callable runs the request."""
        self.check_auth(request)
        body = await self.read_body(request)
        kw = gen_kwargs(body, self.defaults, self.cap, self.extras)
        if endpoint == "chat":
            src = dict(messages=chat_messages(body))
        else:
            raw = body.get("raw", True)
            if not isinstance(raw, bool):
                raise _bad("raw must be a boolean", param="raw")
            src = dict(prompt=completion_prompt(body), raw=raw)
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise _bad("stream must be a boolean", param="stream")
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and so.get("include_usage") is True
        if not self.gate.try_admit():
            raise APIError(429, f"the server is busy ({self.gate.running} running, {self.gate.waiting} queued); "
                           "retry later", type_="rate_limit_error", code="server_busy",
                           headers={"retry-after": "1"})
        try:
            import anyio.to_thread

            # tokenization and the chat template: the engine's own checks, off the event loop
            stream = await anyio.to_thread.run_sync(functools.partial(self.engine.stream, **src, **kw))
        except EdgeSSDError as e:
            self.gate.leave()
            raise from_engine_error(e, endpoint) from None
        except BaseException:
            self.gate.leave()
            raise
        return _Run(self, endpoint, stream, stream_flag, include_usage, kw)

    def health(self) -> dict:
        out = {"status": "ok", "model": self.model, "running": self.gate.running, "queued": self.gate.waiting,
               "max_context": getattr(self.engine, "max_context", None)}
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


class _Run:
    """The ASGI callable that runs one admitted request: wait for a slot, generate, answer.

    Owns the admission: whatever happens (error, disconnect, cancellation), the slot and the
    queue place are given back and the generation thread is stopped.
    """

    def __init__(self, srv: EdgeServer, endpoint: str, stream, streaming: bool, include_usage: bool, kw: dict):
        self.srv, self.endpoint, self.stream, self.streaming = srv, endpoint, stream, streaming
        self.include_usage, self.kw = include_usage, kw
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        self.id = prefix + uuid.uuid4().hex[:24]
        self.created = _now()

    async def __call__(self, scope, receive, send) -> None:
        srv = self.srv
        loop = asyncio.get_running_loop()
        job = Job(self.stream, loop)
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
            finally:
                await job.finish()
                srv.jobs.discard(job)
                srv.gate.release()
        finally:
            watcher.cancel()
            srv.gate.leave()
            if status == DISCONNECTED:
                srv.metrics.disconnects += 1
            srv.metrics.requests[(self.endpoint, status)] += 1

    @staticmethod
    async def _watch(receive, gone: asyncio.Event, job: Job) -> None:
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
    def _usage(self, stats: dict) -> dict:
        p, c = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.srv.model,
                "system_fingerprint": _fingerprint()}

    def _choice(self, text: Optional[str], finish: Optional[str], delta: bool, first: bool = False) -> dict:
        if self.endpoint == "chat":
            if delta:
                d: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    async def _collect(self, send, job: Job) -> int:
        pieces = []
        while True:
            kind, val = await job.next()
            if kind == "piece":
                pieces.append(val)
            elif kind == "gone":
                return DISCONNECTED
            elif kind == "error":
                err = self._error(val)
                await _send_json(send, err.status, err.body())
                return err.status
            else:  # done
                res = val
                if res is None:
                    return DISCONNECTED
                self.srv.metrics.finished(res.stats, res.finish_reason)
                obj = self._envelope("chat.completion" if self.endpoint == "chat" else "text_completion")
                obj["choices"] = [self._choice(res.text, _finish_reason(res.finish_reason), delta=False)]
                obj["usage"] = self._usage(res.stats)
                obj["edge_ssd"] = _extra(res)
                await _send_json(send, 200, obj)
                return 200

    async def _stream(self, send, job: Job) -> int:
        obj_name = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"

        async def event(payload: Any) -> None:
            data = payload if isinstance(payload, bytes) else _dumps(payload)
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

        def chunk(text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
            c = self._envelope(obj_name)
            c["choices"] = [self._choice(text, finish, delta=True, first=first)]
            return c

        started = False
        while True:
            kind, val = await job.next()
            if kind == "gone":
                return DISCONNECTED
            if kind == "error" and not started:  # nothing sent yet: a plain error response
                err = self._error(val)
                await _send_json(send, err.status, err.body())
                return err.status
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                if self.endpoint == "chat":
                    await event(chunk(None, first=True))
            if kind == "piece":
                await event(chunk(val))
                continue
            if kind == "error":
                err = self._error(val)
                await event(err.body())
                status = err.status
            else:
                res = val
                if res is None:
                    return DISCONNECTED
                self.srv.metrics.finished(res.stats, res.finish_reason)
                last = chunk(None, _finish_reason(res.finish_reason))
                last["usage"] = self._usage(res.stats)
                last["edge_ssd"] = _extra(res)
                await event(last)
                if self.include_usage:
                    u = self._envelope(obj_name)
                    u["choices"], u["usage"] = [], self._usage(res.stats)
                    await event(u)
                status = 200
            await event(b"[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return status

    def _error(self, e: BaseException) -> APIError:
        if isinstance(e, EdgeSSDError):
            return from_engine_error(e, self.endpoint)
        log.error("generation failed", exc_info=(type(e), e, e.__traceback__))
        return APIError(500, f"generation failed: {type(e).__name__}", type_="server_error", code="internal_error")


@functools.lru_cache(maxsize=1)
def _fingerprint() -> str:
    from . import __version__

    return f"edge-ssd-{__version__}"


# --------------------------------------------------------------------------------------------
# Starlette app


def _require_serve_deps() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise EdgeSSDError(f"edge-ssd serve needs the serve extra (pip install 'edge-ssd[serve]'): {e}") from e


def build_app(engine, options: Optional[ServeOptions] = None):
    """A Starlette app serving `engine` (an edge_ssd.Engine, or anything with its `stream`)."""
    _require_serve_deps()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

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
        return PlainTextResponse(srv.metrics.render(srv.gate, srv.model),
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
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.edge_ssd = srv
    return app


# --------------------------------------------------------------------------------------------
# Command line


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """`edge-ssd serve`: the engine flags and generation flags of `generate` (as request defaults)."""
    from .cli import _engine_args, _gen_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)",
                              description="Serve a bundle over an OpenAI-compatible HTTP API. Generation "
                                          "flags are the defaults of requests that do not set them.")
    _engine_args(p)
    _gen_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY (default: $EDGE_SSD_API_KEY if set)")
    s.add_argument("--max-concurrency", type=int, default=1, help="requests generating at once")
    s.add_argument("--queue", type=int, default=8, help="requests waiting for a slot; more get 429")
    s.add_argument("--max-body", type=int, default=MiB, help="largest request body in bytes (413 beyond)")
    s.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the context length)")
    s.add_argument("--model-name", default=None, help="model id reported by the API (default: bundle name)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    return p


def options_from_args(args) -> ServeOptions:
    from .cli import _gen_kwargs

    key = args.api_key if args.api_key is not None else os.environ.get("EDGE_SSD_API_KEY") or None
    defaults = _gen_kwargs(args)  # the generation flags exactly as `generate` maps them
    defaults.pop("raw", None)     # per endpoint: completions are raw, chat uses the template
    defaults["stop"] = list(defaults.get("stop") or ())
    return ServeOptions(model_name=args.model_name, api_key=key, max_concurrency=args.max_concurrency,
                        queue=args.queue, max_body_bytes=args.max_body, max_tokens_cap=args.max_tokens_cap,
                        defaults=defaults)


def check_defaults(engine, defaults: dict) -> None:
    """Fail at start, not on every request, when the generation flags are invalid: the engine
    checks them (it prepares a request without running it)."""
    engine.stream("ok", raw=True, **defaults)


def serve(args) -> int:
    """Load the bundle and serve until SIGTERM / Ctrl-C. EdgeSSDError for bad flags."""
    _require_serve_deps()
    import uvicorn

    from .cli import _engine

    if not 0 < args.port < 65536:
        raise EdgeSSDError(f"--port must be in 1..65535, got {args.port}")
    options = options_from_args(args)
    engine = _engine(args)
    check_defaults(engine, options.defaults)
    app = build_app(engine, options)
    srv = app.state.edge_ssd
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    args.host)
    print(f"edge-ssd serve: model {srv.model!r}, providers {engine.providers()}, http://{args.host}:{args.port}/v1 "
          f"(slots {options.max_concurrency}, queue {options.queue})", flush=True)
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if verbose else "warning",
                access_log=verbose, timeout_graceful_shutdown=args.shutdown_timeout, server_header=False,
                proxy_headers=False)
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m edge_ssd.server --bundle DIR ...`: the same as `edge-ssd serve`."""
    import sys

    ap = argparse.ArgumentParser(prog="edge-ssd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_serve_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    argv = ["serve"] + (argv[1:] if argv[:1] == ["serve"] else argv)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return serve(args)
    except EdgeSSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
