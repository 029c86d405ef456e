"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class EdgeSSDError(Exception):
    """Base class: anything raised as this is a clear, user-facing error."""


class BundleError(EdgeSSDError):
    """The bundle is missing, incomplete, corrupt, or unsafe to load."""


class ProviderError(EdgeSSDError):
    """The execution provider asked for is not available (with --strict-provider)."""


class RequestError(EdgeSSDError):
    """A generation request is invalid: empty prompt, bad sampling parameters, too long."""


class MemoryBudgetError(EdgeSSDError):
    """The request or the models do not fit the memory budget."""
