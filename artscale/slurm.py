"""This module keeps `python -m artscale.slurm ...` working: the name the sbatch scripts ran before the layout.

A job queued with an older script runs it on the nodes after an upgrade; it is `python -m artscale.cluster`.
"""

import sys

from artscale.cluster.slurm import main

if __name__ == "__main__":
    sys.exit(main())
