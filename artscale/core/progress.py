"""Progress of a long stage: a tqdm bar on a terminal, plain lines at a fixed interval otherwise.

In a SLURM job stderr is a file: a bar there is either off or a stream of carriage returns.
So when the stream is not a terminal, a `Progress` prints one line every `ARTSCALE_PROGRESS_S`
seconds (default 30) with done / total, rate, ETA and any extra fields (step, loss, lr), and
one last line when it closes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from artscale.core.errors import UserError

DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    """Seconds between plain progress lines: `ARTSCALE_PROGRESS_S`, else 30."""
    text = os.environ.get("ARTSCALE_PROGRESS_S", "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"ARTSCALE_PROGRESS_S={text!r}: expected a number of seconds > 0")
    return value


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`update(n)` as work is done, `set_postfix(key=value)` for extra fields, `close()` at the end.

    `enabled=False` (a non-main rank) prints nothing. The bar or the lines go to `stream`
    (stderr by default); which of the two is decided by `stream.isatty()`.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "img",
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.initial = initial
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.postfix: dict[str, Any] = {}
        self.start = self.last_line = time.monotonic()
        self.interval = interval_s() if interval is None else interval
        self.bar = None
        self.closed = False
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._line()

    def set_postfix(self, **fields: Any) -> None:
        self.postfix.update(fields)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)

    def line(self) -> str:
        """The plain progress line as it would be printed now."""
        elapsed = time.monotonic() - self.start
        new = self.done - self.initial
        rate = new / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total is not None and rate > 0 and not self.closed:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _line(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.initial:
            self._line()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
