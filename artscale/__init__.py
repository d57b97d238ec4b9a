"""artscale: an art collection to a trained model, to ONNX, to generated images; a folder per stage."""

__version__ = "0.1.0"
