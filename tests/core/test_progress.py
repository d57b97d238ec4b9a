"""Progress lines for batch jobs: plain lines at a fixed interval when the stream is not a terminal."""

from __future__ import annotations

import io
import time

import pytest

from artscale.core.errors import UserError
from artscale.core.progress import Progress, interval_s


def test_a_file_stream_gets_plain_lines_with_rate_eta_and_fields_then_a_last_line():
    out = io.StringIO()
    p = Progress(10, "pack", stream=out, interval=0.05)
    p.update(2)
    assert out.getvalue() == ""  # not yet: the interval has not passed
    time.sleep(0.06)
    p.set_postfix(step=4, loss=0.123456)
    p.update(3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("pack: 5/10 img (50%)") and "img/s" in lines[0] and "ETA" in lines[0]
    assert "step 4" in lines[0] and "loss 0.1235" in lines[0]
    p.update(5)
    p.close()
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("pack: 10/10 img (100%)") and "ETA" not in lines[1]


def test_a_disabled_progress_prints_nothing():
    out = io.StringIO()
    with Progress(3, "train", stream=out, interval=0.0, enabled=False) as p:
        p.update(3)
    assert out.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("ARTSCALE_PROGRESS_S", raising=False)
    assert interval_s() == 30
    monkeypatch.setenv("ARTSCALE_PROGRESS_S", "2.5")
    assert interval_s() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("ARTSCALE_PROGRESS_S", bad)
        with pytest.raises(UserError, match="ARTSCALE_PROGRESS_S"):
            interval_s()
