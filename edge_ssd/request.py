"""One generation request: every field a caller can set, its default, and its check.

The CLI (argparse defaults and choices), the server (OpenAI bodies), batch lines and the
Python API all build this dataclass, so each default and each limit is written once, and
every error names the field it is about (`RequestError.param`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from .checks import check_text, is_int
from .errors import RequestError
from .sampling import SamplingParams

MODES = ("ar", "spec", "parallel")
DRAFTERS = ("model", "ngram", "auto")
ROLES = ("system", "user", "assistant", "tool")
K_LIMIT = 16                 # most draft tokens a round may propose: rows of the verify graph's logits
FANOUT_LIMIT = 16            # parallel mode: branches pre-drafted per round
DEFAULT_FANOUT = 4           # four branches cover 71% of outcomes on Spec-Bench (docs/benchmarks.md)
MAX_NEW_TOKENS_LIMIT = 1_000_000
MAX_STOP = 16                # stop strings per request: each is searched for after every round
MAX_STOP_CHARS = 256         # characters per stop string (the text held back while it might start one)


def validate_messages(messages: Any) -> list:
    """A non-empty list of {role, content} with a known role and valid text content."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"message {i} must be an object with string 'role' and 'content'", param="messages")
        if m["role"] not in ROLES:
            raise RequestError(f"message {i} has unknown role {m['role']!r}", param="messages")
        check_text(m["content"], "messages", f"message {i}'s content")
    return messages


def _stops(stop: Any) -> tuple:
    """A string is one stop sequence (as in the OpenAI API), not a list of characters."""
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters",
                           param="stop")
    for s in stops:
        check_text(s, "stop", "a stop string")
    return tuple(stops)


@dataclass(frozen=True)
class Request:
    """What to generate and how. Checked on construction; `RequestError` names the bad field.

    mode: "spec" (speculative), "parallel" (drafts the next round while the target verifies)
    or "ar" (target alone). drafter: "model", "ngram" (prompt lookup) or "auto" (per round,
    whichever is expected to pay). k: draft tokens per round, or "auto" to choose each round
    from measured costs within [k_min, k_max]. fanout (parallel mode): verification outcomes
    pre-drafted per round; 1 is PEARL's "assume all accepted", 0 turns pre-drafting off.
    """

    prompt: Optional[str] = None
    messages: Optional[list] = None
    raw: bool = False                      # send the prompt as is, without the chat template
    mode: str = "spec"
    drafter: str = "auto"
    k: Union[int, str] = "auto"
    k_min: int = 0
    k_max: int = 8
    fanout: int = DEFAULT_FANOUT
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: tuple = ()
    show_sources: bool = False             # pieces carry spans: which drafter each token came from
    prediction: Optional[str] = None       # the output as the caller expects it (a draft source, lossless)
    sampling: SamplingParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prompt is not None and self.messages is not None:
            raise RequestError("give exactly one of a prompt or messages", param="prompt")
        if self.prompt is not None:
            check_text(self.prompt, "prompt", "the prompt")
        if self.messages is not None:
            validate_messages(self.messages)
        if self.prediction is not None:
            check_text(self.prediction, "prediction", "the prediction")
        for name in ("raw", "show_sources"):
            if not isinstance(getattr(self, name), bool):
                raise RequestError(f"{name} must be a boolean, got {getattr(self, name)!r}", param=name)
        if self.mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}", param="mode")
        if self.drafter not in DRAFTERS:
            raise RequestError(f"drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}",
                               param="drafter")
        k = "auto" if self.k is None else self.k
        if k != "auto" and (not is_int(k) or not 0 <= k <= K_LIMIT):
            raise RequestError(f"k must be 'auto' or an integer in [0, {K_LIMIT}], got {k!r}", param="k")
        for name in ("k_min", "k_max"):
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v <= K_LIMIT:
                raise RequestError(f"{name} must be an integer in [0, {K_LIMIT}], got {v!r}", param=name)
        if self.k_min > self.k_max:
            raise RequestError(f"need k_min <= k_max, got {self.k_min} > {self.k_max}", param="k_min")
        if not is_int(self.fanout) or not 0 <= self.fanout <= FANOUT_LIMIT:
            raise RequestError(f"fanout must be an integer in [0, {FANOUT_LIMIT}], got {self.fanout!r}",
                               param="fanout")
        n = self.max_new_tokens
        if not is_int(n) or not 1 <= n <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS_LIMIT}], got {n!r}",
                               param="max_new_tokens")
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "stop", _stops(self.stop))
        object.__setattr__(self, "sampling", SamplingParams(self.temperature, self.top_k, self.top_p, self.seed))

    @property
    def fixed_k(self) -> Optional[int]:
        """K for every round, or None: chosen per round (auto)."""
        return None if self.k == "auto" else self.k

    def with_fields(self, fields: Mapping[str, Any]) -> "Request":
        """A copy with `fields` set (a batch line, a server body's extras): unknown names are errors."""
        known = {f.name for f in dataclasses.fields(self) if f.init}
        for name in fields:
            if name not in known:
                raise RequestError(f"unknown request field {name!r}", param=name)
        return dataclasses.replace(self, **fields)


DEFAULTS = Request()
