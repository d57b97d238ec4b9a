"""What every stage uses and nothing of artscale's: errors, atomic writes, progress, the machine."""
