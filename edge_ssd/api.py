"""The Python API for embedding: load a bundle once, then generate or stream.

    from edge_ssd import Engine
    engine = Engine.load("models/qwen2.5-coder-0.5b-1.5b")
    result = engine.generate("Write a function that reverses a string.", max_new_tokens=64)
    print(result.text, result.stats["tokens_per_s"])
    for piece in engine.stream(messages=[{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)

An Engine runs one request at a time (a lock serializes callers): both models' KV caches
are per-engine state.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .bundle import STAMP_CACHE, Bundle, load_bundle
from .costs import StepCosts, cached_calibration
from .decode import K_LIMIT, DecodeConfig, decode
from .drafters import AutoDrafter, Drafter, ModelDrafter, NgramDrafter
from .errors import BundleError, RequestError
from .governor import Governor, Reading, read_memory
from .model import OnnxLM
from .parallel import DEFAULT_FANOUT, ParallelDrafter
from .providers import resolve
from .sampling import SamplingParams
from .stats import Stats
from .text import TextStream, Tokenizer, build_prompt

log = logging.getLogger("edge_ssd")

MODES = ("ar", "spec", "parallel")
DEFAULT_CONTEXT = 4096
DRAFTERS = ("model", "ngram", "auto")
FANOUT_LIMIT = 16
PARALLEL_MIN_VERIFY_STEPS = 2.0   # parallel pays when verify(4 rows) >= this many draft steps


@dataclass
class Result:
    text: str
    token_ids: list
    stats: dict
    finish_reason: str = ""
    error: str = ""      # set when the request ended early for a reason the caller should see

    def to_json(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "stats": self.stats,
               "finish_reason": self.finish_reason}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Stream:
    """Iterate for text pieces; `result` is set once the iteration ends."""

    _pieces: Iterator[str]
    result: Optional[Result] = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces


@dataclass
class EngineOptions:
    provider: str = "auto"
    strict_provider: bool = False
    threads: Optional[int] = None        # target; default: every core (see placement())
    draft_threads: Optional[int] = None  # default: as target on the same provider, else every core
    draft_provider: Optional[str] = None  # default: same as target; e.g. cpu beside a cuda target
    max_context: Optional[int] = None    # default: DEFAULT_CONTEXT, within the memory budget
    exact: bool = False
    verify: str = "auto"
    load_draft: bool = True
    memory_budget: "str | int | None" = None  # e.g. "1.5GiB", "60%"; default: 80% of available
    memory_reader: Optional[Callable[[], Reading]] = None  # tests inject readings here


class Engine:
    def __init__(self, bundle: Bundle, options: EngineOptions = EngineOptions()):
        self.bundle = bundle
        self.options = options
        self.provider = resolve(options.provider, options.strict_provider)
        cores = os.cpu_count() or 1
        min_rows = 2 if options.exact else 1
        if options.exact:
            _check_exact_possible(bundle)
        self.governor = Governor(options.memory_budget, options.memory_reader or read_memory)
        reader = self.governor.reader
        use_draft = bundle.draft is not None and options.load_draft
        rss0 = reader().rss
        draft_provider = resolve(options.draft_provider, options.strict_provider) \
            if options.draft_provider else self.provider
        threads, draft_threads = placement(cores, self.provider, draft_provider, options)
        self.target = OnnxLM(bundle.target, self.provider, threads, min_rows=min_rows, allocate=False)
        rss1 = reader().rss
        weights = {"target": max(rss1 - rss0, bundle.target.weight_bytes // 2)}
        kv = {"target": bundle.target.kv_bytes_per_token}
        self.draft: Optional[OnnxLM] = None
        if use_draft:
            self.draft = OnnxLM(bundle.draft, draft_provider, draft_threads, allocate=False)
            weights["draft"] = max(reader().rss - rss1, bundle.draft.weight_bytes // 2)
            kv["draft"] = bundle.draft.kv_bytes_per_token
        self.plan = self.governor.plan(weights, kv, bundle.target.vocab_size,
                                       options.max_context or DEFAULT_CONTEXT, K_LIMIT, bundle.target.max_context,
                                       bundle.target.quant.get("weights", ""), DEFAULT_FANOUT if use_draft else 0)
        if not self.plan.use_draft:
            self._drop_draft()
        self.target.allocate(self.plan.max_context)
        if self.draft is not None:
            self.draft.allocate(self.plan.max_context)
        self.tokenizer = Tokenizer(bundle.tokenizer_file, bundle.tokenizer)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-ssd-draft")
        self.learned: dict = {}  # acceptance estimates carried from request to request
        key = {"bundle": bundle.manifest["models"]["target"]["files"][-1]["sha256"],
               "draft": (bundle.manifest["models"].get("draft") or {}).get("files", [{}])[-1].get("sha256"),
               "provider": self.provider, "threads": [threads, draft_threads, cores],
               "exact": options.exact, "draft_loaded": self.draft is not None}
        self.costs: StepCosts = cached_calibration(key, self.target, self.draft, STAMP_CACHE.parent)

    @classmethod
    def load(cls, path: "str | Path", **options) -> "Engine":
        verify = options.pop("verify", "auto")
        return cls(load_bundle(path, verify=verify), EngineOptions(verify=verify, **options))

    @property
    def max_context(self) -> int:
        return self.target.max_context

    def parallel_pays(self) -> bool:
        """Placement check for `parallel`; when False, `--mode parallel` runs as `spec`.

        Drafting beside verification only helps when the two do not compete: not when both
        models are on the CPU with fewer cores than their threads together (measured on 2
        cores: 0.74x of `ar` against 1.2x for `spec`), and not when a verify costs less than
        about two draft steps (the trace-driven cost model in tools/parallel_bench.py: with
        the draft's next round rarely ready in time, the extra catch-up forward and the wait
        for the worker's step on a miss make `parallel` 0.85-0.93x of `spec` at v <= d)."""
        both_cpu = self.target.device == "cpu" and self.draft is not None and self.draft.device == "cpu"
        if both_cpu and (os.cpu_count() or 1) < sum(self.threads().values()):
            return False
        return self.costs.verify_rows(4) >= PARALLEL_MIN_VERIFY_STEPS * self.costs.draft_step

    def threads(self) -> dict:
        """Intra-op threads of each session, as placed."""
        out = {"target": self.target.session.get_session_options().intra_op_num_threads}
        if self.draft is not None:
            out["draft"] = self.draft.session.get_session_options().intra_op_num_threads
        return out

    def _drop_draft(self) -> None:
        """Free the draft model (weights and cache): plain target decoding from now on."""
        self.draft = None

    def providers(self) -> dict:
        """What really runs each model (onnxruntime's own answer)."""
        out = {"target": self.target.providers_used}
        if self.draft is not None:
            out["draft"] = self.draft.providers_used
        return out

    def _drafter(self, mode: str, drafter: str, fanout: int = DEFAULT_FANOUT) -> Optional[Drafter]:
        if mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if drafter not in DRAFTERS:
            raise RequestError(f"drafter must be one of {', '.join(DRAFTERS)}, got {drafter!r}")
        if mode == "ar":
            return None
        model = ModelDrafter(self.draft, self.target.entry.vocab_size) if self.draft else None
        if mode == "parallel":
            if model is None:
                raise RequestError("mode parallel needs a draft model, and this bundle (or engine) has none")
            if not isinstance(fanout, int) or isinstance(fanout, bool) or not 0 <= fanout <= FANOUT_LIMIT:
                raise RequestError(f"fanout must be an integer in [0, {FANOUT_LIMIT}], got {fanout!r}")
            if self.parallel_pays():
                model = ParallelDrafter(model, self._pool, fanout)
        if drafter == "model":
            if model is None:
                raise RequestError("drafter 'model' needs a draft model, and this bundle (or engine) has none")
            return model
        if drafter == "ngram":
            return AutoDrafter(None, NgramDrafter(), self.learned)
        return AutoDrafter(model, NgramDrafter(), self.learned)

    def _prepare(self, prompt, messages, raw, mode, drafter, k, k_min, k_max, max_new_tokens, temperature,
                 top_p, top_k, seed, fanout):
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if k == "auto":
            k = None
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, k=k, k_min=k_min, k_max=k_max, sampling=sp,
                           eos_ids=self.tokenizer.eos_ids)
        d = self._drafter(mode, drafter, fanout)
        ids = build_prompt(self.tokenizer, prompt, messages, raw)
        if len(ids) + 1 > self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context}")
        return ids, cfg, d

    def stream(self, prompt: Optional[str] = None, *, messages: Optional[list] = None, raw: bool = False,
               mode: str = "spec", drafter: str = "auto", k: "int | str | None" = "auto", k_min: int = 0,
               k_max: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: Optional[int] = None, stop: Sequence[str] = (),
               fanout: int = DEFAULT_FANOUT) -> Stream:
        """Start a request; iterate the returned Stream for text. Parameters are checked here.

        mode: "spec" (speculative), "parallel" (speculative, drafting the next round while the
        target verifies) or "ar" (target alone). drafter: "model", "ngram" (prompt
        lookup) or "auto" (per round, whichever is expected to pay). k: tokens drafted per
        round, or "auto" to choose per round from measured costs within [k_min, k_max].
        fanout (parallel mode): verification outcomes pre-drafted per round; 1 is PEARL's
        "assume all accepted", 0 turns pre-drafting off.
        """
        ids, cfg, drafter = self._prepare(prompt, messages, raw, mode, drafter, k, k_min, k_max,
                                          max_new_tokens, temperature, top_p, top_k, seed, fanout)
        text = TextStream(self.tokenizer, stop)
        stream = Stream(iter(()))
        handoff = [drafter]  # the decode loop takes the only reference: dropping the draft frees it
        del drafter

        def pieces() -> Iterator[str]:
            stats = Stats(mode=mode)
            out: list = []
            with self._lock:
                gen = decode(self.target, handoff.pop(), ids, cfg, stats, self.costs, self.governor,
                             self._drop_draft, self.learned)
                try:
                    for new in gen:
                        out += new
                        piece = text.push(new)
                        if piece:
                            yield piece
                        if text.stopped:
                            stats.finish_reason = "stop"
                            break
                finally:
                    gen.close()
            tail = text.finish()
            if tail:
                yield tail
            stream.result = Result(text.full_text, out, {**stats.to_json(), "memory": self.plan.to_json()},
                                   stats.finish_reason, stats.error)

        stream._pieces = pieces()
        return stream

    def generate(self, prompt: Optional[str] = None, **kwargs) -> Result:
        """Run a request to the end; return text, new token ids and stats.

        token_ids are all tokens generated (EOS excluded); when a stop string ended the
        request, the text is cut before it while token_ids run to the round that produced it.
        """
        s = self.stream(prompt, **kwargs)
        for _ in s:
            pass
        assert s.result is not None
        return s.result


