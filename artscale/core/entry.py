"""How every entry point ends: a user's mistake as one line and exit 2, Ctrl-C as 130, SIGTERM as 143.

`artscale ...`, `python -m artscale.train`, `launch/train.py` and `python -m artscale.cluster` all run
their command through `run_command`, so they print and exit alike.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from artscale.core.errors import UserError


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (BaseException: no `except Exception` swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run_command(command: Callable[[], int | None]) -> None:
    """Run `command` and exit with its code, or with the code of how it was stopped."""
    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C: finally blocks remove temporary files
    # and shut worker pools down, instead of leaving orphaned decode processes behind.
    # Training replaces this with its own checkpoint-then-exit handler while it runs.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = command() or 0
    except UserError as e:
        print(f"artscale: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("artscale: interrupted", file=sys.stderr)
        code = 130
    except Terminated:
        print("artscale: terminated", file=sys.stderr)
        code = 143
    sys.exit(code)
