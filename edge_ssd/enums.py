"""The loop's vocabulary as str enums: compared by identity in code, plain strings in JSON."""
from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A str whose str() and format() are its value (enum.StrEnum exists only from Python 3.11)."""

    __str__ = str.__str__
    __format__ = str.__format__


class FinishReason(StrEnum):
    STOP = "stop"          # an EOS token or a stop string
    LENGTH = "length"      # max_new_tokens reached
    CONTEXT = "context"    # the KV cache is full
    MEMORY = "memory"      # the memory governor ended the request


class GovernorAction(StrEnum):
    """What the memory governor asks for between rounds, cheapest loss first."""

    OK = "ok"
    LOWER_FANOUT = "lower_fanout"
    LOWER_K = "lower_k"
    DROP_DRAFT = "drop_draft"
    ABORT = "abort"


class DraftSource(StrEnum):
    """Where a token came from: a drafter whose proposal the target accepted, or the target's
    own token (per-source stats; the token colouring of the chat page and --show-drafts)."""

    MODEL = "model"
    NGRAM = "ngram"            # prompt lookup: the request's own prompt and output
    SUFFIX = "suffix"          # the suffix cache: earlier requests' outputs
    PREDICTION = "prediction"  # the caller's predicted output
    TARGET = "target"