def placement(cores: int, provider: str, draft_provider: str, options: EngineOptions) -> tuple:
    """Threads for (target, draft); explicit options win.

    Sequential speculation runs one model at a time, so each gets every core. A draft on the
    CPU beside a GPU target has the CPU to itself. With both models on the CPU, `parallel`
    keeps this placement too, and so runs as `spec` (Engine.parallel_pays): decoding is
    memory-bound and both models share one memory bus, so even with a core each, drafting
    beside verification measured 0.95x of `spec` at the same split and 0.63x of `spec` with
    every core (docs/benchmarks.md). Split the cores explicitly (--threads T --draft-threads D,
    T + D <= cores) to run them at once, and measure with tools/parallel_bench.py timing.
    """
    same_device = draft_provider == provider
    return options.threads or cores, options.draft_threads or (same_device and options.threads) or cores


def _check_exact_possible(bundle: Bundle) -> None:
    """--exact needs a target whose rows compute alike for any number (>= 2) of rows."""
    report = (bundle.manifest.get("validation") or {}).get("target") or {}
    if report.get("rows_invariant") is False:
        q = bundle.target.quant
        raise BundleError(
            f"--exact needs a target that computes a row the same way whatever the number of rows "
            f"with it, and this bundle's target (int4 block {q.get('block_size')}) does not; export one "
            "with --block-size 32 (measured invariant), or run without --exact"
        )
    if "rows_invariant" not in report:
        log.warning("this bundle was exported without the row-invariance check; --exact cannot be verified")
