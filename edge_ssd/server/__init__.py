"""`edge-ssd serve`: an OpenAI-compatible HTTP server on Starlette + uvicorn.

    edge-ssd serve --bundle models/qwen2.5-coder-0.5b-1.5b --port 8080

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus text).

How a request runs. An outer layer refuses a Host that does not name this server (DNS
rebinding). The handler checks auth, that the body is declared JSON (so no web page can post
to it), body size and parameters (4xx in OpenAI's error shape), then asks the gate for admission: at most `max_concurrency` requests run and `queue`
wait; anyone beyond that gets 429 at once, so memory and latency stay bounded under load.
The engine's own checks (tokenization, chat template, context length) run in a worker thread,
then the request waits for a running slot. Generation is blocking numpy/onnxruntime work, so
each running request iterates its `Stream` in a dedicated thread that hands the text pieces to
the event loop through an asyncio queue; the loop stays free for other clients, /health and
/metrics. That thread waits for its turn at the engine before starting, and gives up if its
client has gone meanwhile. A task watches the connection: when the client goes away (queued or mid-stream) a
cancel flag is set, the worker closes the Stream's generator after the current round (which
releases the engine's lock) and the slot is freed. On SIGTERM uvicorn stops accepting, lets
in-flight requests finish for up to `--shutdown-timeout` seconds, then cancels them: a stream
under way ends with an error event and [DONE], anything else gets a JSON 503; the lifespan
hook stops and joins whatever generation threads are left.

The parts: `protocol` (OpenAI bodies and answers, no Starlette), `admission` (the gate),
`metrics`, `bridge` (the generation thread), `hosts` (which Host headers are ours), `app`
(state, the per-request ASGI callable, routes), `net` (the socket, uvicorn's settings, header
timeout and connection cap) and `cli` (flags). Starlette and uvicorn are imported lazily (the `serve`
extra): the runtime core and the CLI parser import this package without them.
"""
from __future__ import annotations

from .app import ServeOptions, build_app
from .cli import add_serve_parser, main, serve

__all__ = ["ServeOptions", "build_app", "add_serve_parser", "serve", "main"]
