"""edge-ssd export: the workstation half.

Turns a draft and a target (Hugging Face id, local Hugging Face folder or GGUF file) into one
validated, quantized pair bundle that the runtime (`edge_ssd`) loads on the device. The runtime
never imports this package; this package may import the runtime (to validate what it wrote).
"""
