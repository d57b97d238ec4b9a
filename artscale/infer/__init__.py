"""Inference with onnxruntime: generate over directory trees, sample from noise, img2img, their outputs."""
