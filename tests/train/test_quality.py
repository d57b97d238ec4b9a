"""Quality while training (`eval_every`): real runs of `artscale train` and `accelerate launch` with 2
gloo CPU ranks on tiny 16 px shards. The Inception weights are a download this machine cannot make:
the runs that evaluate use the test-only `eval_inception=random` (an untrained network, which warns),
so the figures are checked for where and how often they land, not for what they say about the
images; the KID/FID arithmetic is checked against references in metrics/test_fid.py. Inception at
299 px costs about 0.3 s an image on one core here, so the runs draw 2 images per class."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from artscale.core.errors import UserError
from artscale.data.loader import data_spec, val_loader
from artscale.train.config import load_config
from artscale.train.loop import EXIT_PREEMPTED, main
from artscale.train.quality import RANDOM_EVAL_WARNING

VENV_BIN = Path(sys.executable).parent
EVAL = ["eval_every=2", "eval_samples=2", "eval_inception=random"]


@pytest.fixture(scope="session")
def diffusion(tiny):
    """Overrides of a 3-step diffusion run evaluating every 2 steps."""

    def overrides(run: Path, shards_dir: Path, *extra: str) -> list[str]:
        return tiny(run, shards_dir, "objective=diffusion", "sample_steps=2", "max_steps=3", *EVAL, *extra)

    return overrides


@pytest.fixture(scope="session")
def evals(metrics):
    """The eval entries a run logged."""

    def read(run: Path) -> list[dict]:
        return [m for m in metrics(run) if "eval/kid" in m]

    return read


@pytest.fixture(scope="session")
def classes_with_two_val_images(classes):
    """Per-class KID needs 2 images a side: the classes whose val split has that many."""

    def count(shards_dir: Path) -> set[str]:
        counts = Counter()
        for _, labels, _, _ in val_loader(data_spec(str(shards_dir), 16), batch_size=64, rank=0, world=1):
            counts.update(labels.tolist())
        return {classes[i] for i, n in counts.items() if n >= 2}

    return count


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory, train_cli, diffusion):
    """A 3-step diffusion run evaluating at steps 2 and 3 (the last), tensorboard tracker."""
    run = tmp_path_factory.mktemp("one") / "run"
    proc = train_cli(diffusion(run, shards, "tracker=tensorboard"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


@pytest.mark.slow
def test_eval_every_logs_kid_overall_and_per_class_at_its_steps(
    one_rank, shards, manifest, tensorboard_scalars, classes, evals, classes_with_two_val_images
):
    run, proc = one_rank
    val_count = manifest(shards)["splits"]["val"]["count"]
    logged = evals(run)
    assert [m["step"] for m in logged] == [2, 3]
    expected = {f"eval/kid/{c}" for c in classes_with_two_val_images(shards)}
    assert expected, "the fixture's val split should hold 2 images of some class"
    for m in logged:
        assert m["eval/images"] == 2 * len(classes) and m["eval/real_images"] == val_count
        assert math.isfinite(m["eval/kid"]) and m["eval/kid_std"] >= 0 and m["eval/seconds"] > 0
        assert {k for k in m if k.startswith("eval/kid/")} == expected
        assert not any(k.startswith("eval/fid") for k in m)  # FID from 2048 images a side only
    assert [s for s, _ in tensorboard_scalars(run, "eval/kid")] == [2, 3]
    assert RANDOM_EVAL_WARNING in proc.stderr and "eval every 2 steps: 10 images" in proc.stdout
    assert proc.stdout.count("eval at step ") == 2
    # the val features: computed once, every val image, kept in the run dir for a resumed run
    (cached,) = (run / "eval").glob("val-features-*.safetensors")
    assert load_file(cached)["features"].shape == (val_count, 2048)


@pytest.mark.slow
def test_two_ranks_split_the_eval_gather_every_image_and_log_the_same_entries(
    one_rank, shards, tmp_path, launch, diffusion, evals, free_port
):
    run = tmp_path / "run"
    proc = launch(2, diffusion(run, shards), port=free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2 finished at step 3" in proc.stdout and "rank 1/2 finished at step 3" in proc.stdout
    single, double = evals(one_rank[0]), evals(run)
    assert [m["step"] for m in double] == [2, 3]
    for a, b in zip(single, double):
        assert b["eval/images"] == a["eval/images"] and b["eval/real_images"] == a["eval/real_images"]
        assert {k for k in a if k.startswith("eval/kid/")} == {k for k in b if k.startswith("eval/kid/")}
    # each rank extracted half of the val split: gathered, they are the one-process features, in another order
    (one,) = (one_rank[0] / "eval").glob("val-features-*.safetensors")
    (two,) = (run / "eval").glob("val-features-*.safetensors")
    a, b = load_file(one), load_file(two)
    assert a["features"].shape == b["features"].shape
    assert sorted(a["labels"].tolist()) == sorted(b["labels"].tolist())
    assert a["features"].double().sum(0).allclose(b["features"].double().sum(0), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_the_articles_objective_is_judged_by_its_outputs_of_the_val_images(
    shards, tmp_path, train_cli, tiny, manifest, evals
):
    run = tmp_path / "run"
    proc = train_cli(tiny(run, shards, "max_steps=2", *EVAL))
    assert proc.returncode == 0, proc.stderr[-3000:]
    val_count = manifest(shards)["splits"]["val"]["count"]
    (m,) = evals(run)
    assert m["step"] == 2 and m["eval/images"] == m["eval/real_images"] == val_count
    assert math.isfinite(m["eval/kid"]) and f"the model's outputs of the {val_count} val images" in proc.stdout


@pytest.mark.slow
def test_without_inception_weights_one_line_no_eval_and_training_succeeds(
    shards, tmp_path, monkeypatch, capsys, tiny, metrics, evals
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # where the weights would be cached
    run = tmp_path / "run"
    assert main(tiny(run, shards, "max_steps=2", "eval_every=1")) == 0
    out = capsys.readouterr()
    said = [ln for ln in (out.out + out.err).splitlines() if "Inception" in ln]
    assert len(said) == 1 and "no Inception-v3 weights at" in said[0] and "no KID/FID" in said[0]
    assert str(tmp_path / "empty-torch-home") in said[0]
    assert not evals(run) and [m["step"] for m in metrics(run) if "loss" in m] == [1, 2]
    assert not (run / "eval").exists()


@pytest.mark.slow
def test_a_stop_during_an_eval_abandons_it_and_checkpoints(shards, tmp_path, tiny, env, evals):
    """Plain progress lines every 0.01 s: the first `eval:` line means the eval at step 1 is under way."""
    run = tmp_path / "run"
    overrides = tiny(run, shards, "max_steps=200", "batch_size=2", "eval_every=1", "eval_inception=random")
    proc = subprocess.Popen(
        [*train_cli_cmd(), *overrides],
        env={**env(), "ARTSCALE_PROGRESS_S": "0.01"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:
        if line.startswith("eval: "):
            break
    else:
        raise AssertionError(f"no eval progress line; exit {proc.wait()}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "eval at step 1: abandoned" in out
    stopped = int(out.split("stopped by a signal at step ")[1].split(":")[0])
    assert stopped == 2 and (run / "checkpoints" / f"step-{stopped:06d}").is_dir()
    assert not evals(run)


def train_cli_cmd() -> list[str]:
    return [str(VENV_BIN / "artscale"), "train"]


def test_eval_keys_are_checked():
    assert load_config(None, ["eval_every=0"]).eval_every == 0
    for bad, key in ((["eval_every=-1"], "eval_every"), (["eval_samples=1"], "eval_samples")):
        with pytest.raises(UserError, match=f"config {key}=.*must be >= "):  # each key's range names it
            load_config(None, bad)


def test_a_named_inception_file_that_is_missing_stops_the_run(shards, tmp_path, tiny):
    with pytest.raises(UserError, match=r"eval_inception=\S+/no\.pth: no such file"):
        main(tiny(tmp_path / "run", shards, "max_steps=1", "eval_every=1", f"eval_inception={tmp_path}/no.pth"))
