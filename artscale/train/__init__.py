"""Training on accelerate: config and presets, the loop, objectives, losses, EMA, logging, checkpoints."""
