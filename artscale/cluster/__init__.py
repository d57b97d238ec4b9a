"""SLURM: launch lines, the signal relay, sbatch building and submission; the sbatch scripts."""
