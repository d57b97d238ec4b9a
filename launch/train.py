"""Thin entry for `accelerate launch launch/train.py [--config FILE] [key=value ...]`.

The same code as `artscale train`: a user's mistake prints one line and exits 2; after a stop
signal (SIGTERM, SIGUSR1, first SIGINT) the run checkpoints and exits 75 (run it again to resume).
"""

import sys

from artscale.errors import UserError
from artscale.train import main

if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except UserError as e:
        print(f"artscale: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("artscale: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
