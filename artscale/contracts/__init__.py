"""What one stage writes and another reads (a run dir, a checkpoint, an ONNX file), read in one place."""
