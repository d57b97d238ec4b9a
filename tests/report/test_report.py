"""`artscale report` on real run dirs (both objectives, trained here) and real output dirs (generate,
sample, a sharded generation merged as the SLURM merge job does), then in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artscale.core.errors import UserError
from artscale.report.build import Limits, write_report
from artscale.report.html import Series, line_plot
from artscale.report.images import select, spread

CLASSES = ["drawings", "engraving", "iconography", "painting", "sculpture"]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory, tiny, make_image) -> dict[str, Path]:
    """One tiny run of each objective (trained in this process), the outputs made from them: a
    generation, the same generation in 2 shards merged, and a sampling run."""
    from artscale.core.atomic import write_json_atomic
    from artscale.export.article import export_onnx
    from artscale.infer.generate import generate
    from artscale.infer.outputs import write_merged
    from artscale.infer.sample import sample_images
    from artscale.train.config import load_config
    from artscale.train.loop import train

    root = tmp_path_factory.mktemp("report")
    every = ("sample_every=2", "val_every=2", "checkpoint_every=2", "keep_checkpoints=3")
    assert train(load_config(None, tiny(root / "run", shards, "max_steps=4", *every))) == 0
    diffusion = ("objective=diffusion", "batch_size=8", "max_steps=2", "sample_steps=2", "ema_decay=0.9")
    assert train(load_config(None, tiny(root / "diff", shards, *diffusion, *every))) == 0
    export_onnx(root / "run", root / "m.onnx")
    tree = root / "tree"
    for i in range(9):
        make_image(tree / ("a" if i % 3 else "b/c") / f"img {i}.jpg", (16 + 8 * (i % 3), 24), seed=i)
    (tree / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tree / "a" / "notes.txt").write_text("not an image")
    generate(root / "m.onnx", tree, root / "gen", workers=1)
    generate(root / "m.onnx", tree, root / "merged", list_only=True)
    for i in range(2):
        generate(root / "m.onnx", tree, root / "merged", num_shards=2, shard_index=i, workers=1)
    write_merged(root / "merged", 2)
    sample_images(root / "diff", root / "new", count=3, steps=2, batch_size=8)
    # what `artscale eval new/ SHARDS` writes (its own tests run the Inception network; a minute here)
    per_class = {
        c: {"generated": 3, "real": 2, "fid": 300.0 + i, "kid_mean": 0.1 * i, "kid_std": 0.01}
        for i, c in enumerate(CLASSES)
    }
    result = {"fid": 123.456, "kid_mean": 0.0421, "kid_std": 0.003, "kid_subset_size": 10, "kid_subsets": 100}
    result |= {
        "generated": {"dir": str(root / "new"), "images": 15},
        "real": {"shards": str(shards), "split": "val", "images": 10},
    }
    result |= {"inception_weights": "random", "per_class": per_class}
    write_json_atomic(root / "new" / "eval.json", result, sort_keys=False)
    write_json_atomic(root / "diff" / "eval-new.json", result, sort_keys=False)  # as `eval --out RUN/...` writes
    return {
        "run": root / "run",
        "diff": root / "diff",
        "gen": root / "gen",
        "merged": root / "merged",
        "new": root / "new",
    }


def html_of(index: Path) -> str:
    return index.read_text()


def thumbs_of(html: str) -> list[str]:
    return re.findall(r'<img src="(thumbs/[^"]+)"', html)


def test_spread_and_select_are_bounded_stable_and_start_with_the_first():
    assert spread(10, 1) == [0] and spread(10, 4) == [0, 3, 6, 9] and spread(3, 8) == [0, 1, 2]
    assert spread(1_000_000, 5) == [0, 250_000, 500_000, 749_999, 999_999]
    groups = {f"f{i}": list(range(100 + i)) for i in range(30)}
    picked, k = select(groups, 50, 48)
    assert len(picked) <= 50 and k == 1 and [f for f, _ in picked] == [f"f{i}" for i in range(30)]
    assert all(item == 0 for _, item in picked)  # one per folder: its first
    picked, k = select(groups, 120, 48)
    assert k == 4 and len(picked) == 120 and picked[:4] == [("f0", 0), ("f0", 33), ("f0", 66), ("f0", 99)]
    many = {f"f{i:04d}": [0, 1] for i in range(5000)}
    picked, _ = select(many, 100, 48)
    assert len(picked) == 100 and picked[0] == ("f0000", 0) and picked[-1] == ("f4999", 0)
    assert select(many, 100, 48) == (picked, 1)


def test_line_plot_labels_axes_and_takes_a_log_scale_for_a_falling_loss():
    loss = Series("loss", [(s, 2.0 * 0.97**s) for s in range(1, 200)])
    svg = line_plot([loss], "loss", "loss")
    assert "(log scale)" in svg and ">step</text>" in svg and "rotate(-90)" in svg and "<polyline" in svg
    flat = line_plot([Series("lr", [(1, 1e-3), (2, 1e-3 * 0.9)])], "lr", "lr")
    assert "(log scale)" not in flat
    long = Series("x", [(s, float(s % 7)) for s in range(100_000)])
    assert len(line_plot([long], "x", "x")) < 40_000  # thinned to a few points per pixel column


@pytest.mark.slow
def test_a_reconstruct_run_dir(runs, tmp_path):
    index = write_report([runs["run"]], tmp_path / "r")
    html = html_of(index)
    for title in ("loss", "mse", "perceptual", "grad_norm", "img_per_s", "val/psnr", "val/ssim"):
        assert f'aria-label="{title}"' in html, title
    assert html.count('<svg class="plot"') >= 7
    assert [int(s.replace(",", "")) for s in re.findall(r"<figcaption>step ([\d,]+)</figcaption>", html)] == [2, 4]
    assert "each row: an input | the model&#x27;s output" in html
    assert re.search(r"<th>max_steps</th><td class=\"changed\">4</td>", html)  # differs from the default: bold
    assert "step-000002" in html and "step-000004" in html and "final/" in html  # checkpoints
    assert "drawings" in html and "train samples" in html  # the manifest's classes and counts
    assert len(thumbs_of(html)) == 2 and all((index.parent / t).is_file() for t in thumbs_of(html))
    with (
        Image.open(index.parent / thumbs_of(html)[0]) as im,
        Image.open(runs["run"] / "samples/step-000002.png") as grid,
    ):
        assert im.format == "PNG" and im.size == grid.size and grid.width == 2 * 130 + 2  # kept whole, lossless
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(grid.convert("RGB")))


@pytest.mark.slow
def test_a_diffusion_run_dir_labels_each_grid_row_with_its_class(runs, tmp_path):
    html = html_of(write_report([runs["diff"]], tmp_path / "r"))
    assert "run dir: diff (diffusion)" in html and "one row per class" in html
    labels = re.findall(r'<div class="rowlabels"[^>]*>(.*?)</div></div>', html)
    assert labels and all(re.findall(r">([a-z]+)<", row + "<") == CLASSES for row in labels)
    assert 'aria-label="val/loss by timestep"' in html and 'aria-label="loss"' in html
    assert "eval-new.json" in html and "FID and KID" in html  # an eval.json written into the run dir


@pytest.mark.slow
def test_a_generation_dir_shows_each_output_beside_its_input(runs, tmp_path):
    index = write_report([runs["gen"]], tmp_path / "g")
    html = html_of(index)
    rep = json.loads((runs["gen"] / "report.json").read_text())
    assert rep["written"] == 9 and f"<b>{rep['written']}</b><span>written</span>" in html
    assert "not an image" in html and "a/broken.jpg" in html  # skipped, with its reason and file
    assert "showing 9 of 9 outputs in 2 of 2 folders" in html and "names from the input tree" in html
    tiles = re.findall(r'<div class="pair">(.*?)</div>', html)
    assert len(tiles) == 9 and all(t.count("<img ") == 2 for t in tiles)  # input | output
    assert len(set(thumbs_of(html))) == 18 and 'loading="lazy"' in html
    assert (tmp_path / "g" / "thumbs").is_dir() and not list(runs["gen"].glob("**/thumbs"))


@pytest.mark.slow
def test_a_merged_slurm_dir_shows_the_merged_report_and_every_shard(runs, tmp_path):
    html = html_of(write_report([runs["merged"]], tmp_path / "m"))
    assert "Shards (2)" in html and "report-0-of-2.json" in html and "report-1-of-2.json" in html
    assert "names from listing.jsonl" in html and "showing 9 of 9 outputs" in html
    assert "not merged yet" not in html
    (runs["merged"] / "report.json").rename(runs["merged"] / "report.json.bak")
    try:
        html = html_of(write_report([runs["merged"]], tmp_path / "m"))
        assert "not merged yet: 2 shard reports" in html and "<b>9</b><span>written</span>" in html
    finally:
        (runs["merged"] / "report.json.bak").rename(runs["merged"] / "report.json")


@pytest.mark.slow
def test_a_sampling_dir_is_a_contact_sheet_by_class(runs, tmp_path):
    html = html_of(write_report([runs["new"]], tmp_path / "s"))
    assert re.findall(r'<h4 class="folder">([^<]+)</h4>', html) == CLASSES
    assert "showing 15 of 15 images in 5 of 5 folders" in html and "sampling output: new" in html
    assert (
        "FID and KID" in html and "<th>FID</th><td>123.5</td>" in html and "<th>KID</th><td>0.0421 ± 0.003</td>" in html
    )
    assert "random Inception weights: these figures mean nothing" in html
    assert '<td>sculpture</td><td class="num">304</td><td class="num">0.4</td>' in html  # per class


@pytest.mark.slow
def test_a_large_output_dir_is_shown_in_bounded_pages_and_says_how_many(runs, tmp_path):
    limits = Limits(max_shown=6, per_folder=4, page_size=2)
    html = html_of(write_report([runs["gen"]], tmp_path / "g", limits))
    assert "showing 6 of 9 outputs in 2 of 2 folders" in html and "at most 3)" in html
    assert html.count('<details class="page"') == 3 and html.count('<details class="page" open>') == 1
    again = html_of(write_report([runs["gen"]], tmp_path / "g2", limits))
    assert thumbs_of(again) == thumbs_of(html)  # the same selection on every run


@pytest.mark.slow
def test_rerunning_on_a_grown_run_updates_the_report_and_keeps_unchanged_thumbnails(
    runs, shards, tmp_path, capsys, tiny, run_cli
):
    from artscale.train.config import load_config
    from artscale.train.loop import train

    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    index = write_report([run])
    assert index == run / "report" / "index.html"
    before = set(thumbs_of(html_of(index)))
    every = ("sample_every=2", "val_every=2", "checkpoint_every=2", "keep_checkpoints=3")
    assert train(load_config(None, tiny(run, shards, "max_steps=6", *every))) == 0  # the run grows by 2 steps
    (run / "samples" / "step-000002.png").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.0\n')  # a torn line, as a killed run leaves
    capsys.readouterr()
    html = html_of(write_report([run]))
    assert "<b>6 of 6</b>" in html and "1 unreadable line skipped" in html
    assert [int(s) for s in re.findall(r"<figcaption>step ([\d,]+)</figcaption>", html)] == [4, 6]
    now = set(thumbs_of(html))
    assert len(now & before) == 1 and "(2 thumbnails, 1 new;" in capsys.readouterr().out
    kept = {p.name for p in (run / "report" / "thumbs").iterdir()}
    assert kept == {t.split("/")[1] for t in now} | {"thumbs.json"}  # step 2's thumbnail is gone
    assert {p.name for p in (run / "report").iterdir()} == {"index.html", "thumbs"}  # no temporary file left
    info = run_cli("info", run)
    assert info.returncode == 0 and "metrics.jsonl: 1 unreadable line skipped" in info.stdout


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text('{"some": "thing"}')
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    (tmp_path / "listed").mkdir()
    shutil.copyfile(runs["merged"] / "listing.jsonl", tmp_path / "listed" / "listing.jsonl")
    cases = [
        (tmp_path / "missing", None, "not found"),
        (tmp_path / "file.txt", None, "is a file"),
        (tmp_path / "empty", None, "neither a run dir"),
        (tmp_path / "broken", None, "not a readable report"),
        (tmp_path / "other", None, "not a report of `artscale generate` or `artscale sample`"),
        (tmp_path / "listed", None, "holds listing.jsonl but no report yet"),
        (runs["run"] / "checkpoints" / "step-000002", None, "is a checkpoint"),
        (runs["gen"], runs["gen"] / "report", "inside the output dir"),
        (runs["gen"], tmp_path / "busy", "holds no artscale report"),
    ]
    for path, out, expected in cases:
        with pytest.raises(UserError, match=re.escape(expected)):
            write_report([path], out)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and not (runs["gen"] / "report").exists()
    for path, out, expected in (cases[0], cases[3], cases[-1]):  # the command line: one line, exit 2
        r = run_cli("report", path, *(["--out", out] if out else []))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (path, r.stderr)


def _blank(png: bytes, path: Path) -> bool:
    path.write_bytes(png)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    return pixels.std() < 5 or len(np.unique(pixels.reshape(-1, 3), axis=0)) < 50


@pytest.mark.slow
def test_the_report_in_a_real_browser(chromium, runs, open_browser, tmp_path):
    """Every source in one page, as the demo writes it: no console error, no failed request, every shown
    image loaded, the plots drawn, a screenshot that is not blank; a closed page loads when opened."""
    index = write_report(
        [runs["run"], runs["diff"], runs["gen"], runs["merged"], runs["new"]], tmp_path / "all", Limits(page_size=6)
    )
    copy = tmp_path / "copied"  # a copied report folder works on its own
    shutil.copytree(index.parent, copy)
    browser = open_browser(tmp_path / "profile")
    try:
        t = time.monotonic()
        browser.open(copy.joinpath("index.html").as_uri())
        shown = browser.shown_images()
        assert len(shown) == 2 + 1 + 2 * 6 + 2 * 6 + 6  # grids: run 2, diffusion 1; page 1 of each sheet
        assert [s for s in shown if not s[1] or s[2] <= 0] == []
        closed = browser.evaluate(
            "[...document.querySelectorAll('details.page:not([open]) img')].map(i => [i.complete, i.naturalWidth])"
        )
        assert closed and all(w == 0 for _, w in closed)  # lazy: a closed page has loaded nothing
        plots = browser.evaluate(
            "[...document.querySelectorAll('svg.plot')].map(s => s.querySelectorAll('polyline, circle').length)"
        )
        assert len(plots) >= 16 and min(plots) >= 1
        assert not _blank(browser.screenshot(), tmp_path / "top.png")
        (tmp_path / "full.png").write_bytes(browser.screenshot(full_page=True))
        browser.evaluate("document.querySelectorAll('details.page:not([open])').forEach(d => d.open = true)")
        opened = browser.shown_images()
        assert len(opened) > len(shown) and [s for s in opened if not s[1] or s[2] <= 0] == []
        assert browser.problems() == []
        assert time.monotonic() - t < 60
    finally:
        browser.close()


@pytest.mark.slow
def test_ci_fails_instead_of_skipping_without_chromium(tmp_path):
    """With CI=true and no browser to be found, the browser test fails: a green CI means it ran."""
    env = {k: v for k, v in os.environ.items() if k != "ARTSCALE_CHROMIUM"}
    env.update(CI="true", PATH=str(tmp_path))
    test = f"{Path(__file__)}::test_the_report_in_a_real_browser"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=300,
    )
    assert run.returncode == 1 and "CI=true but no chromium" in run.stdout, run.stdout[-2000:]
