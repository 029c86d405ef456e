"""Command-line flags shared by `generate`, `bench` and `serve`, and what they build.

Defaults and choices are read from `Request` and `EngineOptions`, so the command line cannot
drift from the API: a flag's default is the field's default.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .providers import PROVIDERS
from .request import DEFAULTS, DRAFTERS, MODES, Request

PROVIDER_CHOICES = (*PROVIDERS, "auto")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes are one `error:` line and exit status 1, like every other user error."""

    def error(self, message: str):
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an integer >= 1 is needed, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"an integer >= 1 is needed, not {value}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="pair bundle folder (see `edge-ssd export`)")
    p.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES)
    p.add_argument("--strict-provider", action="store_true", help="fail instead of falling back to cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="target threads (default: all cores)")
    p.add_argument("--draft-threads", type=positive_int, default=None, help="draft threads (default: as target)")
    p.add_argument("--draft-provider", default=None, choices=PROVIDER_CHOICES,
                   help="run the draft elsewhere, e.g. cpu while the target runs on cuda (default: as target)")
    p.add_argument("--max-context", type=positive_int, default=None, help="KV cache length (default: the bundle's)")
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


def add_request_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--mode", default=d.mode, choices=MODES,
                   help="ar: target alone; spec: speculative; parallel: draft while the target verifies")
    p.add_argument("--drafter", default=d.drafter, choices=DRAFTERS,
                   help="draft model, prompt lookup, or per round whichever pays (default)")
    p.add_argument("--k", type=k_arg, default=d.k, help="draft tokens per round, or auto (default)")
    p.add_argument("--k-min", type=int, default=d.k_min, help="auto K lower bound (0 allows plain steps)")
    p.add_argument("--k-max", type=int, default=d.k_max, help="auto K upper bound")
    p.add_argument("--fanout", type=int, default=d.fanout,
                   help="parallel mode: verification outcomes pre-drafted per round (0: none, 1: PEARL's "
                        "all-accepted guess)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")


def request_from_args(args: argparse.Namespace) -> Request:
    """The request the generation flags describe (no prompt: that comes per request)."""
    return Request(mode=args.mode, drafter=args.drafter, k=args.k, k_min=args.k_min, k_max=args.k_max,
                   fanout=args.fanout, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), raw=args.raw)


def engine_from_args(args: argparse.Namespace, slots: int = 1):
    """Load the bundle the engine flags name, with `slots` requests decoding together."""
    from .api import Engine

    return Engine.load(Path(args.bundle), provider=args.provider, strict_provider=args.strict_provider,
                       threads=args.threads, draft_threads=args.draft_threads, max_context=args.max_context,
                       draft_provider=args.draft_provider, exact=args.exact, verify=args.verify,
                       memory_budget=args.memory_budget, slots=slots)
