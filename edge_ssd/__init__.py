"""edge-ssd: lossless speculative decoding on ONNX Runtime for small devices (numpy, no torch)."""

__version__ = "0.1.0"

from .api import Engine, EngineOptions, Result, Stream  # noqa: E402
from .errors import BundleError, EdgeSSDError, MemoryBudgetError, ProviderError, RequestError  # noqa: E402

__all__ = ["Engine", "EngineOptions", "Result", "Stream", "EdgeSSDError", "BundleError", "ProviderError",
           "RequestError", "MemoryBudgetError", "__version__"]
