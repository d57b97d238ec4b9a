"""Shards on object storage and HTTP (artscale.data.store): real servers on the loopback, started by
fixtures (moto's S3 server, a standard-library HTTP server that can drop connections mid-shard), read
and written through fsspec as users' runs do. The local `shards` fixture is the reference: a pack to a
URL must hold its bytes, and batches read from a URL must equal its batches."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from artscale.core.errors import UserError
from artscale.data import store
from artscale.data.loader import SkipCounter, data_spec, shard_images, train_loader, val_loader
from artscale.data.pack import JOURNAL, pack, verify

VENV_BIN = Path(sys.executable).parent
PACKED = {"size": 16, "val_fraction": 0.25, "workers": 1, "shard_max_count": 7}  # the `shards` fixture's


def _remote_files(fs, prefix: str) -> dict[str, bytes]:
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.ls(prefix, detail=False, refresh=True)}


def _batches(spec, n: int, workers: int = 0, start: int = 0) -> list:
    loader = train_loader(
        spec, batch_size=4, epoch_batches=5, seed=3, rank=1, num_workers=workers, start=start, hflip=True
    )
    return list(itertools.islice(loader, n))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b)
    )


def test_pack_to_s3_holds_the_bytes_of_a_local_pack_and_verify_info_read_it(image_folder, shards, s3, run_cli):
    url = f"{s3.url}/shards/s16"
    m = pack(image_folder, url, **PACKED)
    local = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert _remote_files(s3.fs, "artscale/shards/s16") == local  # shards and manifest.json; no journal left
    assert m == json.loads(local["manifest.json"])
    assert verify(url) == []
    again = run_cli("pack", image_folder, url, "--size", "16", "--val-fraction", "0.25", "--shard-max-count", "7")
    assert again.returncode == 0 and "already holds this collection's shards: nothing to do" in again.stdout
    info = run_cli("info", url)
    assert info.returncode == 0, info.stderr
    assert f"shards {url} " in info.stdout and "painting: seen 9, packed 8, skipped 1" in info.stdout
    ok = run_cli("verify", url)
    assert ok.returncode == 0 and "every shard matches" in ok.stdout


def test_verify_on_s3_names_a_flipped_byte_a_missing_and_an_extra_shard(image_folder, s3, run_cli):
    url = f"{s3.url}/v"
    m = pack(image_folder, url, **PACKED)
    first, second = m["shards"][0]["name"], m["shards"][1]["name"]
    data = bytearray(s3.fs.cat_file(f"artscale/v/{first}"))
    data[700] ^= 0x01
    s3.fs.pipe_file(f"artscale/v/{first}", bytes(data))
    s3.fs.rm_file(f"artscale/v/{second}")
    s3.fs.pipe_file("artscale/v/train-000099.tar", b"\0" * 1024)
    problems = verify(url)
    assert [p for p in problems if p.startswith(f"{first}: sha256")] and f"{second}: missing" in problems
    assert "train-000099.tar: a shard that the manifest does not list" in problems
    r = run_cli("verify", url)
    assert r.returncode == 1 and first in r.stderr and second in r.stderr


@pytest.mark.slow
def test_a_killed_pack_to_s3_resumes_from_the_uploaded_shards_checked_by_sha256(s3, tmp_path, big_collection):
    src = big_collection(tmp_path / "src", 150)
    url, prefix = f"{s3.url}/big", "artscale/big"
    opts = {"size": 16, "workers": 1, "shard_max_count": 5, "val_fraction": 0.1}
    args = [str(VENV_BIN / "artscale"), "pack", str(src), url, "--size", "16", "--workers", "1"]
    args += ["--shard-max-count", "5", "--val-fraction", "0.1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def journal() -> list[dict]:
        try:
            return [json.loads(line) for line in s3.fs.cat_file(f"{prefix}/{JOURNAL}").decode().splitlines()]
        except FileNotFoundError:
            return []

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None and len(journal()) < 5:
        time.sleep(0.05)
    assert proc.poll() is None, "pack finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records = journal()[1:]
    files = _remote_files(s3.fs, prefix)
    assert "manifest.json" not in files and len(records) >= 4
    assert not [n for n in files if n.endswith(".partial")]  # a shard is uploaded only once complete
    damaged = records[-1]["name"]  # its sha256 no longer matches: redone, the others kept
    data = bytearray(files[damaged])
    data[600] ^= 0xFF
    s3.fs.pipe_file(f"{prefix}/{damaged}", bytes(data))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(records) - 1} finished shards verified and kept" in r.stderr
    pack(src, tmp_path / "ref", **opts)
    assert _remote_files(s3.fs, prefix) == {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}


def test_batches_from_s3_and_http_equal_the_local_ones_and_resume_exactly(shards, image_folder, s3, http_server):
    pack(image_folder, f"{s3.url}/s16", **PACKED)
    local = data_spec(str(shards), 16)
    for data in (f"{s3.url}/s16", http_server(shards).url):
        spec = data_spec(data, 16)
        assert spec.train_urls[0].startswith(data) and spec.classes == local.classes
        assert (spec.train_count, spec.val_count) == (local.train_count, local.val_count)
        assert _same(_batches(spec, 12), _batches(local, 12))
        assert _same(_batches(spec, 5, start=7), _batches(local, 12)[7:])  # a resumed run's stream
        val = [b for b in val_loader(spec, batch_size=4, rank=0, world=1)]
        assert _same(val, list(val_loader(local, batch_size=4, rank=0, world=1)))
    assert _same(_batches(data_spec(f"{s3.url}/s16", 16), 12, workers=2), _batches(local, 12, workers=2))


def test_connections_dropped_mid_shard_and_503s_are_read_again_the_batches_unchanged(shards, http_server, caplog):
    server = http_server(shards, faults=True)
    spec = data_spec(server.url, 16)
    got = _batches(spec, 15)
    assert server.dropped >= 2 and server.unavailable >= 2  # the faults happened
    assert _same(got, _batches(data_spec(str(shards), 16), 15))
    assert sum(b[3] for b in got) == 0  # nothing skipped, nothing read twice
    assert "reading it again" in caplog.text


def test_a_shard_that_keeps_failing_is_skipped_and_counted_never_lost_silently(
    shards, http_server, manifest, monkeypatch
):
    monkeypatch.setattr(store, "BACKOFF_S", 0.01)
    m = manifest(shards)
    bad = m["shards"][1]
    server = http_server(shards, broken=(bad["name"],))
    counter = SkipCounter()
    spec = data_spec(server.url, 16)
    images = list(shard_images(spec.train_urls, counter))
    assert counter.count == 1 and server.dropped == store.ATTEMPTS  # tried ATTEMPTS times, then counted
    assert len(images) == sum(s["count"] for s in m["shards"] if s["split"] == "train") - bad["count"]
    got = _batches(spec, 12)
    assert sum(b[3] for b in got) >= 1  # the skip reaches the training loop's count


def test_urls_with_a_login_a_query_or_an_unknown_scheme_are_refused_in_one_line(image_folder, tmp_path, run_cli):
    for url, says in [
        ("s3://AKIAEXAMPLE:hunter2secret@bucket/x", "a login inside a URL"),
        ("https://user:hunter2secret@host/shards", "a login inside a URL"),
        ("https://host/shards?X-Amz-Signature=hunter2secret", "takes no query"),
        ("nosuch://host/x", "unknown URL scheme nosuch://"),
    ]:
        with pytest.raises(UserError, match=says) as e:
            data_spec(url, 16)
        assert "hunter2secret" not in str(e.value)
        for r in (run_cli("pack", image_folder, url), run_cli("info", url), run_cli("verify", url)):
            assert r.returncode == 2 and says in r.stderr and "hunter2secret" not in r.stderr + r.stdout
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("pack", image_folder, "https://host/shards")
    assert r.returncode == 2 and "HTTP is read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (Path.cwd() / "s3:").exists() and not (Path.cwd() / "https:").exists()


def test_missing_credentials_are_one_line_naming_the_url_and_the_variables(image_folder, s3, no_credentials, run_cli):
    url = f"{s3.url}/s16"
    for args in (("pack", image_folder, url), ("info", url), ("verify", url)):
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert url in lines[0] and "no credentials found" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0]


def test_a_server_that_wants_a_login_reads_it_from_netrc_and_says_so_without_one(
    shards, http_server, tmp_path, monkeypatch
):
    server = http_server(shards, login="Basic " + base64.b64encode(b"reader:hunter2secret").decode())
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with pytest.raises(UserError, match="refused") as e:
        data_spec(server.url, 16)
    assert server.url in str(e.value) and "~/.netrc" in str(e.value)
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login reader password hunter2secret\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    spec = data_spec(server.url, 16)
    assert _same(_batches(spec, 3), _batches(data_spec(str(shards), 16), 3))


def test_a_missing_bucket_or_manifest_is_one_line(image_folder, s3, run_cli):
    r = run_cli("pack", image_folder, "s3://no-such-bucket/x")
    assert r.returncode == 2 and "bucket no-such-bucket does not exist" in r.stderr
    with pytest.raises(UserError, match=f"{s3.url}/nothing/manifest.json not found"):
        data_spec(f"{s3.url}/nothing", 16)
    r = run_cli("info", f"{s3.url}/nothing")
    assert r.returncode == 2 and "no manifest.json there" in r.stderr


@pytest.mark.slow
def test_export_eval_and_report_read_the_shards_at_a_url(image_folder, s3, make_run_dir, classes, tmp_path):
    from PIL import Image

    from artscale.export.article import export_onnx
    from artscale.metrics.fid import fid_kid
    from artscale.report.build import write_report

    url = f"{s3.url}/s16"
    m = pack(image_folder, url, **PACKED)
    val = sum(s["count"] for s in m["shards"] if s["split"] == "val")
    run = make_run_dir(tmp_path / "run", data=url)
    assert export_onnx(run, tmp_path / "a.onnx")["parity"]["images"] == f"{min(val, 8)} val images from {url}"
    assert export_onnx(run, tmp_path / "b.onnx", shards=url)["parity"]["images"].endswith(f"from {url}")
    gen = tmp_path / "gen"
    for i, cls in enumerate(classes[:2]):
        (gen / cls).mkdir(parents=True)
        Image.new("RGB", (16, 16), (40 * i, 90, 200 - 40 * i)).save(gen / cls / "0.png")
    res = fid_kid(gen, url, inception_weights="random", out=tmp_path / "r.json")
    assert res["real"] == {"shards": url, "split": "val", "images": val, "skipped": 0}
    shutil.copy(run / "final" / "config.json", run / "config.json")  # where training keeps it
    page = write_report([run], tmp_path / "report").read_text()
    assert url in page and "no manifest.json here" not in page


def test_a_local_folder_writes_and_reads_through_no_symlink(image_folder, tmp_path):
    """LocalDir keeps main's rules: the journal's append and the manifest's write never go through a
    planted link, a symlinked shard is neither read nor counted by `sizes`, and a resumed pack over
    one packs that shard again and leaves the link's target alone."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    folder = store.LocalDir(out)
    (out / JOURNAL).symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        folder.append_line(JOURNAL, "{}\n")
    assert folder.read_text(JOURNAL) is None and JOURNAL not in folder.sizes()
    folder.write_text(JOURNAL, "header\n")  # replaces the link, never writes through it
    assert not (out / JOURNAL).is_symlink() and folder.read_text(JOURNAL) == "header\n"
    assert victim.read_bytes() == b"keep me"

    m = pack(image_folder, out, **PACKED, force=True)
    name = m["shards"][0]["name"]
    outside = tmp_path / name
    shutil.copy(out / name, outside)
    (out / name).unlink()
    (out / name).symlink_to(outside)  # the same bytes and size, behind a link
    assert name not in folder.sizes()
    with pytest.raises(store.NotAFile, match="a symlink"):
        folder.open(name)
    assert verify(out) == [f"{name}: a symlink; shards are read only as files inside {out} (copy the shard there)"]
    assert pack(image_folder, out, **PACKED) == m  # "shards are missing": packed again, the link replaced
    assert not (out / name).is_symlink() and verify(out) == [] and outside.read_bytes() == (out / name).read_bytes()
