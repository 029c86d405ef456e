"""`edge-ssd` command line: generate, bench, info, serve (device side) and export (workstation side)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Optional

from .cli_args import (PROVIDER_CHOICES, OneLineParser, add_engine_args, add_request_args, engine_from_args,
                       positive_int, request_from_args)
from .enums import DraftSource
from .errors import EdgeSSDError, RequestError
from .hugepages import reexec_with_hugepages, thp_mode
from .outputs import check_output, replace_when_done
from .request import DEFAULTS, Request
from .server.cli import add_serve_parser

log = logging.getLogger("edge_ssd")
STDIN = Path("-")  # --input -: a service pipes its requests in, a line each


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="edge-ssd", description="Lossless speculative decoding on ONNX Runtime.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export", help="workstation: export a draft/target pair to a bundle (edge-ssd export -h)",
                   add_help=False)
    g = sub.add_parser("generate", help="generate text")
    add_engine_args(g)
    add_request_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--messages", type=Path, help="JSON file: a list of {role, content}")
    src.add_argument("--input", type=Path,
                     help="JSONL batch: one request object a line ('-': standard input, each line "
                          "answered as it arrives)")
    g.add_argument("--output", type=Path, help="JSONL results for --input (default: stdout)")
    g.add_argument("--batch-size", type=positive_int, default=1,
                   help="--input lines decoded together (batched forwards); results stay in input order")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    g.add_argument("--prediction", type=Path, default=None,
                   help="a file with the output you expect (e.g. the code before an edit): drafting follows "
                        "it where the output matches; the output is the target's own")
    g.add_argument("--show-drafts", action="store_true",
                   help="colour the text by where each token came from: the draft model, an n-gram, the target")
    i = sub.add_parser("info", help="providers, memory, and a bundle summary (with --bundle: loads it)")
    i.add_argument("--bundle", default=None)
    i.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES)
    i.add_argument("--memory-budget", default=None)
    i.add_argument("--max-context", type=positive_int, default=None)
    b = sub.add_parser("bench", help="side-by-side benchmark of decoding modes")
    add_engine_args(b)
    b.add_argument("--prompts", type=Path, required=True, help="JSONL with `prompt`, or Spec-Bench `turns`")
    b.add_argument("--limit", type=int, default=None, help="prompts per category")
    b.add_argument("--categories", default=None, help="comma-separated categories to run")
    b.add_argument("--modes", default="ar,spec",
                   help="comma-separated; each MODE[/key=value...], e.g. ar,spec,spec/k=4,spec/drafter=ngram")
    b.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    b.add_argument("--concurrency", type=positive_int, default=1,
                   help="requests at a time per mode, batched on that many slots (1: one after another)")
    b.add_argument("--json", type=Path, default=None, help="write all results here")
    b.add_argument("--chart", type=Path, default=None,
                   help="also draw OUT.png (tokens/s, speed-up, acceptance per category) and OUT-drafts.png "
                        "(acceptance by draft position, K per round); needs the charts extra")
    add_serve_parser(sub)
    return ap


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, ValueError) as e:
        raise EdgeSSDError(f"cannot read {flag} {path}: {e}") from e


def _read_messages(path: Path) -> list:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise EdgeSSDError(f"cannot read messages from {path}: {e}") from e


def cmd_generate(args) -> int:
    base = request_from_args(args)
    if args.fanout != DEFAULTS.fanout and args.mode != "parallel":
        raise RequestError("--fanout applies to --mode parallel only", param="fanout")
    if args.output and not args.input:
        raise EdgeSSDError("--output is for --input batches; a single request prints to stdout")
    if args.input:
        if args.input != STDIN and not args.input.exists():
            raise EdgeSSDError(f"cannot read {args.input}: no such file")
        if args.input.is_dir():
            raise EdgeSSDError(f"cannot read {args.input}: a folder, not a JSONL file")
        if args.output:  # standard input may be a file too (`< in.jsonl`): never replaced by its results
            check_output(args.output, [args.input if args.input != STDIN else Path("/dev/stdin")])
        return _batch(engine_from_args(args, slots=args.batch_size), base, args)
    if args.batch_size != 1:
        raise EdgeSSDError("--batch-size is for --input batches")
    fields = {"messages": _read_messages(args.messages)} if args.messages else {"prompt": args.prompt}
    if args.prediction:
        fields["prediction"] = _read_text(args.prediction, "--prediction")
    req = base.with_fields(fields)
    engine = engine_from_args(args)
    if args.json:
        res = engine.generate(request=req)
        print(json.dumps(res.to_json()))
        if res.error:
            print(f"error: {res.error}", file=sys.stderr)
        return 1 if res.error else 0
    if args.show_drafts:
        req = req.with_fields({"show_sources": True})
        print(" ".join(f"{COLOURS[src]}{src}{RESET}" for src in DraftSource), file=sys.stderr)
    with engine.stream(request=req) as stream:
        for piece in stream:
            sys.stdout.write(coloured(piece) if args.show_drafts else piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if stream.result.error:
        print(f"error: {stream.result.error}", file=sys.stderr)
        return 1
    _print_stats(stream.result.stats)
    return 0


COLOURS = {DraftSource.MODEL: "\x1b[32m", DraftSource.NGRAM: "\x1b[36m", DraftSource.SUFFIX: "\x1b[34m",
           DraftSource.PREDICTION: "\x1b[35m", DraftSource.TARGET: "\x1b[0m"}
RESET = "\x1b[0m"


def coloured(piece) -> str:
    """A piece with ANSI colours by source: green the draft model's, cyan prompt lookup's, blue the
    suffix cache's, magenta the prediction's, plain the target's own."""
    return "".join(f"{COLOURS.get(src, '')}{text}{RESET}" for text, src in piece.spans)


