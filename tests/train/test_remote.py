"""Training from shards at a URL, end to end: `artscale train data=s3://...` (moto's S3 server on the
loopback), stopped and resumed, ends with the weights of the same run on the local shards; credentials
never reach the run dir, and missing ones are one line. (HTTP, and a server dropping connections
mid-shard, are checked at the loader: tests/data/test_remote.py.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from artscale.data.pack import pack

OPTS = ["max_steps=8", "hflip=true", "checkpoint_every=4", "val_every=4"]


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_from_s3_stopped_and_resumed_ends_with_the_local_runs_weights_and_keeps_no_secret(
    shards, image_folder, s3, tmp_path, train_cli, tiny, sigterm_at
):
    pack(image_folder, f"{s3.url}/s16", size=16, val_fraction=0.25, workers=1, shard_max_count=7)
    local = train_cli(tiny(tmp_path / "local", shards, *OPTS))
    assert local.returncode == 0, local.stderr[-3000:]
    cut = tmp_path / "s3"
    stopped, _ = sigterm_at(tiny(cut, f"{s3.url}/s16", *OPTS, "tracker=wandb"), cut, 3)
    again = train_cli(tiny(cut, f"{s3.url}/s16", *OPTS, "tracker=wandb"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped}" in again.stdout and "finished at step 8" in again.stdout
    assert _same(_weights(cut), _weights(tmp_path / "local"))
    assert "(skipped samples: 0)" in again.stdout
    config = (cut / "config.json").read_text()
    assert f'"data": "{s3.url}/s16"' in config
    secrets = [s3.env["AWS_SECRET_ACCESS_KEY"].encode(), s3.env["AWS_ACCESS_KEY_ID"].encode()]
    files = [p for p in cut.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # W&B's record is among the files searched
    assert not [p for p in files for s in secrets if s in p.read_bytes()]


def test_a_url_with_a_login_is_refused_before_anything_is_written(s3, tmp_path, train_cli, tiny):
    run = tmp_path / "run"
    r = train_cli(tiny(run, "s3://AKIAEXAMPLE:hunter2secret@artscale/s16", "max_steps=1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "a login inside a URL" in lines[0], r.stderr
    assert "hunter2secret" not in r.stderr + r.stdout and not run.exists()


def test_training_without_credentials_is_one_line_naming_the_url_and_the_variables(
    image_folder, s3, no_credentials, tmp_path, train_cli, tiny
):
    r = train_cli(tiny(tmp_path / "run", f"{s3.url}/s16", "max_steps=1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert f"{s3.url}/s16/manifest.json" in lines[0] and "no credentials found" in lines[0]
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "AWS_ENDPOINT_URL" in lines[0]
