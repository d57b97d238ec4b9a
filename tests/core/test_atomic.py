"""artscale.core.atomic: the one tmp-then-rename writer (pack's manifest and journal, checkpoints, exports,
generated images and reports, SLURM merges, training samples)."""

from __future__ import annotations

import json
import os

import pytest

from artscale.core.atomic import write_atomic, write_json_atomic


def test_bytes_text_and_json_land_whole_and_leave_no_tmp(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "b.txt", "caf\u00e9\n")
    write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [2]})
    write_json_atomic(tmp_path / "d.json", {"b": 1, "a": 2}, sort_keys=False)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "caf\u00e9\n"
    assert (tmp_path / "c.json").read_text() == json.dumps({"a": [2], "b": 1}, indent=2) + "\n"
    assert list(json.loads((tmp_path / "d.json").read_text())) == ["b", "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_tmp(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # fails inside the write, after the tmp file was opened
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after_when_asked(tmp_path, monkeypatch):
    """A spy around the real os.fsync: what was synced, and whether the final name existed yet."""
    path, real, seen = tmp_path / "manifest.json", os.fsync, []

    def spy(fd: int) -> None:
        seen.append((os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")), path.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(path, "{}\n")
    assert seen == [(False, False)]  # the file, before it had its final name
    seen.clear()
    write_atomic(path, "{}\n", sync_dir=True)
    assert seen == [(False, True), (True, True)]  # the file (replacing the old one), then the folder
