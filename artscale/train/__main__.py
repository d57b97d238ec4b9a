"""`python -m artscale.train [--config FILE|PRESET] [key=value ...]`: what `artscale train` runs."""

import sys

from artscale.core.entry import run_command
from artscale.train.loop import main

run_command(lambda: main(sys.argv[1:]))
