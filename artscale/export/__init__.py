"""A trained run to ONNX (parity-gated) or to diffusers' format."""
