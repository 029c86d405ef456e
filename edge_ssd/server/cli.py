"""`edge-ssd serve` on the command line: its flags, and starting uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from ..cli_args import add_engine_args, add_request_args, engine_from_args, request_from_args
from ..errors import EdgeSSDError
from ..request import Request
from .app import MiB, ServeOptions, build_app, check_api_key, require_serve_deps
from .hosts import parse_allowed

log = logging.getLogger("edge_ssd.server")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """`edge-ssd serve`: the engine flags and generation flags of `generate` (as request defaults)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)",
                              description="Serve a bundle over an OpenAI-compatible HTTP API. Generation "
                                          "flags are the defaults of requests that do not set them.")
    add_engine_args(p)
    add_request_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY (default: $EDGE_SSD_API_KEY if set)")
    s.add_argument("--max-concurrency", type=int, default=1,
                   help="requests generating at once, batched together (the engine's slots)")
    s.add_argument("--queue", type=int, default=8, help="requests waiting for a slot; more get 429")
    s.add_argument("--max-body", type=int, default=MiB, help="largest request body in bytes (413 beyond)")
    s.add_argument("--max-tokens-cap", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the context length)")
    s.add_argument("--model-name", default=None, help="model id reported by the API (default: bundle name)")
    s.add_argument("--shutdown-timeout", type=float, default=ServeOptions.shutdown_timeout,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--allowed-hosts", default="", metavar="A,B",
                   help="more names clients may reach the server by (Host header: name or name:port; '*': any). "
                        "Loopback names and the bound address always work")
    s.add_argument("--header-timeout", type=float, default=ServeOptions.header_timeout,
                   help="seconds a client has to send a request's headers before the connection is closed")
    s.add_argument("--body-timeout", type=float, default=ServeOptions.body_timeout,
                   help="seconds a client then has to send the request body (408 beyond)")
    s.add_argument("--keep-alive-timeout", type=float, default=ServeOptions.keep_alive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    s.add_argument("--max-connections", type=int, default=ServeOptions.max_connections,
                   help="open connections at most; more are answered 503 and closed")
    return p


def api_key_from(args) -> Optional[str]:
    """--api-key, else $EDGE_SSD_API_KEY; an empty or unusable one stops the server naming its source."""
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    else:
        key, source = os.environ.get("EDGE_SSD_API_KEY"), "EDGE_SSD_API_KEY"
    check_api_key(key, source)
    return key


def options_from_args(args) -> ServeOptions:
    defaults = request_from_args(args)  # the generation flags exactly as `generate` reads them
    return ServeOptions(model_name=args.model_name, api_key=api_key_from(args), host=args.host,
                        allowed_hosts=parse_allowed(args.allowed_hosts), max_concurrency=args.max_concurrency,
                        queue=args.queue, max_body_bytes=args.max_body, max_tokens_cap=args.max_tokens_cap,
                        defaults=defaults, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                        keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections,
                        shutdown_timeout=args.shutdown_timeout)


def check_defaults(engine, defaults: Request) -> None:
    """Fail at start, not on every request, when the generation flags do not suit this engine
    (it prepares a request without running it)."""
    engine.stream("ok", request=defaults, raw=True).close()


def banner(srv, host: str, port: int) -> str:
    """The one line `serve` prints on stdout, once the port is bound and the bundle loaded."""
    shown = f"[{host}]" if ":" in host else host
    return (f"edge-ssd serve: model {srv.model!r}, providers {srv.engine.providers()}, http://{shown}:{port}/v1 "
            f"(slots {srv.options.max_concurrency}, queue {srv.options.queue})")


def serve(args) -> int:
    """Load the bundle and serve until SIGTERM / Ctrl-C. EdgeSSDError for bad flags.

    Order: flags, then the port (bound, so a busy one fails in a second), then the bundle;
    the banner is printed only when all of that worked.
    """
    require_serve_deps()
    import uvicorn

    from .net import bind_socket, server_config

    if not 0 < args.port < 65536:
        raise EdgeSSDError(f"--port must be in 1..65535, got {args.port}")
    options = options_from_args(args)
    sock = bind_socket(args.host, args.port)
    try:
        engine = engine_from_args(args, slots=options.max_concurrency)
        check_defaults(engine, options.defaults)
        app = build_app(engine, options)
        srv = app.state.edge_ssd
        if srv.hosts.beyond_loopback and not options.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                        args.host)
        print(banner(srv, args.host, args.port), flush=True)
        verbose = logging.getLogger().isEnabledFor(logging.INFO)
        server = uvicorn.Server(server_config(app, options, verbose))
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise EdgeSSDError("the server did not start (see the log above)")
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m edge_ssd.server --bundle DIR ...`: the same as `edge-ssd serve`."""

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

