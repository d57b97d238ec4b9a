"""Thin entry for `accelerate launch launch/train.py [--config FILE|NAME] [key=value ...]`.

The same code as `artscale train` and `python -m artscale.train` (what the sbatch scripts launch,
so that an installed artscale needs no checkout), through the same entry: a user's mistake
prints one line and exits 2; after a stop signal (SIGTERM, SIGUSR1, first SIGINT) the run
checkpoints and exits 75 (run it again to resume).
"""

import sys

from artscale.core.entry import run_command
from artscale.train.loop import main

if __name__ == "__main__":
    run_command(lambda: main(sys.argv[1:]))
