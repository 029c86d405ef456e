#!/usr/bin/env python3
"""A small service loop around the edge-ssd Python API: no HTTP, no extra dependency.

Requests are JSON objects, one a line; answers are JSON lines, streamed as the text comes:

    {"id": 1, "messages": [{"role": "user", "content": "Reverse a string in Python"}], "max_new_tokens": 64}
 -> {"id": 1, "delta": "```python\\n"}
 -> {"id": 1, "delta": "def reverse"}
 -> ...
 -> {"id": 1, "done": true, "finish_reason": "stop", "text": "...", "stats": {...}}

or {"id": 1, "error": "temperature must be a number in [0, 100], got -1"} for a bad request.
A request has `prompt` (with `"raw": true` to skip the chat template) or `messages`, plus any
of: mode, drafter, k, k_min, k_max, max_new_tokens, temperature, top_p, top_k, seed, stop.

    # stdin / stdout (a pipe from another process, or by hand)
    python deploy/examples/embed_service.py --bundle /opt/edge-ssd/bundle
    # a Unix socket: one connection per client, requests on a connection answered in order
    python deploy/examples/embed_service.py --bundle /opt/edge-ssd/bundle --socket /run/edge-ssd/embed.sock
    printf '%s\\n' '{"id": 1, "prompt": "def add(a, b):", "raw": true, "max_new_tokens": 16}' \\
        | socat - UNIX-CONNECT:/run/edge-ssd/embed.sock

The engine is loaded once and runs one generation at a time (its lock serializes the
connections). A client that goes away mid-answer stops its generation at the next piece.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socketserver
import sys
from typing import Callable, Optional

from edge_ssd import EdgeSSDError, Engine

FIELDS = {"raw", "mode", "drafter", "k", "k_min", "k_max", "max_new_tokens", "temperature", "top_p", "top_k",
          "seed", "stop"}
MAX_LINE = 1 << 20  # longest request line, bytes


def handle(engine: Engine, line: str, emit: Callable[[dict], None]) -> None:
    """Answer one request line through `emit`; raises OSError when the client is gone."""
    rid = None
    try:
        req = json.loads(line)
        if not isinstance(req, dict):
            raise ValueError("a request must be a JSON object")
        rid = req.get("id")
        unknown = set(req) - FIELDS - {"id", "prompt", "messages"}
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        kwargs = {k: v for k, v in req.items() if k in FIELDS}
        stream = engine.stream(req.get("prompt"), messages=req.get("messages"), **kwargs)
    except (ValueError, EdgeSSDError) as e:  # bad JSON or a bad request: say so, keep serving
        emit({"id": rid, "error": str(e)})
        return
    pieces = iter(stream)
    try:
        for piece in pieces:
            emit({"id": rid, "delta": piece})
    except EdgeSSDError as e:
        emit({"id": rid, "error": str(e)})
        return
    finally:
        pieces.close()  # on OSError (client gone) this stops the generation and frees the engine
    res = stream.result
    out = {"id": rid, "done": True, "finish_reason": res.finish_reason, "text": res.text, "stats": res.stats}
    if getattr(res, "error", ""):
        out["error"] = res.error
    emit(out)


def serve_lines(engine: Engine, rfile, wfile) -> None:
    """Read request lines from rfile until EOF; write answer lines to wfile (binary files)."""
    def emit(obj: dict) -> None:
        wfile.write(json.dumps(obj).encode() + b"\n")
        wfile.flush()

    while True:
        line = rfile.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE:
            emit({"id": None, "error": f"request line longer than {MAX_LINE} bytes"})
            return
        if line.strip():
            handle(engine, line.decode("utf-8", "replace"), emit)


def serve_socket(engine: Engine, path: str) -> None:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                serve_lines(engine, self.rfile, self.wfile)
            except OSError:  # the client went away
                pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    if os.path.exists(path):
        os.unlink(path)  # a stale socket from an earlier run
    old = os.umask(0o117)  # srw-rw----: the owner and its group may connect
    try:
        server = Server(path, Handler)
    finally:
        os.umask(old)
    print(f"listening on {path}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        os.unlink(path)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="JSON-lines service loop around edge_ssd.Engine")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--provider", default="auto", choices=["cpu", "cuda", "dml", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--memory-budget", default=None, help="e.g. 2.5GiB (engine versions that have a governor)")
    ap.add_argument("--socket", default=None, help="Unix socket path (default: stdin/stdout)")
    args = ap.parse_args(argv)
    options = dict(provider=args.provider, threads=args.threads, max_context=args.max_context)
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    try:
        engine = Engine.load(args.bundle, **options)
    except EdgeSSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"loaded {engine.bundle.name} ({engine.providers()})", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind: the socket file is removed
    try:
        if args.socket:
            serve_socket(engine, args.socket)
        else:
            serve_lines(engine, sys.stdin.buffer, sys.stdout.buffer)
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
