"""The Python API for embedding: load a bundle once, then generate or stream.

    from edge_ssd import Engine
    engine = Engine.load("models/qwen2.5-coder-0.5b-1.5b")
    result = engine.generate("Write a function that reverses a string.", max_new_tokens=64)
    print(result.text, result.stats["tokens_per_s"])
    with engine.stream(messages=[{"role": "user", "content": "Hi"}]) as stream:
        for piece in stream:
            print(piece, end="", flush=True)

An Engine with `slots=1` (the default) runs one request at a time: a lock serializes callers.
With `slots=N` up to N requests decode together, from as many threads: each holds a slot of
both models' KV caches, and their one-row steps share the target's forwards (batching.py);
more callers wait for a slot. A stream holds its slot from its first piece until it ends or
is closed; leaving the `with` block, breaking out of a loop over a temporary stream, or
starting another request on the same thread releases it.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from .batching import Batcher
from .bundle import STAMP_CACHE, Bundle, load_bundle
from .costs import StepCosts, cached_calibration
from .decode import DecodeConfig, decode
from .drafters import AutoDrafter, Drafter, ModelDrafter
from .enums import FinishReason
from .errors import BundleError, RequestError
from .governor import Governor
from .hugepages import huge_page_bytes
from .lookup import TokenStore, lookup_drafters
from .machine import describe
from .memory import Reading, read_memory, release_free_heap
from .model import OnnxLM, rows_invariant_here
from .parallel import ParallelDrafter
from .providers import resolve
from .request import DEFAULT_FANOUT, K_LIMIT, Request
from .stats import Stats
from .text import Piece, TextStream, Tokenizer, build_prompt

log = logging.getLogger("edge_ssd")

DEFAULT_CONTEXT = 4096
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


class Stream:
    """Iterate for text pieces; `result` is set once the iteration ends.

    `close()` (or leaving a `with` block) stops the request after the current round (or
    prefill chunk) and releases the engine. While a long prompt is read the stream yields
    empty pieces between its chunks, so a consumer can stop it there. The generator never refers back to its Stream, so a stream nobody
    holds any more is closed as soon as it is dropped.
    """

    def __init__(self, pieces: Iterator[str], out: dict):
        self._pieces, self._out = pieces, out

    @property
    def result(self) -> Optional["Result"]:
        return self._out.get("result")

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    slots: int = 1                       # requests decoding together (fewer if memory is short)


@dataclass
class Lease:
    """What one running request holds: its view of each model and how to give them back."""

    target: object                       # OnnxLM (slots=1) or its SlotLM
    draft: Optional[object]
    release: Callable[[], None]


class Engine:
    def __init__(self, bundle: Bundle, options: EngineOptions = EngineOptions()):
        self.bundle = bundle
        self.options = options
        self.provider = resolve(options.provider, options.strict_provider)
        cores = os.cpu_count() or 1
        min_rows = 2 if options.exact else 1
        if options.exact:
            _check_exact_possible(bundle)
        if not isinstance(options.slots, int) or options.slots < 1:
            raise RequestError(f"slots must be a whole number >= 1, got {options.slots!r}", param="slots")
        self.governor = Governor(options.memory_budget, options.memory_reader or read_memory)
        reader = self.governor.reader
        use_draft = bundle.draft is not None and options.load_draft
        rss0 = reader().rss
        draft_provider = resolve(options.draft_provider, options.strict_provider) \
            if options.draft_provider else self.provider
        threads, draft_threads = placement(cores, self.provider, draft_provider, options)
        self.target = OnnxLM(bundle.target, self.provider, threads, min_rows=min_rows, allocate=False)
        release_free_heap()  # before measuring what the weights take: loading's garbage is not theirs
        rss1 = reader().rss
        weights = {"target": max(rss1 - rss0, bundle.target.weight_bytes // 2)}
        kv = {"target": bundle.target.kv_bytes_per_token}
        self.draft: Optional[OnnxLM] = None
        if use_draft:
            self.draft = OnnxLM(bundle.draft, draft_provider, draft_threads, allocate=False)
            release_free_heap()
            weights["draft"] = max(reader().rss - rss1, bundle.draft.weight_bytes // 2)
            kv["draft"] = bundle.draft.kv_bytes_per_token
        self._draft_placement = (draft_provider, draft_threads)
        self._draft_weights = weights.get("draft", 0)
        self._draft_dropped = False
        self.plan = self.governor.plan(weights, kv, bundle.target.vocab_size,
                                       options.max_context or DEFAULT_CONTEXT, K_LIMIT, bundle.target.max_context,
                                       bundle.target.quant.get("weights", ""), DEFAULT_FANOUT if use_draft else 0,
                                       extra=TokenStore.max_bytes(), slots=options.slots)
        if not self.plan.use_draft:
            self.draft = None  # it does not fit the budget at all: not taken back later
        self.slots = self.plan.slots
        self.target.allocate(self.plan.max_context, self.slots)
        if options.exact and not rows_invariant_here(self.target):
            raise BundleError(
                "--exact needs a target whose rows compute alike for any number of rows with them, and on "
                "this device this bundle's target does not (the kernels differ from the exporting machine's); "
                "run without --exact")
        if self.draft is not None:
            self.draft.allocate(self.plan.max_context, self.slots)
        self.tokenizer = Tokenizer(bundle.tokenizer_file, bundle.tokenizer)
        self.huge_pages = huge_page_bytes()  # of the weights just loaded (hugepages.py)
        self._lock = threading.Lock()    # slots=1: the engine
        self._books = threading.Lock()   # the bookkeeping below, and taking slots
        self._free = threading.Semaphore(self.slots)
        self._running = 0
        self._holders: dict = {}         # thread id -> weak refs to the Streams it holds open
        self._device = threading.Lock()  # slots > 1: one forward at a time, whichever model
        self._batches = self._batchers() if self.slots > 1 else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-ssd-draft")
        self.learned: dict = {}  # acceptance estimates carried from request to request
        self.suffix_cache = TokenStore()  # earlier requests' outputs, a draft source for later ones
        key = {"bundle": bundle.manifest["models"]["target"]["files"][-1]["sha256"],
               "draft": (bundle.manifest["models"].get("draft") or {}).get("files", [{}])[-1].get("sha256"),
               "provider": self.provider, "threads": [threads, draft_threads, cores],
               "exact": options.exact, "draft_loaded": self.draft is not None,
               "machine": {k: v for k, v in describe().items() if k != "python"},
               "huge_pages": self.huge_pages > 0}
        self.costs: StepCosts = cached_calibration(key, self.target, self.draft, STAMP_CACHE.parent)
        release_free_heap()

    @classmethod
    def load(cls, path: "str | Path", **options) -> "Engine":
        verify = options.pop("verify", "auto")
        return cls(load_bundle(path, verify=verify), EngineOptions(verify=verify, **options))

    @property
    def max_context(self) -> int:
        return self.target.max_context

    def _batchers(self) -> dict:
        """One Batcher per loaded model (slots > 1). Under --exact the target's one-row steps run
        alone (padded like verification) instead of batched: a batch of one-row sequences runs
        attention with another kernel, whose logits differ in the last bits."""
        out = {"target": Batcher(self.target, self._device, batch_steps=not self.options.exact)}
        if self.draft is not None:
            out["draft"] = Batcher(self.draft, self._device)
        return out

    def batch_stats(self) -> dict:
        """Batched forwards so far: how many, and how many one-row steps they carried."""
        if self._batches is None:
            return {"slots": 1, "active": self._running, "steps": 0, "rows": 0}
        b = self._batches["target"]
        return {"slots": self.slots, "active": self._running, "steps": b.steps, "rows": b.rows}

    def parallel_pays(self) -> bool:
        """Placement check for `parallel`; when False, `--mode parallel` runs as `spec`.

        Drafting beside verification only helps when the two do not compete for the same
        cores (both on the CPU with fewer cores than their threads together), and when a verify
        costs at least PARALLEL_MIN_VERIFY_STEPS draft steps, so that the next round's draft
        is often ready in time (measurements and the cost model: docs/benchmarks.md,
        "Parallel speculation")."""
        if self.slots > 1:  # its drafting thread would hold the device between other requests' steps
            return False
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
        """Free the draft model (weights and cache): plain target decoding until it fits again.
        Other running requests drop it at their next round (the governor tells them); the
        memory is freed when the last of them lets go."""
        self.draft = None
        if self._batches is not None:
            self._batches.pop("draft", None)
        self._draft_dropped = self.bundle.draft is not None and self.options.load_draft

    def _retake_draft(self) -> None:
        """Load the draft again, between requests, once memory pressure has passed: its weights
        and cache fit the budget and what is available, with the governor's margin."""
        if not self._draft_dropped or self._running:
            return
        entry, g = self.bundle.draft, self.governor
        need = self._draft_weights + entry.kv_bytes_per_token * self.plan.max_context * self.slots + g.margin
        r = g.reader()
        if r.rss + need > g.budget or r.available < need + g.margin:
            return
        draft = OnnxLM(entry, self._draft_placement[0], self._draft_placement[1], allocate=False)
        draft.allocate(self.plan.max_context, self.slots)
        self.draft, self._draft_dropped, g.k_cap, g.fanout_cap = draft, False, None, None
        g.draft_dropped = False
        if self._batches is not None:
            self._batches["draft"] = Batcher(draft, self._device)
        log.info("memory allows the draft model again: speculative decoding resumes")

    def providers(self) -> dict:
        """What really runs each model (onnxruntime's own answer)."""
        out = {"target": self.target.providers_used}
        if self.draft is not None:
            out["draft"] = self.draft.providers_used
        return out

    def _drafter(self, req: Request) -> Callable[[Optional[object]], Optional[Drafter]]:
        """Check the request's drafting now; return what builds its drafter once the request
        holds its view of the draft model (None: the draft is not loaded, or was dropped)."""
        if req.mode == "ar":
            return lambda draft: None
        if req.mode == "parallel" and self.draft is None:
            raise RequestError("mode parallel needs a draft model, and this bundle (or engine) has none",
                               param="mode")
        if req.drafter == "model" and self.draft is None:
            raise RequestError("drafter 'model' needs a draft model, and this bundle (or engine) has none",
                               param="drafter")
        parallel = req.mode == "parallel" and self.parallel_pays()
        prediction = self.tokenizer.encode(req.prediction, bos=False) if req.prediction else None
        vocab = self.target.entry.vocab_size

        def build(draft: Optional[object]) -> Optional[Drafter]:
            model: Optional[Drafter] = ModelDrafter(draft, vocab) if draft is not None else None
            if parallel and model is not None:
                model = ParallelDrafter(model, self._pool, req.fanout)
            if req.drafter == "model":
                return model
            return AutoDrafter(model if req.drafter == "auto" else None,
                               lookup_drafters(prediction, self.suffix_cache), self.learned)
        return build

    def _prepare(self, req: Request) -> tuple:
        """Token ids, the loop's config and what builds the drafter: every check that can fail
        before decoding."""
        self._retake_draft()
        cfg = DecodeConfig(max_new_tokens=req.max_new_tokens, k=req.fixed_k, k_min=req.k_min, k_max=req.k_max,
                           sampling=req.sampling, eos_ids=self.tokenizer.eos_ids)
        build_drafter = self._drafter(req)
        ids = build_prompt(self.tokenizer, req.prompt, req.messages, req.raw)
        if len(ids) + 1 > self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context}",
                               param="messages" if req.messages is not None else "prompt",
                               code="context_length_exceeded")
        return ids, cfg, build_drafter

    def _hold(self, stream: "weakref.ref") -> Lease:
        """Take a slot (slots=1: the engine) for a stream. Streams this thread left open (it
        cannot wait for them: it would wait on itself) are closed first; other threads' are
        waited for."""
        me = threading.get_ident()
        for ref in self._holders.pop(me, []):
            left_open = ref()
            if left_open is not None:
                log.info("a new request on this thread closes the stream it left open")
                left_open.close()
        if self._batches is None:
            self._lock.acquire()
            lease = Lease(self.target, self.draft, self._lock.release)
        else:
            self._free.acquire()
            with self._books:
                target = self._batches["target"].acquire()
                draft_batch = self._batches.get("draft")
                draft = draft_batch.acquire() if draft_batch is not None else None

            def release() -> None:
                target.release()
                if draft is not None:
                    draft.release()
                self._free.release()
            lease = Lease(target, draft, release)
        with self._books:
            self._running += 1
            self._holders.setdefault(me, []).append(stream)
        return lease

    def _let_go(self, lease: Lease, stream: "weakref.ref") -> None:
        with self._books:
            self._running -= 1
            held = self._holders.get(threading.get_ident(), [])
            if stream in held:
                held.remove(stream)
        lease.release()

    def stream(self, prompt: Optional[str] = None, *, request: Optional[Request] = None, **fields) -> Stream:
        """Start a request; iterate the returned Stream for text. Parameters are checked here.

        Give a `Request`, or its fields as keywords (prompt, messages, raw, mode, drafter, k,
        k_min, k_max, fanout, max_new_tokens, temperature, top_p, top_k, seed, stop; see
        edge_ssd.request.Request), or both: keywords override the request's fields.
        """
        if prompt is not None:
            fields["prompt"] = prompt
        req = (request or Request()).with_fields(fields) if fields else (request or Request())
        ids, cfg, build_drafter = self._prepare(req)
        text = TextStream(self.tokenizer, req.stop, spans=req.show_sources)
        out: dict = {}
        me: list = []        # a weak reference to the Stream, set below: no cycle through the generator

        stats = Stats(mode=req.mode)

        def labelled(piece: str, start: int) -> str:
            """With show_sources, the piece with the source of each of its tokens' text."""
            return Piece(piece, text.spans(start, text.sent, stats.token_sources)) if req.show_sources else piece

        def pieces() -> Iterator[str]:
            tokens: list = []
            lease = self._hold(me[0])
            try:
                # the decode loop holds the only reference to the drafter: dropping the draft frees it
                gen = decode(lease.target, build_drafter(lease.draft), ids, cfg, stats, self.costs, self.governor,
                             self._drop_draft, self.learned)
                lease.draft = None
                try:
                    for new in gen:
                        tokens += new
                        start = text.sent
                        piece = text.push(new) if new else ""
                        if piece or not new:  # an empty piece: the prompt is still being read
                            yield labelled(piece, start)
                        if text.stopped:
                            stats.finish_reason = FinishReason.STOP
                            break
                finally:
                    gen.close()
                self.suffix_cache.add(tokens)  # a draft source for later requests
            finally:
                self._let_go(lease, me[0])
            start = text.sent
            tail = text.finish()
            if text.stopped:  # a stop string completed only by the held-back end (a split character)
                stats.finish_reason = FinishReason.STOP
            if tail:
                yield labelled(tail, start)
            memory = {**self.plan.to_json(), "huge_pages_bytes": self.huge_pages}
            out["result"] = Result(text.full_text, tokens, {**stats.to_json(), "memory": memory},
                                   stats.finish_reason, stats.error)

        stream = Stream(pieces(), out)
        me.append(weakref.ref(stream))
        return stream

    def generate(self, prompt: Optional[str] = None, **kwargs) -> Result:
        """Run a request to the end; return text, new token ids and stats.

        token_ids are all tokens generated (EOS excluded); when a stop string ended the
        request, the text is cut before it while token_ids run to the round that produced it.
        """
        with self.stream(prompt, **kwargs) as s:
            for _ in s:
                pass
        assert s.result is not None
        return s.result


def placement(cores: int, provider: str, draft_provider: str, options: EngineOptions) -> tuple:
    """Threads for (target, draft); explicit options win.

    Sequential speculation runs one model at a time, so each gets every core; a draft on the
    CPU beside a GPU target has the CPU to itself. With both models on the CPU, `parallel`
    keeps this placement and so runs as `spec` (Engine.parallel_pays): decoding is bound by
    the one memory bus both models share (docs/benchmarks.md). Split the cores explicitly
    (--threads T --draft-threads D, T + D <= cores) to run them at once.
    """
    same_device = draft_provider == provider
    return options.threads or cores, options.draft_threads or (same_device and options.threads) or cores


def _check_exact_possible(bundle: Bundle) -> None:
    """--exact needs a target whose rows compute alike for any number (>= 2) of rows: refused
    at once when the export measured otherwise (the engine re-checks on this device at load)."""
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
