"""edge-ssd: lossless speculative decoding on ONNX Runtime for small devices (numpy, no torch)."""

__version__ = "0.1.0"
