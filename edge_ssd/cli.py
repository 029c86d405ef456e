"""`edge-ssd` command line: generate, bench, info (device side) and export (workstation side)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from .errors import EdgeSSDError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="pair bundle folder (see `edge-ssd export`)")
    p.add_argument("--provider", default="auto", choices=["cpu", "cuda", "dml", "auto"])
    p.add_argument("--strict-provider", action="store_true", help="fail instead of falling back to cpu")
    p.add_argument("--threads", type=int, default=None, help="target threads (default: all cores)")
    p.add_argument("--draft-threads", type=int, default=None, help="draft threads (default: as target)")
    p.add_argument("--draft-provider", default=None, choices=["cpu", "cuda", "dml", "auto"],
                   help="run the draft elsewhere, e.g. cpu while the target runs on cuda (default: as target)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache length (default: the bundle's)")
    p.add_argument("--exact", action="store_true",
                   help="plain steps compute like verification, so greedy spec == ar token for token")
    p.add_argument("--verify", default="auto", choices=["auto", "full", "size"],
                   help="bundle checksum policy (auto: hash files once per version)")
    p.add_argument("--memory-budget", default=None,
                   help="memory this process may use, e.g. 1.5GiB, 800MB, 60%% (default: 80%% of available)")


def k_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"K must be an integer or 'auto', not {text!r}") from None


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="spec", choices=["ar", "spec", "parallel"],
                   help="ar: target alone; spec: speculative; parallel: draft while the target verifies")
    p.add_argument("--drafter", default="auto", choices=["model", "ngram", "auto"],
                   help="draft model, prompt lookup, or per round whichever pays (default)")
    p.add_argument("--k", type=k_arg, default="auto", help="draft tokens per round, or auto (default)")
    p.add_argument("--k-min", type=int, default=0, help="auto K lower bound (0 allows plain steps)")
    p.add_argument("--k-max", type=int, default=8, help="auto K upper bound")
    p.add_argument("--fanout", type=int, default=4,
                   help="parallel mode: verification outcomes pre-drafted per round (0: none, 1: PEARL's "
                        "all-accepted guess)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-ssd", description="Lossless speculative decoding on ONNX Runtime.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export", help="workstation: export a draft/target pair to a bundle (edge-ssd export -h)",
                   add_help=False)
    g = sub.add_parser("generate", help="generate text")
    _engine_args(g)
    _gen_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--messages", type=Path, help="JSON file: a list of {role, content}")
    src.add_argument("--input", type=Path, help="JSONL batch: one request object a line")
    g.add_argument("--output", type=Path, help="JSONL results for --input (default: stdout)")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    i = sub.add_parser("info", help="providers, memory, and a bundle summary (with --bundle: loads it)")
    i.add_argument("--bundle", default=None)
    i.add_argument("--provider", default="auto", choices=["cpu", "cuda", "dml", "auto"])
    i.add_argument("--memory-budget", default=None)
    i.add_argument("--max-context", type=int, default=None)
    b = sub.add_parser("bench", help="side-by-side benchmark of decoding modes")
    _engine_args(b)
    b.add_argument("--prompts", type=Path, required=True, help="JSONL with `prompt`, or Spec-Bench `turns`")
    b.add_argument("--limit", type=int, default=None, help="prompts per category")
    b.add_argument("--categories", default=None, help="comma-separated categories to run")
    b.add_argument("--modes", default="ar,spec",
                   help="comma-separated; each MODE[/key=value...], e.g. ar,spec,spec/k=4,spec/drafter=ngram")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--json", type=Path, default=None, help="write all results here")
    from .server import add_serve_parser  # imports no starlette/uvicorn: serve() loads them

    add_serve_parser(sub)
    return ap


def _engine(args):
    from .api import Engine

    return Engine.load(args.bundle, provider=args.provider, strict_provider=args.strict_provider,
                       threads=args.threads, draft_threads=args.draft_threads, max_context=args.max_context,
                       draft_provider=args.draft_provider,
                       exact=args.exact, verify=args.verify, memory_budget=args.memory_budget)


def _gen_kwargs(args, overrides: Optional[dict] = None) -> dict:
    kw = dict(mode=args.mode, drafter=args.drafter, k=args.k, k_min=args.k_min, k_max=args.k_max,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, seed=args.seed, stop=args.stop, raw=args.raw, fanout=args.fanout)
    for key, val in (overrides or {}).items():
        if key in ("prompt", "messages", "id"):
            continue
        if key not in kw:
            raise EdgeSSDError(f"unknown request field {key!r}")
        kw[key] = val
    return kw


def cmd_generate(args) -> int:
    engine = _engine(args)
    if args.input:
        return _batch(engine, args)
    messages = None
    if args.messages:
        try:
            messages = json.loads(args.messages.read_text())
        except (OSError, ValueError) as e:
            raise EdgeSSDError(f"cannot read messages from {args.messages}: {e}") from e
    kw = _gen_kwargs(args)
    if args.json:
        res = engine.generate(args.prompt, messages=messages, **kw)
        print(json.dumps(res.to_json()))
        if res.error:
            print(f"error: {res.error}", file=sys.stderr)
        return 1 if res.error else 0
    stream = engine.stream(args.prompt, messages=messages, **kw)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stream.result.error:
        print(f"error: {stream.result.error}", file=sys.stderr)
        return 1
    s = stream.result.stats
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
    return 0


def _batch(engine, args) -> int:
    """One request per JSONL line; a bad line gets an error record and the run goes on."""
    out = open(args.output, "w") if args.output else sys.stdout
    failures = 0
    try:
        with open(args.input) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec: dict = {"line": lineno}
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise EdgeSSDError("a request line must be a JSON object")
                    rec["id"] = req.get("id", lineno)
                    kw = _gen_kwargs(args, req)
                    res = engine.generate(req.get("prompt"), messages=req.get("messages"), **kw)
                    rec.update(res.to_json())
                except (EdgeSSDError, ValueError) as e:
                    failures += 1
                    rec["error"] = str(e)
                out.write(json.dumps(rec) + "\n")
                out.flush()
    except OSError as e:
        raise EdgeSSDError(f"cannot read {args.input}: {e}") from e
    finally:
        if out is not sys.stdout:
            out.close()
    if failures:
        print(f"{failures} request(s) failed; see their error records", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import onnxruntime as ort
    import psutil

    from .progress import fmt_bytes
    from .providers import available

    vm = psutil.virtual_memory()
    info = {"onnxruntime": ort.__version__, "providers": available(), "cpu_count": psutil.cpu_count(),
            "memory_total": fmt_bytes(vm.total), "memory_available": fmt_bytes(vm.available)}
    if args.bundle:
        from .api import Engine

        engine = Engine.load(args.bundle, provider=args.provider, memory_budget=args.memory_budget,
                             max_context=args.max_context)
        b = engine.bundle
        info["bundle"] = {"path": str(b.path), "name": b.name, "providers": engine.providers(),
                          "memory_plan": engine.plan.to_json(), "step_costs": engine.costs.to_json()}
        for m in (b.target, b.draft):
            if m is not None:
                info["bundle"][m.role] = {
                    "architecture": m.architecture, "layers": m.num_layers, "quant": m.quant,
                    "weights": fmt_bytes(m.weight_bytes), "max_context": m.max_context,
                    "kv_per_token": fmt_bytes(m.kv_bytes_per_token)}
    print(json.dumps(info, indent=1))
    return 0


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        try:
            from edge_ssd_export.cli import main as export_main
        except ImportError as e:
            print(f"edge-ssd export needs the export extra (pip install 'edge-ssd[export]'): {e}", file=sys.stderr)
            return 2
        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "info":
            return cmd_info(args)
        if args.cmd == "bench":
            from .bench import run_bench

            return run_bench(args, _engine(args))
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
