"""Step costs on this device: draft step, verify(r rows), plain decode (r = 1).

Speculation only pays when E[tokens per round] / (K x draft_step + verify(K+1)) beats
1 / decode(1), and on a CPU verify grows with K. So the costs are measured, not assumed:
a short calibration at load (cached per bundle, provider and threads), then kept current
by an exponential moving average of the steps that generation really runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .model import SHARED_PREFILL_CHUNK, OnnxLM

CAL_ROWS = (1, 2, 3, 5, 9)
CATCHUP_TOKENS = SHARED_PREFILL_CHUNK  # the longest catch-up the draft is fed in one forward
EMA = 0.1


@dataclass
class StepCosts:
    draft_step: float                 # seconds per one-token draft forward
    verify: dict = field(default_factory=dict)  # rows -> seconds per target forward
    catchup_token: float = 0.0        # seconds per token past the first when the draft is fed several at once

    def catchup(self, tokens: int) -> float:
        """Seconds a model round pays beyond its own draft steps when it must first feed the
        draft `tokens` it missed (plain or lookup rounds, or a prompt it did not prefill): the
        first of them rides on the round's first step, the rest cost `catchup_token` each."""
        return max(0, tokens - 1) * self.catchup_token

    def verify_rows(self, rows: int) -> float:
        """Target forward time for `rows` rows, interpolated linearly between measured points."""
        if rows in self.verify:
            return self.verify[rows]
        xs = sorted(self.verify)
        lo = max([x for x in xs if x < rows], default=xs[0])
        hi = min([x for x in xs if x > rows], default=xs[-1])
        if lo == hi:  # beyond the measured range: extend the last segment's slope
            a, b = xs[-2], xs[-1]
            slope = (self.verify[b] - self.verify[a]) / (b - a)
            return self.verify[b] + slope * (rows - b)
        w = (rows - lo) / (hi - lo)
        return (1 - w) * self.verify[lo] + w * self.verify[hi]

    def observe_verify(self, rows: int, seconds: float) -> None:
        old = self.verify.get(rows)
        self.verify[rows] = seconds if old is None else _ema(old, seconds)

    def observe_draft(self, seconds: float) -> None:
        self.draft_step = _ema(self.draft_step, seconds) if self.draft_step > 0 else seconds

    def observe_catchup(self, tokens: int, seconds: float) -> None:
        """A catch-up of `tokens` took `seconds`: what each token past the first cost."""
        per = max(0.0, seconds - self.draft_step) / max(1, tokens - 1)
        self.catchup_token = _ema(self.catchup_token, per) if self.catchup_token > 0 else per

    def to_json(self) -> dict:
        return {"draft_step_s": self.draft_step, "verify_s": {str(k): v for k, v in sorted(self.verify.items())},
                "catchup_token_s": self.catchup_token}


def _ema(old: float, new: float) -> float:
    """Moving average that one outlier (a page fault, a preempted thread) cannot drag far."""
    return (1 - EMA) * old + EMA * min(max(new, 0.5 * old), 2.0 * old)


def _median_time(lm: OnnxLM, ids: list, reps: int, keep: Optional[int] = None) -> float:
    base = lm.length
    ts = []
    for _ in range(reps):
        lm.truncate(base)
        t0 = time.perf_counter()
        lm.forward(ids, keep=keep or len(ids))
        ts.append(time.perf_counter() - t0)
    lm.truncate(base)
    return float(np.median(ts))


def calibrate(target: OnnxLM, draft: Optional[OnnxLM], context: int = 128, reps: int = 5) -> StepCosts:
    """Time verify(r) for r in CAL_ROWS, one draft step on a `context`-token past, and the
    draft's catch-up (CATCHUP_TOKENS fed at once after that past, as after a prompt)."""
    ids = (np.arange(context) % 1000 + 100).tolist()
    costs = StepCosts(draft_step=0.0)
    target.reset()
    target.forward(ids[:context])
    _median_time(target, ids[:1], 2)  # warm-up
    for r in CAL_ROWS:
        costs.verify[r] = _median_time(target, ids[:r], reps)
    target.reset()
    if draft is not None:
        draft.reset()
        draft.forward(ids[:context])
        _median_time(draft, ids[:1], 2)
        costs.draft_step = _median_time(draft, ids[:1], reps * 2)
        costs.observe_catchup(CATCHUP_TOKENS, _median_time(draft, ids[:CATCHUP_TOKENS], 2, keep=1))
        draft.reset()
    return costs


def cached_calibration(key: dict, target: OnnxLM, draft: Optional[OnnxLM], cache_dir: Path) -> StepCosts:
    """Calibrate once per key (bundle, provider, threads, exact, this CPU and ONNX Runtime, huge
    pages on or off: api.py builds it); reuse afterwards."""
    name = "costs-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json"
    path = cache_dir / name
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return StepCosts(saved["draft_step_s"], {int(k): v for k, v in saved["verify_s"].items()},
                             saved["catchup_token_s"])
    except (OSError, ValueError, KeyError):
        pass
    costs = calibrate(target, draft)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, **costs.to_json()}))
        os.replace(tmp, path)
    except OSError:
        pass
    return costs
