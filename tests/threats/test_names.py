"""Threat model, names: a class or shard name read from a file (a manifest, an ONNX model's metadata,
a report) becomes a path, so it must be one safe path component; nothing is written or read outside
the folders the user named, and a bad file is one line naming the file and the field, exit 2.

Each test makes the hostile file itself (issue 29, findings 1, 6, 9 and 10) and runs the real command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from artscale.contracts.onnx import read_metadata
from artscale.core.checks import BadFile
from artscale.core.errors import UserError
from artscale.data.collection import scan_collection
from artscale.data.loader import data_spec
from artscale.data.manifest import read_manifest
from artscale.data.pack import JOURNAL, PackSettings, pack, verify
from artscale.export.article import export_onnx
from artscale.export.skeleton import parity_images
from artscale.infer.sample import sample_images


def one_line_error(done) -> str:
    """The one line a user's mistake prints (exit 2, no traceback), with its prefix taken off."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("artscale: error: ")
    return lines[0].removeprefix("artscale: error: ")


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --- an exported denoiser whose metadata is rewritten --------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_diffusion_run) -> Path:
    root = tmp_path_factory.mktemp("threat-onnx")
    export_onnx(make_diffusion_run(root / "run"), root / "m.onnx")
    return root / "m.onnx"


def with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of the model `src` at `dst` with metadata keys replaced (or added), as anyone could with onnx."""
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props} | changes
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("hostile", ["../../escaped", "ABSOLUTE"])
def test_finding_1_onnx_classes_that_climb_out_are_refused_by_sample_and_nothing_is_written(
    exported, tmp_path, run_cli, hostile
):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    name = str(tmp_path / "abs" / "X") if hostile == "ABSOLUTE" else hostile
    model = with_metadata(exported, work / "m.onnx", classes=json.dumps([name, "impressionism", "ukiyo-e"]))
    done = run_cli("sample", model, work / "out", "--class", "all", "--count", "1", "--steps", "1", "--device", "cpu")
    line = one_line_error(done)
    assert line.startswith(f"{model}: metadata classes[0] ") and "must be one folder name" in line
    assert tree(tmp_path) == ["a", "a/b", "a/b/m.onnx"]  # no escaped/, no abs/X/, not even OUT


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"classes": '"cubism"'}, "metadata classes must be a list of class names, not str"),
        ({"classes": '["a", "b", "a"]'}, "metadata classes[2] 'a' is listed twice"),
        ({"classes": '["a", "red\\u001b[31m", "c"]'}, "metadata classes[1] 'red\\x1b[31m' holds control characters"),
        ({"classes": "[" * 100_000}, "metadata classes is not valid JSON"),
        ({"null_label": "9"}, "metadata null_label must be 3, the index after the last class"),
        ({"null_label": "-1"}, "metadata null_label must be a whole number, not '-1'"),
        ({"image_size": "1e308"}, "metadata image_size must be a whole number, not '1e308'"),
        ({"image_size": "99999999"}, "metadata image_size must be <= 16384, not 99999999"),
        ({"image_size": "20"}, "metadata image_size must be a multiple of 8, not 20"),
        ({"prediction_type": "x0"}, "metadata prediction_type must be one of epsilon, v_prediction, sample"),
        ({"scheduler": "{not json"}, "metadata scheduler is not valid JSON"),
        ({"scheduler": '{"num_train_timesteps": "1000"}'}, "metadata scheduler.num_train_timesteps must be int"),
        ({"scheduler": '{"num_train_timesteps": 1000, "beta_end": NaN}'}, "scheduler.beta_end must be a finite"),
        ({"config": "[1]"}, "metadata config is not a mapping"),
        ({"config": '{"block_out_channels": [32, "x"]}'}, "metadata config.block_out_channels must be a list"),
    ],
)
def test_finding_1_every_field_of_the_onnx_metadata_is_checked_in_one_line(exported, tmp_path, changes, message):
    model = with_metadata(exported, tmp_path / "m.onnx", **changes)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with pytest.raises(BadFile) as e:
        read_metadata(session, model)
    assert str(e.value).startswith(f"{model}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_finding_1_and_10_info_of_an_onnx_model_prints_escapes_escaped(exported, tmp_path, run_cli):
    model = with_metadata(exported, tmp_path / "m.onnx", note="\x1b]0;owned\x07\x1b[2J")
    done = run_cli("info", model)
    assert done.returncode == 0 and "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "  note: \\x1b]0;owned\\x07\\x1b[2J" in done.stdout


def test_finding_1_report_of_a_sample_output_whose_report_names_outside_classes_reads_nothing_outside(
    exported, tmp_path, run_cli, make_image
):
    out = tmp_path / "out"
    sample_images(exported, out, count=1, steps=1, class_name="all", batch_size=4, device="cpu")
    victim = make_image(tmp_path / "victim" / "00000000.png", (16, 16), seed=3)
    rep = json.loads((out / "report.json").read_text())
    rep["classes"][0] = "../victim"
    (out / "report.json").write_text(json.dumps(rep))
    done = run_cli("report", out, "--out", tmp_path / "html")
    line = one_line_error(done)
    assert line.startswith(f"{out / 'report.json'}: classes[0] '../victim' must be one folder name")
    thumbs = [p for p in (tmp_path / "html").rglob("*") if p.is_file()] if (tmp_path / "html").exists() else []
    assert thumbs == [] and victim.is_file()


# --- manifests: a copy of real shards, edited ------------------------------------------------------


@pytest.fixture
def packed(shards, tmp_path) -> Path:
    """A copy of the real packed shards (tests/conftest.py's `shards`), to make hostile."""
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def edit(root: Path, change) -> Path:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("hostile", ["../../X", "/abs/X"])
def test_finding_1_a_manifest_with_outside_classes_fails_verify_info_training_and_export(
    packed, tmp_path, run_cli, hostile
):
    path = edit(packed, lambda m: m["classes"].__setitem__(0, hostile))
    want = f"{path}: classes[0] {hostile!r} must be one folder name"
    for command in ("verify", "info"):
        assert one_line_error(run_cli(command, packed)).startswith(want)
    for reader in (lambda: data_spec(str(packed), 16), lambda: parity_images(packed, None, 16)):
        with pytest.raises(BadFile, match="classes\\[0\\]"):
            reader()


def test_finding_1_pack_refuses_a_class_folder_whose_name_cannot_be_a_class(tmp_path, make_image):
    src = tmp_path / "src"
    for i, cls in enumerate(["good", "red\x1b[31m", "x" * 201]):
        make_image(src / cls / "a.png", (24, 24), seed=i)
    with pytest.raises(UserError, match=r"class folder 'red\\x1b\[31m' holds control characters: rename it"):
        pack(src, tmp_path / "out", size=16, workers=1)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(src / ("red\x1b[31m"))
    with pytest.raises(UserError, match="is longer than 200 bytes: rename it, or pack the other classes"):
        pack(src, tmp_path / "out", size=16, workers=1)
    manifest = pack(src, tmp_path / "out", size=16, workers=1, classes=["good"])  # the others left out by name
    assert manifest["classes"] == ["good"]


@pytest.mark.parametrize("hostile", ["../x.tar", "/etc/passwd", "train-000000.tar/../../x.tar", "val-1.tar"])
def test_finding_9_shard_names_other_than_packs_are_refused(packed, tmp_path, run_cli, hostile):
    outside = tmp_path / "x.tar"
    shutil.copy(packed / "train-000000.tar", outside)
    path = edit(packed, lambda m: m["shards"][0].__setitem__("name", hostile))
    line = one_line_error(run_cli("verify", packed))
    assert line == f"{path}: shards[0].name {hostile!r} is not a shard name pack writes (train-000000.tar)"
    with pytest.raises(BadFile, match=r"shards\[0\]\.name"):
        data_spec(str(packed), 16)


def test_finding_9_a_symlinked_shard_is_refused_by_verify_training_and_export(packed, tmp_path, run_cli):
    for name in ("train-000000.tar", "val-000000.tar"):  # the same bytes, moved outside, linked back
        shutil.move(packed / name, tmp_path / name)
        os.symlink(tmp_path / name, packed / name)
    done = run_cli("verify", packed)
    assert done.returncode == 1 and "every shard matches" not in done.stdout
    assert [line for line in done.stderr.splitlines() if not line.startswith("verify: ")] == [
        f"{name}: a symlink; shards are read only as files inside {packed} (copy the shard there)"
        for name in ("train-000000.tar", "val-000000.tar")
    ]
    with pytest.raises(UserError, match=f"^{packed}/train-000000.tar is a symlink; shards are read only as files"):
        data_spec(str(packed), 16)
    with pytest.raises(UserError, match=f"^{packed}/val-000000.tar is a symlink"):
        parity_images(packed, None, 16)


def test_finding_9_a_shard_that_is_a_fifo_is_reported_not_waited_on(packed, run_cli):
    (packed / "val-000000.tar").unlink()
    os.mkfifo(packed / "val-000000.tar")  # opening it for reading would wait for a writer forever
    done = run_cli("verify", packed, timeout=120)
    assert done.returncode == 1 and "val-000000.tar: not a regular file" in done.stderr.splitlines()


@pytest.mark.parametrize("hostile", ["../victim.tar", "symlink", "header"])
def test_finding_9_a_resumed_pack_trusts_no_journal_record_naming_a_shard_outside(tmp_path, make_image, hostile):
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        make_image(src / ("a", "b")[i % 2] / f"{i}.png", (24, 24), seed=i)
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"not yours" * 100)
    out.mkdir()
    name = "train-000000.tar" if hostile == "symlink" else "../victim.tar"
    if hostile == "symlink":
        os.symlink(victim, out / name)
    identity = {"source": str(src.resolve()), "settings": asdict(PackSettings(size=16, val_fraction=0.0))}
    header = {"kind": "header", "identity": identity, "fingerprint": scan_collection(src, [], False, 0.0).fingerprint}
    record = {"kind": "shard", "name": name, "split": "train", "count": 6, "bytes": victim.stat().st_size}
    record |= {"sha256": hashlib.sha256(victim.read_bytes()).hexdigest(), "per_class": {"0": 6}, "skipped": []}
    lines = [["not", "a", "header"] if hostile == "header" else header, record | {"end": 6}]
    (out / JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in lines))
    m = pack(src, out, size=16, val_fraction=0.0, workers=1)
    assert [(s["name"], s["count"]) for s in m["shards"]] == [("train-000000.tar", 6)]
    assert verify(out) == [] and not (out / "train-000000.tar").is_symlink()
    assert victim.read_bytes() == b"not yours" * 100


