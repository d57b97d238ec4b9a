"""This module derives seeds from values alone, never from an order of calls.

A run's seed with an index, a path, an epoch or a rank gives the same seed on any machine: what
makes shuffles, flips and starting noise the same after a resume or a re-split."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object, bits: int = 64) -> int:
    """A `bits`-bit integer from the repr of `parts` (sha256): equal parts, equal seed, on any machine."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> (64 - bits)
