"""artscale.data.pack: real folders packed into real tars, read back with tarfile and webdataset.

Images are 16 px and collections small, so the whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artscale.core.errors import UserError
from artscale.data.pack import JOURNAL, pack, read_manifest, verify

VENV_BIN = Path(sys.executable).parent


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of a tar read with plain tarfile: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _samples_by_path(out: Path) -> dict[str, tuple[str, dict, Image.Image]]:
    """Source path -> (split, json meta, decoded image) over every shard in the manifest."""
    found = {}
    for s in read_manifest(out)["shards"]:
        for fields in _members(out / s["name"]).values():
            meta = json.loads(fields["json"])
            image = fields.get("jpg") or fields.get("png")
            found[meta["path"]] = (s["split"], meta, Image.open(io.BytesIO(image)).convert("RGB"))
    return found


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def messy(tmp_path_factory, write_messy_collection) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("messy")
    return root / "src", write_messy_collection(root / "src", root / "outside")


def test_pack_image_folder_reads_back_with_tarfile_and_webdataset(image_folder, tmp_path, classes):
    import webdataset as wds

    out = tmp_path / "shards"
    m = pack(image_folder, out, size=16, val_fraction=0.25, workers=1, shard_max_count=8)
    assert m["classes"] == classes and m["image_size"] == 16 and m["image_format"] == "jpg"
    assert m["per_class"]["painting"] == {"seen": 9, "packed": 8, "skipped": 1, "ignored": 0}
    assert m["per_class"]["drawings"] == {"seen": 9, "packed": 8, "skipped": 0, "ignored": 1}
    assert [s["reason"].split(":")[0] for s in m["skipped"]] == ["truncated or corrupt"]
    assert m["splits"]["train"]["count"] + m["splits"]["val"]["count"] == 40
    assert m["splits"]["val"]["count"] > 0 and m["splits"]["train"]["shards"] >= 4
    assert read_manifest(out) == m and verify(out) == [] and not (out / JOURNAL).exists()
    seen = {}
    for s in m["shards"]:
        samples = _members(out / s["name"])
        assert len(samples) == s["count"]
        for key, fields in samples.items():
            assert "." not in key and set(fields) == {"jpg", "cls", "json"}
            meta = json.loads(fields["json"])
            assert int(fields["cls"]) == classes.index(meta["class"])
            assert Image.open(io.BytesIO(fields["jpg"])).size == (16, 16)
            seen[key] = meta["path"]
    assert len(seen) == 40
    urls = [str(out / s["name"]) for s in m["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert sorted(r["__key__"] for r in read) == sorted(seen)
    assert all(set(r) >= {"jpg", "cls", "json"} for r in read)
    # shards mix the classes (ordered by a hash of the path, not class by class)
    first = _members(out / "train-000000.tar").values()
    assert len({json.loads(f["json"])["class"] for f in first}) >= 3


def test_messy_collection_every_file_accounted_with_its_reason(messy, tmp_path):
    src, want = messy
    out = tmp_path / "out"
    m = pack(src, out, size=16, val_fraction=0.2, workers=1, max_pixels=2_000_000, min_size=8, image_format="png")
    assert m["classes"] == ["a", "b", "c"]
    assert m["per_class"] == want["per_class"]
    for name, c in m["per_class"].items():
        assert c["seen"] == c["packed"] + c["skipped"] + c["ignored"], name
    assert m["ignored"] == 5 + 1 and m["unclassified"] == 1  # c's junk, and stray.txt outside any class
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(want["bad"]) | set(want["links"])
    for path, start in {**want["bad"], **want["links"]}.items():
        assert reasons[path].startswith(start), (path, reasons[path])
    packed = _samples_by_path(out)
    assert sum(c["packed"] for c in m["per_class"].values()) == len(packed)
    keys = [k for s in m["shards"] for k in _members(out / s["name"])]
    assert len(set(keys)) == len(keys) == len(packed) and not any("." in k for k in keys)
    assert "a/latin1 caf\udce9.png" in packed and any(p.startswith("a/long long") for p in packed)
    assert {"c/link-inside.png", "c/real.png", "b/fine.png", "a/sub/deeper/nested.png"} <= set(packed)
    for path, (size, centre) in want["odd"].items():
        split, meta, im = packed[path]
        assert meta["original_size"] == list(size), path
        assert im.size == (16, 16)
        if centre is not None:  # PNG shards are lossless: the resized pixel itself
            assert np.abs(np.asarray(im, dtype=int)[8, 8] - centre).max() <= 12, path
    assert verify(out) == []


def test_follow_symlinks_packs_what_links_lead_to(messy, tmp_path):
    src, _ = messy
    m = pack(src, tmp_path / "out", size=16, workers=1, max_pixels=2_000_000, min_size=8, follow_symlinks=True)
    packed = _samples_by_path(tmp_path / "out")
    assert {"c/link-out.png", "c/link-folder/inner.png", "c/link-a-folder/deeper/nested.png"} <= set(packed)
    assert m["per_class"]["c"] == {"seen": 11, "packed": 5, "skipped": 1, "ignored": 5}


def test_output_is_byte_identical_across_worker_counts_and_reruns(image_folder, tmp_path):
    opts = dict(size=16, val_fraction=0.2, shard_max_count=6)
    pack(image_folder, tmp_path / "w1", workers=1, **opts)
    pack(image_folder, tmp_path / "w2", workers=2, **opts)
    first = _tree_bytes(tmp_path / "w1")
    assert first == _tree_bytes(tmp_path / "w2")
    again = pack(image_folder, tmp_path / "w1", workers=2, force=True, **opts)
    assert first == _tree_bytes(tmp_path / "w1")
    assert json.loads(first["manifest.json"]) == again
    # a rerun of a finished pack keeps every file as it is
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w1").iterdir()}
    pack(image_folder, tmp_path / "w1", workers=1, **opts)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "w1").iterdir()}


def test_verify_names_a_flipped_byte_and_a_missing_shard(image_folder, tmp_path, run_cli):
    out = tmp_path / "out"
    m = pack(image_folder, out, size=16, workers=1, shard_max_count=8)
    first, second = m["shards"][0]["name"], m["shards"][1]["name"]
    data = bytearray((out / first).read_bytes())
    data[700] ^= 0x01
    (out / first).write_bytes(bytes(data))
    (out / second).unlink()
    problems = verify(out)
    assert any(p.startswith(f"{first}: sha256") for p in problems)
    assert f"{second}: missing" in problems
    r = run_cli("verify", out)
    assert r.returncode == 1 and first in r.stderr and second in r.stderr


def test_split_is_stable_when_files_are_added(image_folder, tmp_path, make_image, classes):
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    pack(src, tmp_path / "before", size=16, val_fraction=0.3, workers=1)
    before = {p: split for p, (split, _, _) in _samples_by_path(tmp_path / "before").items()}
    for i in range(12):
        make_image(src / classes[i % 5] / f"added_{i}.png", (20, 20), seed=1000 + i)
    pack(src, tmp_path / "after", size=16, val_fraction=0.3, workers=1)
    after = {p: split for p, (split, _, _) in _samples_by_path(tmp_path / "after").items()}
    assert len(after) == len(before) + 12
    assert {p: after[p] for p in before} == before
    assert 0 < sum(s == "val" for s in before.values()) < len(before)


def test_classes_flag_picks_and_orders_some(image_folder, tmp_path):
    m = pack(image_folder, tmp_path / "out", size=16, workers=1, classes=["sculpture", "drawings"])
    assert m["classes"] == ["drawings", "sculpture"]
    assert {meta["class"] for _, meta, _ in _samples_by_path(tmp_path / "out").values()} == {"drawings", "sculpture"}
    with pytest.raises(UserError, match="no such folder"):
        pack(image_folder, tmp_path / "out2", size=16, classes=["nope"])


def test_shard_max_bytes_splits_by_size(image_folder, tmp_path):
    m = pack(image_folder, tmp_path / "out", size=16, workers=1, val_fraction=0.0, shard_max_bytes=25_000)
    sizes = [s["bytes"] for s in m["shards"]]
    assert len(sizes) >= 3 and m["splits"]["val"] == {"count": 0, "shards": 0}
    assert max(sizes) <= 25_000  # the file's size, tar headers and padding included


def test_out_holding_another_collection_or_settings_is_refused(image_folder, messy, tmp_path):
    out = tmp_path / "out"
    pack(image_folder, out, size=16, workers=1)
    with pytest.raises(UserError, match="holds shards of .*--force"):
        pack(messy[0], out, size=16, workers=1, max_pixels=2_000_000)
    with pytest.raises(UserError, match="size 16 \\(now 24\\)"):
        pack(image_folder, out, size=24, workers=1)
    m = pack(image_folder, out, size=24, workers=1, force=True)
    assert m["image_size"] == 24 and verify(out) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.pdf").write_bytes(b"mine")
    with pytest.raises(UserError, match="not empty"):
        pack(image_folder, foreign, size=16, workers=1)
    assert (foreign / "thesis.pdf").read_bytes() == b"mine"
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        pack(image_folder, out, size=24, workers=1)
    with pytest.raises(UserError, match="is a file"):
        pack(image_folder, foreign / "thesis.pdf", size=16, workers=1)


@pytest.mark.parametrize("case", ["missing", "empty", "no_class_folders", "file", "empty_class_folders"])
def test_bad_src_gives_one_line_and_exit_2(tmp_path, case, make_image, run_cli):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "no_class_folders":
        make_image(src / "loose.jpg", (20, 20), seed=0)
    if case == "empty_class_folders":
        (src / "a").mkdir()
        (src / "b" / ".cache").mkdir(parents=True)
    if case == "file":
        src.rmdir()
        src.write_text("x")
    r = run_cli("pack", src, tmp_path / "out", "--size", "16", "--workers", "1")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("artscale: error: SRC "), r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_pack_info_verify(image_folder, tmp_path, run_cli):
    out = tmp_path / "out"
    job = {"ARTSCALE_PROGRESS_S": "0.001"}  # stderr is a file, as in a batch job: plain progress lines
    r = run_cli("pack", image_folder, out, "--size", "16", "--workers", "1", "--format", "png", env=job)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("packed 40 of 42 files")
    assert "warning: only 1 train shards" in r.stderr
    assert "pack: 41/41 img (100%)" in r.stderr and "\r" not in r.stderr  # 40 packed, 1 corrupt
    info = run_cli("info", out)
    assert info.returncode == 0 and "train: " in info.stdout and "painting: seen 9, packed 8, skipped 1" in info.stdout
    ok = run_cli("verify", out, env=job)
    assert ok.returncode == 0 and "every shard matches" in ok.stdout
    assert "verify: 2/2 shard (100%)" in ok.stderr


@pytest.mark.slow
def test_sigkill_midway_then_rerun_equals_an_uninterrupted_pack(tmp_path, run_cli, big_collection):
    src = big_collection(tmp_path / "src", 150)
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = [
        str(VENV_BIN / "artscale"),
        "pack",
        str(src),
        str(out),
        "--size",
        "16",
        "--workers",
        "1",
        "--shard-max-count",
        "5",
        "--val-fraction",
        "0.1",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / JOURNAL
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and journal.read_text().count('"kind": "shard"') >= 4:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "pack finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    records = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    finished = {r["name"]: r for r in records}
    assert len(finished) >= 4
    for tar in out.glob("*.tar"):  # a final name only ever holds a complete shard
        if tar.name in finished:
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == finished[tar.name]["sha256"]
        else:  # killed between its rename and its journal line: complete, but redone anyway
            assert len(_members(tar)) == 5
    # Damage the last finished shard: its sha256 no longer matches, so it is redone, the others kept.
    damaged = records[-1]["name"]
    data = bytearray((out / damaged).read_bytes())
    data[600] ^= 0xFF
    (out / damaged).write_bytes(bytes(data))
    inodes = {name: (out / name).stat().st_ino for name in finished if name != damaged}
    r = run_cli(*args[1:])
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(finished) - 1} finished shards verified and kept" in r.stderr
    assert inodes == {name: (out / name).stat().st_ino for name in inodes}
    pack(src, ref, size=16, workers=2, shard_max_count=5, val_fraction=0.1)
    assert _tree_bytes(out) == _tree_bytes(ref)
    assert not list(out.glob("*.partial")) and not journal.exists()


def test_workers_that_cannot_start_fall_back_instead_of_hanging(image_folder, tmp_path):
    """Under `python -` a worker cannot re-import __main__ and dies at start; multiprocessing.Pool
    would replace it forever. Pack must finish, in-process, with the same bytes."""
    code = (
        f"from artscale.data.pack import pack\n"
        f"pack({str(image_folder)!r}, {str(tmp_path / 'stdin')!r}, size=16, workers=2, shard_max_count=8)\n"
    )
    r = subprocess.run([str(VENV_BIN / "python"), "-"], input=code, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode workers died" in r.stderr
    pack(image_folder, tmp_path / "ref", size=16, workers=1, shard_max_count=8)
    assert _tree_bytes(tmp_path / "stdin") == _tree_bytes(tmp_path / "ref")


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, make_image):
    import resource
    import signal
    import subprocess

    for i in range(40):
        make_image(tmp_path / "src" / ("a", "b")[i % 2] / f"{i:02d}.jpg", (200, 150), seed=i)
    out = tmp_path / "out"
    args = [
        str(VENV_BIN / "artscale"),
        "pack",
        str(tmp_path / "src"),
        str(out),
        "--size",
        "32",
        "--workers",
        "1",
        "--shard-max-count",
        "8",
        "--format",
        "png",
    ]

    def small_files():  # every file over 20 kB fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("artscale: error:")]
    assert "cannot write" in line and "run the same command again" in line and "Traceback" not in proc.stderr
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 40
