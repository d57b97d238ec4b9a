"""Threat model, writing (issue 29, findings 2-5 and 11): what someone who can write into a shared
OUT (or a user's damaged folder) can plant there, and that artscale's writes neither follow it nor
read it back.

Each hostile file is made here: a symlink at the exact temporary name the old code used, at the
name the new code uses, a symlinked subfolder, an output that is a link to an outside file, a
255-byte name, a non-UTF-8 name. The victim is a file or folder outside OUT whose content must
not change.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from artscale.core.atomic import TMP_SUFFIX, UnsafePath, fresh_dir, regular_file, tmp_name, write_atomic
from artscale.core.errors import UserError

VICTIM = b"the victim's own bytes\n"
ARTSCALE = str(Path(sys.executable).parent / "artscale")


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside OUT that a followed link would overwrite."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    return path


@pytest.fixture
def small_tree(tmp_path, make_image) -> Path:
    tree = tmp_path / "in"
    for rel in ("x.jpg", "a/y.jpg", "a/z.png"):
        make_image(tree / rel, (16, 16), seed=len(rel))
    return tree


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


# ---- finding 2: temporary files follow symlinks ----------------------------------------------------


def test_a_link_at_the_old_or_the_new_temporary_name_is_not_followed(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    old_names = [".a.png.artscale-tmp", "a.png.tmp", ".a.png.tmp"]  # outputs', write_atomic's, the report's
    for name in [*old_names, tmp_name("a.png")]:
        (out / name).symlink_to(victim)
    write_atomic(out / "a.png", b"PNG")
    assert victim.read_bytes() == VICTIM
    assert (out / "a.png").read_bytes() == b"PNG" and not (out / "a.png").is_symlink()
    assert not os.path.lexists(out / tmp_name("a.png"))  # the planted link was removed, not written through
    for name in old_names:  # not artscale's names any more: left alone, still pointing at an unchanged file
        assert (out / name).is_symlink()
    # the new name is short and fixed per target, so a rerun replaces a killed run's leftover
    assert len(tmp_name("a.png")) == 1 + 16 + len(TMP_SUFFIX) and tmp_name("a.png") == tmp_name("a.png")


def test_a_new_temporary_name_planted_as_something_else_still_writes_safely(tmp_path, victim):
    """A folder (which unlink cannot remove) or a link to a folder at the temporary name: another
    exclusive name is taken; nothing outside changes, nothing is left behind."""
    out = tmp_path / "out"
    (out / tmp_name("b.json")).mkdir(parents=True)
    (out / tmp_name("c.json")).symlink_to(victim.parent, target_is_directory=True)
    write_atomic(out / "b.json", "{}\n")
    write_atomic(out / "c.json", "[]\n")
    assert (out / "b.json").read_text() == "{}\n" and (out / "c.json").read_text() == "[]\n"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"] and victim.read_bytes() == VICTIM
    assert [p.name for p in _temps(out)] == [tmp_name("b.json")]  # the planted folder only, untouched


def test_a_target_that_is_a_link_is_replaced_not_written_through(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").symlink_to(victim)
    write_atomic(out / "report.json", "{}\n")
    assert victim.read_bytes() == VICTIM and not (out / "report.json").is_symlink()


def test_a_symlinked_folder_inside_root_is_refused_and_nothing_lands_outside(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UnsafePath, match="is a symbolic link inside") as e:
        write_atomic(out / "a" / "deep" / "x.png", b"PNG", root=out)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsafePath, match="not inside"):
        write_atomic(out / ".." / "x.png", b"PNG", root=out)
    with pytest.raises(UnsafePath, match="not inside"):
        write_atomic(Path("/tmp/x.png"), b"PNG", root=out)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_generate_writes_no_output_through_planted_links(model16, small_tree, tmp_path, victim):
    from artscale.infer.generate import generate

    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    for rel in ("x.png", "a/y.png", "report.json"):  # the old names of their temporary files, and the new ones
        old = out / rel
        (old.parent / f".{old.name}.artscale-tmp").symlink_to(victim)
        (old.parent / tmp_name(old.name)).symlink_to(victim)
    report = generate(model16, small_tree, out, device="cpu", workers=1)
    assert report["written"] == 3 and victim.read_bytes() == VICTIM
    for rel in ("x.png", "a/y.png", "a/z.png"):
        assert regular_file(out / rel, out) and Image.open(out / rel).size == (16, 16)
    assert json.loads((out / "report.json").read_text())["written"] == 3
    left = _temps(out)  # the old names only: no longer artscale's, left alone
    assert sorted(p.name for p in left) == [".report.json.artscale-tmp", ".x.png.artscale-tmp", ".y.png.artscale-tmp"]
    assert all(p.is_symlink() for p in left)


def test_generate_refuses_a_symlinked_subfolder_of_out_before_writing(model16, small_tree, tmp_path, victim):
    """Refused, not skipped: the run could not do what it was asked, and exit 0 with the folder's
    outputs missing would hide that; the fix is one rm."""
    from artscale.infer.generate import generate

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UserError, match=r"out/a is a symbolic link inside .*remove it") as e:
        generate(model16, small_tree, out, device="cpu", workers=1)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]
    assert not (out / "x.png").exists()  # refused before any work


def test_sample_refuses_a_symlinked_class_folder_and_replaces_a_linked_image(
    make_diffusion_run, diffusion_classes, tmp_path, victim
):
    from artscale.infer.sample import sample_images

    run = make_diffusion_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    first, second = diffusion_classes[:2]
    (out / first).symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(UserError, match=f"out/{first} is a symbolic link inside"):
        sample_images(run, out, count=1, steps=2, device="cpu")
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]
    (out / first).unlink()
    (out / second).mkdir()
    (out / second / "00000000.png").symlink_to(victim)  # an image that is a link: not done
    report = sample_images(run, out, count=1, steps=2, device="cpu")
    assert report["already_done"] == 0 and report["written"] == len(diffusion_classes)
    assert victim.read_bytes() == VICTIM and not (out / second / "00000000.png").is_symlink()


def test_checkpoint_folders_are_made_fresh_never_through_a_planted_link(tmp_path, victim):
    import torch
    from accelerate import Accelerator

    from artscale.train.checkpoint import CheckpointManager, save_final

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    outside = victim.parent
    (run / "final.tmp").symlink_to(outside, target_is_directory=True)
    (run / "checkpoints" / "step-000002.tmp").symlink_to(outside, target_is_directory=True)
    net = torch.nn.Linear(2, 2)
    save_final(net.state_dict(), run, {"image_size": 16}, 2)
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt = acc.prepare(net, opt)
    ckpt = CheckpointManager(acc, run, {"image_size": 16}, net, every=2, keep=2)
    path = ckpt.save(2, {})
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"] and victim.read_bytes() == VICTIM
    assert not path.is_symlink() and (path / "trainer_state.json").is_file()
    assert not (run / "final").is_symlink() and (run / "final" / "model.safetensors").is_file()
    assert not os.path.lexists(run / "final.tmp") and not os.path.lexists(run / "checkpoints" / "step-000002.tmp")
    # checkpoints/ itself replaced by a link: refused in one line on every rank, nothing written there
    (run / "checkpoints").rename(run / "moved")
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath, match="checkpoints is a symbolic link inside"):
        ckpt.save(4, {})
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_a_journal_or_metrics_file_that_is_a_link_is_not_appended_to(tmp_path, victim):
    from artscale.core.atomic import append_text

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePath, match="metrics.jsonl is a symbolic link"):
        append_text(tmp_path / "run" / "metrics.jsonl", '{"step": 1}\n', sync=False)
    assert victim.read_bytes() == VICTIM


def test_fresh_dir_removes_a_planted_link_and_keeps_its_target(tmp_path, victim):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x.tmp").symlink_to(victim.parent, target_is_directory=True)
    made = fresh_dir(tmp_path / "run" / "x.tmp")
    assert made.is_dir() and not made.is_symlink() and not any(made.iterdir()) and victim.read_bytes() == VICTIM


def test_pack_writes_no_shard_or_manifest_through_planted_links(image_folder, tmp_path, victim):
    from artscale.data.pack import pack

    out = tmp_path / "shards"
    out.mkdir()
    for name in ("train-000000.tar.partial", "val-000000.tar.partial", "manifest.json.tmp", tmp_name("manifest.json")):
        (out / name).symlink_to(victim)
    manifest = pack(image_folder, out, size=16, val_fraction=0.25, workers=1)
    assert victim.read_bytes() == VICTIM and manifest["shards"]
    assert all(regular_file(out / s["name"], out) for s in manifest["shards"])
    assert not any(p.is_symlink() for p in out.iterdir())  # our names, planted: removed (pack owns them)


# ---- finding 3: an output that is a link to an outside file is not done, nor read into a report ---


def test_an_output_that_is_a_link_is_not_done_and_is_replaced(model16, small_tree, tmp_path, make_image):
    from artscale.infer.generate import generate

    out = tmp_path / "out"
    outside = make_image(tmp_path / "secret" / "secret.png", (40, 40), seed=99)
    before = outside.read_bytes()
    out.mkdir()
    (out / "x.png").symlink_to(outside)
    report = generate(model16, small_tree, out, device="cpu", workers=1)
    assert report["already_done"] == 0 and report["written"] == 3
    assert not (out / "x.png").is_symlink() and outside.read_bytes() == before


def test_report_shows_no_thumbnail_of_a_linked_output(model16, small_tree, tmp_path, make_image):
    from artscale.infer.generate import generate
    from artscale.report.build import write_report

    out = tmp_path / "out"
    generate(model16, small_tree, out, device="cpu", workers=1)
    outside = make_image(tmp_path / "secret" / "secret.png", (40, 40), seed=99)
    (out / "x.png").unlink()
    (out / "x.png").symlink_to(outside)  # planted after the run
    foreign = tmp_path / "secret" / "eval.json"
    foreign.write_text(json.dumps({"fid": 987.654, "kid_mean": 0.5, "kid_std": 0.1}))
    (out / "eval.json").symlink_to(foreign)
    index = write_report([out], tmp_path / "rep")
    html = index.read_text()
    assert "987.7" not in html and "987.654" not in html  # a linked eval.json is not this output's
    thumbs = json.loads((tmp_path / "rep" / "thumbs" / "thumbs.json").read_text())
    assert "a symbolic link or not a file: not read" in html
    # inputs: 3 thumbnails, outputs: 2 (the linked one is not read); none of them 40 px wide
    assert len(thumbs) == 5 and all(sizes[2] == 16 for sizes in thumbs.values())


# ---- finding 4: a legal 242-255 byte name -------------------------------------------------------------


def test_a_255_byte_input_name_generates_and_reruns(model16, tmp_path, make_image):
    from artscale.infer.generate import generate

    tree = tmp_path / "in"
    name = "n" * (255 - len(".png")) + ".png"  # the old temporary name, ".NAME.artscale-tmp", was 270 bytes
    make_image(tree / name, (16, 16), seed=1)
    out = tmp_path / "out"
    first = generate(model16, tree, out, device="cpu", workers=1)
    assert first["written"] == 1 and (out / name).is_file() and len(name.encode()) == 255
    again = generate(model16, tree, out, device="cpu", workers=1)
    assert again["already_done"] == 1 and json.loads((out / "report.json").read_text())["already_done"] == 1


# ---- finding 5: report over a non-UTF-8 file name -------------------------------------------------


def test_report_of_an_output_with_a_non_utf8_name_works_and_reruns(model16, tmp_path, make_image, run_cli):
    from artscale.infer.generate import generate

    tree = tmp_path / "in"
    raw = os.fsdecode(b"caf\xe9-latin1.jpg")  # not UTF-8: Python holds the byte as a surrogate
    make_image(tree / raw, (16, 16), seed=3)
    make_image(tree / "plain.jpg", (16, 16), seed=4)
    out = tmp_path / "out"
    assert generate(model16, tree, out, device="cpu", workers=1)["written"] == 2
    rep = tmp_path / "rep"

    def small_files():  # index.html (some kB) cannot be written: a failure after thumbs/ was made
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))

    failed = subprocess.run(
        [ARTSCALE, "report", out, "--out", rep],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert failed.returncode != 0 and not rep.exists(), failed.stderr[-2000:]  # nothing half-built left
    for _ in range(2):  # a run, then a rerun over its own report
        ok = run_cli("report", out, "--out", rep)
        assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr[-2000:]
    html = (rep / "index.html").read_text(encoding="utf-8")
    assert "caf\ufffd-latin1" in html


# ---- finding 11: onnxruntime telemetry ------------------------------------------------------------


def test_onnxruntime_writes_nothing_into_home(model16, small_tree, tmp_path):
    """Since 1.29 onnxruntime's Linux wheels write a device id under ~/.cache/Microsoft when imported."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # as a user's shell has it
    ran = subprocess.run(
        [ARTSCALE, "generate", model16, small_tree, tmp_path / "out", "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**env, "HOME": str(home)},
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["written"] == 3
    assert not (home / ".cache" / "Microsoft").exists(), sorted(map(str, home.rglob("*")))