def test_finding_10_info_shows_escapes_in_names_escaped(packed, run_cli):
    edit(packed, lambda m: m.update(source="/src\x1b[2J", skipped=[{"path": "p", "reason": "bad\x1b[31m: x"}]))
    done = run_cli("info", packed)
    assert done.returncode == 0 and "\x1b" not in done.stdout
    assert "from /src\\x1b[2J)" in done.stdout and "skipped, bad\\x1b[31m: 1" in done.stdout
    edit(packed, lambda m: m["classes"].__setitem__(1, "red\x1b[31mRED"))
    line = one_line_error(run_cli("info", packed))
    assert "\x1b" not in line and "classes[1] 'red\\x1b[31mRED' holds control characters" in line


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["shards"][0].update(count="62"), "shards[0].count must be int, not str '62'"),
        (lambda m: m.update(shards="train-000000.tar"), "shards must be a list of shards, not str"),
        (lambda m: m["shards"][0].pop("name"), "shards[0].name is missing"),
        (lambda m: m["shards"][0].update(count=1e308), "shards[0].count must be int, not float 1e+308"),
        (lambda m: m["shards"][0].update(count=10**15), "shards[0].count must be <= 1000000000000"),
        (lambda m: m["shards"][0].update(sha256="../" * 21 + "x"), "shards[0].sha256 is not 64 lowercase hex"),
        (lambda m: m["splits"].update(test={"count": 1, "shards": 1}), "splits names an unknown split 'test'"),
        (lambda m: m["splits"]["val"].update(count=-1), "splits.val.count must be >= 0, not -1"),
        (lambda m: m.update(image_size=float("nan")), "image_size must be int, not float nan"),
    ],
)
def test_finding_6_a_manifest_of_the_wrong_types_is_one_line(packed, run_cli, change, message):
    path = edit(packed, change)
    assert one_line_error(run_cli("verify", packed)).startswith(f"{path}: {message}")
    with pytest.raises(BadFile) as e:
        read_manifest(packed)
    assert str(e.value).startswith(f"{path}: {message}")


def test_finding_6_a_manifest_nested_too_deep_or_not_json_is_one_line(packed, run_cli):
    (packed / "manifest.json").write_text("[" * 100_000)
    assert one_line_error(run_cli("verify", packed)).startswith(f"{packed / 'manifest.json'} is not valid JSON")
    (packed / "manifest.json").write_bytes(b'{"classes": "\xff"}')
    assert one_line_error(run_cli("info", packed)).startswith(f"{packed / 'manifest.json'} is not valid JSON")