def _print_stats(s: dict) -> None:
    print(f"[{s['mode']}] {s['new_tokens']} tokens, {s['tokens_per_s']:.2f} tok/s, "
          f"acceptance {s['acceptance_rate']:.2f}, mean accepted {s['mean_accepted_len']:.2f}, "
          f"mean K {s['mean_k']:.2f}", file=sys.stderr)
    par = s.get("parallel") or {}
    if par:
        print(f"[parallel] speculation cache: hit rate {par['hit_rate']:.2f} ({par['hits']} of {par['rounds']}), "
              f"{par['mean_fanout']:.1f} branches a round, {par['hidden_s']:.2f} s of drafting hidden",
              file=sys.stderr)
    elif s["mode"] == "parallel":
        print("[parallel] ran as spec: drafting beside verification does not pay with this placement "
              "(see docs/benchmarks.md#parallel-speculation)", file=sys.stderr)


def batch_request(raw: bytes, base: Request) -> tuple:
    """(id, Request) from one JSONL line; any fault of the line is a RequestError for its record."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the line is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(line)
    except RecursionError:
        raise RequestError("the line is nested too deeply to read") from None
    except ValueError as e:
        raise RequestError(f"the line is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("a request line must be a JSON object")
    rid = obj.pop("id", None)
    return rid, base.with_fields(obj)


def _batch(engine, base: Request, args) -> int:
    """One request per JSONL line; a bad line gets an error record and the run goes on. With
    --batch-size N, N lines decode at once (each in a thread of its own, sharing the engine's
    batched forwards) and the records are still written in input order."""
    failures = 0

    def one(lineno: int, raw: bytes) -> tuple:
        """(record, whether the line failed)."""
        rec: dict = {"line": lineno, "id": lineno}
        try:
            rid, req = batch_request(raw, base)
            rec["id"] = lineno if rid is None else rid
            rec.update(engine.generate(request=req).to_json())
            return rec, False
        except EdgeSSDError as e:
            rec["error"] = str(e)
            return rec, True

    def write(out: IO[str], done: tuple) -> None:
        nonlocal failures
        rec, failed = done
        failures += failed
        out.write(json.dumps(rec) + "\n")
        out.flush()

    def lines():
        with open(args.input, "rb") if args.input != STDIN else contextlib.nullcontext(sys.stdin.buffer) as f:
            yield from ((n, raw) for n, raw in enumerate(f, 1) if raw.strip())

    def run(out: IO[str]) -> None:
        if args.batch_size == 1:  # in this thread: Ctrl-C stops the request at once
            for lineno, raw in lines():
                write(out, one(lineno, raw))
            return
        pool = ThreadPoolExecutor(args.batch_size, thread_name_prefix="edge-ssd-batch")
        window: deque = deque()  # read ahead a bounded number of lines
        try:
            for lineno, raw in lines():
                window.append(pool.submit(one, lineno, raw))
                if len(window) >= 2 * args.batch_size:
                    write(out, window.popleft().result())
            while window:
                write(out, window.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after Ctrl-C: the lines running finish

    try:
        if args.output:
            with replace_when_done(args.output) as out:
                run(out)
        else:
            run(sys.stdout)
    except OSError as e:
        raise EdgeSSDError(f"cannot read {args.input}: {e}") from e
    if failures:
        print(f"{failures} request(s) failed; see their error records", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import onnxruntime as ort
    import psutil

    from .memory import fmt_bytes
    from .providers import available

    vm = psutil.virtual_memory()
    info = {"onnxruntime": ort.__version__, "providers": available(), "cpu_count": psutil.cpu_count(),
            "memory_total": fmt_bytes(vm.total), "memory_available": fmt_bytes(vm.available),
            "transparent_huge_pages": thp_mode() or "unknown",
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if args.bundle:
        from .api import Engine

        engine = Engine.load(args.bundle, provider=args.provider, memory_budget=args.memory_budget,
                             max_context=args.max_context)
        b = engine.bundle
        info["bundle"] = {"path": str(b.path), "name": b.name, "providers": engine.providers(),
                          "memory_plan": engine.plan.to_json(), "step_costs": engine.costs.to_json(),
                          "weights_on_huge_pages": fmt_bytes(engine.huge_pages)}
        for m in (b.target, b.draft):
            if m is not None:
                info["bundle"][m.role] = {
                    "architecture": m.architecture, "layers": m.num_layers, "quant": m.quant,
                    "weights": fmt_bytes(m.weight_bytes), "max_context": m.max_context,
                    "kv_per_token": fmt_bytes(m.kv_bytes_per_token)}
    print(json.dumps(info, indent=1))
    return 0


MODEL_COMMANDS = ("generate", "bench", "serve", "info")


def main(argv: Optional[list] = None) -> int:
    """The program (argv None: sys.argv, and it may re-execute itself once with huge pages,
    hugepages.py) or a call with its own argv (runs in this process as it is)."""
    argv_given = argv
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        try:
            from edge_ssd_export.cli import main as export_main
        except ImportError as e:
            print(f"edge-ssd export needs the export extra (pip install 'edge-ssd[export]'): {e}", file=sys.stderr)
            return 2
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    if argv_given is None and args.cmd in MODEL_COMMANDS:
        reexec_with_hugepages()  # before any model loads: glibc reads the setting at startup only
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "info":
            return cmd_info(args)
        if args.cmd == "bench":
            from .bench import run_bench

            return run_bench(args)
        if args.cmd == "serve":
            from .server import serve

            return serve(args)
    except EdgeSSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
