"""Per-request statistics: where the time went and how well the draft did."""
from __future__ import annotations

from dataclasses import dataclass, field

from .progress import peak_rss_bytes


@dataclass
class Stats:
    mode: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0            # target forward passes after prefill
    drafted: int = 0           # draft tokens proposed
    accepted: int = 0          # draft tokens accepted
    per_position: list = field(default_factory=list)  # [proposed, accepted] per draft position
    k_chosen: list = field(default_factory=list)      # K of each round
    sources: dict = field(default_factory=dict)       # drafter -> [rounds, drafted, accepted]
    prefill_s: float = 0.0
    decode_s: float = 0.0      # from the first new token to the last
    draft_s: float = 0.0
    verify_s: float = 0.0      # target forward time after prefill (plain decode steps included)
    total_s: float = 0.0
    finish_reason: str = ""
    error: str = ""
    memory_events: list = field(default_factory=list)
    parallel: dict = field(default_factory=dict)   # parallel mode: hits, misses, time hidden
    catchup: list = field(default_factory=lambda: [0, 0.0])  # [tokens, seconds] of draft forwards fed several
                                                             # tokens: what it missed (plain or lookup rounds, a
                                                             # prompt it did not prefill) or its last draft and the
                                                             # bonus; the time includes that round's first step
    probes: list = field(default_factory=lambda: [0, 0])     # [run, found]: model rounds the estimate did
                                                             # not back, and those that left it backing the model
    token_sources: list = field(default_factory=list)  # DraftSource of each new token (not in to_json)

    def record_round(self, k: int, n: int, source: str = "") -> None:
        self.rounds += 1
        self.k_chosen.append(k)
        if k == 0:
            return
        self.drafted += k
        self.accepted += n
        src = self.sources.setdefault(source or "model", [0, 0, 0])
        src[0], src[1], src[2] = src[0] + 1, src[1] + k, src[2] + n
        while len(self.per_position) < k:
            self.per_position.append([0, 0])
        for i in range(k):
            self.per_position[i][0] += 1
            self.per_position[i][1] += int(i < n)

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: new tokens after the first, over the time they took (drafting included)."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Draft tokens accepted per round that drafted (each such round also adds one target token)."""
        spec_rounds = sum(1 for k in self.k_chosen if k > 0)
        return self.accepted / spec_rounds if spec_rounds else 0.0

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "total_s": round(self.total_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_len": round(self.mean_accepted_len, 4),
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "per_position_acceptance": [round(a / p, 4) if p else 0.0 for p, a in self.per_position],
            "k_chosen": self.k_chosen,
            "mean_k": round(sum(self.k_chosen) / len(self.k_chosen), 3) if self.k_chosen else 0.0,
            "drafters": {name: {"rounds": r, "drafted": d, "accepted": a} for name, (r, d, a) in self.sources.items()},
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "overhead_s": round(max(0.0, self.decode_s - self.draft_s - self.verify_s), 4),
            "finish_reason": self.finish_reason,
            "memory_events": self.memory_events,
            "parallel": self.parallel,
            "catchup_tokens": self.catchup[0],
            "catchup_s": round(self.catchup[1], 4),
            "probes": {"run": self.probes[0], "found": self.probes[1]},
            "peak_rss_bytes": peak_rss_bytes(),
        }
