"""artscale: an art collection to a trained ConvDiffusionModel, to ONNX, to generated images."""

__version__ = "0.1.0"
