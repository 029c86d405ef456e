"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""
from __future__ import annotations

from typing import Optional


class EdgeSSDError(Exception):
    """Base class: anything raised as this is a clear, user-facing error."""


class BundleError(EdgeSSDError):
    """The bundle is missing, incomplete, corrupt, or unsafe to load."""


class ProviderError(EdgeSSDError):
    """The execution provider asked for is not available (with --strict-provider)."""


class RequestError(EdgeSSDError):
    """A generation request is invalid: empty prompt, bad sampling parameters, too long.

    `param` names the request field at fault (the Request's own name, e.g. "max_new_tokens"),
    so the server can answer with OpenAI's `param` without reading the message; `code` is a
    machine-readable reason where one exists (e.g. "context_length_exceeded").
    """

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.code = param, code


class MemoryBudgetError(EdgeSSDError):
    """The request or the models do not fit the memory budget."""
