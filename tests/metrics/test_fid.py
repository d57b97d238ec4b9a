"""`artscale eval`: FID and KID on real shards and real image files.

The Inception weights are a download that this machine cannot make: every test that runs the
network uses an UNTRAINED Inception-v3 (`--inception-weights random`, which warns), and checks
the arithmetic against reference computations written here from the definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity import KEY_METRIC_FID
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from artscale.core.errors import UserError
from artscale.data.loader import SkipCounter, data_spec, shard_images
from artscale.data.pack import pack
from artscale.metrics.fid import (
    RANDOM_INCEPTION_WARNING,
    FolderScan,
    class_distances,
    distances,
    extract_features,
    fid_kid,
    frechet_distance,
    generated_images,
    kernel_distance,
    load_inception,
)

CLASSES = ["ink", "oil"]


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), square roots by eigh."""

    def sqrtm_psd(m: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm_psd(sa)
    cross = np.trace(sqrtm_psd(root @ sb @ root))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * cross)


def in_their_span(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in an orthonormal basis of the span of their centred rows and their mean
    difference. FID is unchanged by a rotation and a common shift of feature space, and all it
    sees lies in that span: a few dimensions instead of 2048 (eigh at 2048-d takes seconds here)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    q, _ = np.linalg.qr(np.concatenate([ca, cb, [a.mean(0) - b.mean(0)]]).T)
    return (a - b.mean(0)) @ q, (b - b.mean(0)) @ q


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3: mean of k over distinct pairs within each
    set, minus twice the mean over all cross pairs."""
    d, m, n = x.shape[1], len(x), len(y)

    def k(p, q):
        return (p @ q.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return torch.from_numpy(rng.normal(size=(n, d)) @ mix + shift)


# more samples than dimensions, fewer (rank-deficient, like small eval sets), and one of each
@pytest.mark.parametrize("na,nb,d", [(400, 300, 24), (30, 40, 64), (20, 200, 32)])
def test_fid_matches_a_reference_frechet_distance(na, nb, d):
    a, b = gaussian_features(na, d, 0), gaussian_features(nb, d, 1, shift=0.3)
    ref = reference_fid(a.numpy(), b.numpy())
    assert ref > 1.0
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)  # the reference has sqrt-of-rounding noise
    assert abs(frechet_distance(a, a)) < 1e-12 * ref
    # torch-fidelity's own FID (eigenvalues of the non-symmetric product) agrees too
    stats = [fid_features_to_statistics(x) for x in (a, b)]
    assert fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID] == pytest.approx(ref, rel=1e-6)


def test_kid_matches_its_definition():
    a, b = gaussian_features(60, 16, 0), gaussian_features(50, 16, 1, shift=0.2)
    full = reference_mmd2(a.numpy(), b.numpy())
    # One subset of each side's whole set: the subset is a permutation, the estimate is exact.
    same_size = kernel_distance(a[:50], b, subsets=5, subset_size=1000)
    assert same_size["kid_subset_size"] == 50
    assert same_size["kid_mean"] == pytest.approx(reference_mmd2(a[:50].numpy(), b.numpy()), rel=1e-9)
    assert same_size["kid_std"] < 1e-9 * abs(same_size["kid_mean"])
    # Random subsets: the mean over subsets estimates the whole-set statistic without bias.
    kid = kernel_distance(a, b, subsets=400, subset_size=20)
    assert kid["kid_subset_size"] == 20
    assert abs(kid["kid_mean"] - full) < 4 * kid["kid_std"] / np.sqrt(400)
    assert full > 0.05 and kid["kid_std"] > 0


def test_fid_waits_for_its_count_and_per_class_figures_come_for_generated_classes_only():
    """Training's eval asks FID from 2048 images a side (fid_min); `artscale eval` always gives it."""
    real, fake = gaussian_features(40, 8, 0), gaussian_features(30, 8, 1, shift=0.3)
    assert distances(real, fake, fid_min=31)["fid"] is None
    assert distances(real, fake, fid_min=30)["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-12)
    assert distances(real, fake)["kid_mean"] == kernel_distance(real, fake)["kid_mean"]
    per = class_distances(real, [0] * 20 + [1] * 20, fake, [0] * 29 + [2], ["ink", "oil", "wax"], fid_min=25)
    assert set(per) == {"ink", "wax"}  # no oil was generated
    assert per["ink"]["generated"] == 29 and per["ink"]["real"] == 20 and per["ink"]["fid"] is None
    assert per["ink"]["kid_mean"] == kernel_distance(real[:20], fake[:29])["kid_mean"]
    assert per["wax"]["real"] == 0 and per["wax"]["kid_mean"] is None and "fewer than 2" in per["wax"]["note"]


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory, make_image):
    """2 classes x 2 images of mixed sizes, packed at 16 px, all in the train split (Inception-v3
    at 299 px costs 0.3-1.5 s an image on 2 shared cores: keep the sets tiny)."""
    src = tmp_path_factory.mktemp("eval_src")
    for ci, cls in enumerate(CLASSES):
        for i in range(2):
            make_image(src / cls / f"{i}.png", (24 + 8 * i, 40 - 4 * i), seed=50 + 10 * ci + i)
    out = tmp_path_factory.mktemp("eval_shards") / "s16"
    pack(src, out, size=16, val_fraction=0.0, workers=1)
    return out


def write_copies(shards, root, brightness: int = 0):
    """The shards' own images as PNGs in class folders, brighter by `brightness` levels."""
    urls = data_spec(str(shards), 16).train_urls
    for i, (im, cls) in enumerate(shard_images(urls, SkipCounter())):
        shifted = np.clip(im.astype(int) + brightness, 0, 255).astype(np.uint8)
        (root / CLASSES[cls]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shifted).save(root / CLASSES[cls] / f"{i}.png")
    return root


@pytest.mark.slow
def test_fid_grows_with_a_shift_and_matches_the_reference_on_the_same_features(eval_shards, tmp_path):
    """The self-comparison (FID ~0) runs through the CLI below; each FID at 2048-d costs seconds here."""
    net = load_inception("random")
    urls = data_spec(str(eval_shards), 16).train_urls
    real, real_labels = extract_features(net, shard_images(urls, SkipCounter()))
    assert real.shape == (4, 2048) and sorted(real_labels) == [0, 0, 1, 1]
    fakes, fids = [], []
    for shift in (25, 80):
        root = write_copies(eval_shards, tmp_path / f"shift{shift}", shift)
        fake, labels = extract_features(net, generated_images(root, CLASSES, FolderScan()), batch_size=4)
        assert sorted(labels) == sorted(real_labels)
        fakes.append(fake)
        fids.append(frechet_distance(real, fake))
    assert fids[0] == pytest.approx(reference_fid(*in_their_span(real.numpy(), fakes[0].numpy())), rel=1e-6)
    assert 0 < fids[0] < fids[1]


@pytest.mark.slow
def test_eval_cli_writes_counts_and_per_class_figures(eval_shards, tmp_path, run_cli):
    gen = write_copies(eval_shards, tmp_path / "gen")
    (gen / "oil" / "broken.png").write_bytes(b"\x89PNG not really")
    (gen / "notes.txt").write_text("junk is ignored, not skipped")
    out = tmp_path / "res" / "eval.json"
    r = run_cli("eval", gen, eval_shards, "--split", "train", "--inception-weights", "random", "--out", out)
    assert r.returncode == 0, r.stderr
    assert RANDOM_INCEPTION_WARNING in r.stderr
    assert "skipped 1 unreadable files" in r.stderr
    res = json.loads(out.read_text())
    assert res["generated"]["images"] == 4 and res["generated"]["skipped"] == 1
    assert res["generated"]["skipped_files"][0]["path"] == "oil/broken.png"
    assert res["generated"]["ignored"] == 1 and res["generated"]["sizes"] == {"16x16": 4}
    assert "warning: generated images are" not in r.stderr
    assert res["real"] == {"shards": str(eval_shards), "split": "train", "images": 4, "skipped": 0}
    assert abs(res["fid"]) < 1e-9 and res["kid_subset_size"] == 4
    # The unbiased MMD^2 of a set against itself is -2 (mean k(x, x) - mean k(x, y)) / m: <= 0 for a PSD kernel.
    assert -0.1 < res["kid_mean"] <= 0 and res["kid_std"] < 1e-12
    assert res["inception_weights"] == "random"
    assert set(res["per_class"]) == set(CLASSES)
    assert all(c["generated"] == c["real"] == 2 and abs(c["fid"]) < 1e-9 for c in res["per_class"].values())
    assert f"FID {res['fid']:.3f}" in r.stdout and not (tmp_path / "res" / "eval.json.tmp").exists()


def test_missing_weights_is_one_line_naming_the_cache_and_the_flag(eval_shards, tmp_path, run_cli):
    gen = write_copies(eval_shards, tmp_path / "gen")
    r = run_cli("eval", gen, eval_shards, "--split", "train", env={"TORCH_HOME": str(tmp_path / "torch")})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    cache = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(cache) in lines[0] and "--inception-weights FILE" in lines[0]
    assert not (gen / "eval.json").exists()


def test_a_weights_file_loads_and_one_that_is_not_the_fid_inception_is_refused(tmp_path):
    saved = load_inception("random").state_dict()  # the real file is a download; this one has its keys
    torch.save(saved, tmp_path / "inception.pth")
    loaded = load_inception(str(tmp_path / "inception.pth")).state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with pytest.raises(UserError, match="no such file"):
        load_inception(str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="is not torch-fidelity's weights-inception"):
        load_inception(str(tmp_path / "other.pth"))
    torch.save({}, tmp_path / "empty.pth")  # an empty dict must not pass for a random network
    with pytest.raises(UserError, match="is not torch-fidelity's"):
        load_inception(str(tmp_path / "empty.pth"))


def test_an_empty_or_image_free_folder_is_a_clear_error(eval_shards, tmp_path, make_image):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no readable images"):
        fid_kid(empty, eval_shards, split="train", inception_weights="random")
    (empty / "a.png").write_bytes(b"\x89PNG truncated")
    (empty / "readme.md").write_text("ignored")
    with pytest.raises(UserError, match="holds no readable images .*; skipped 1 files, e.g. a.png: not an image"):
        fid_kid(empty, eval_shards, split="train", inception_weights="random")
    with pytest.raises(UserError, match="is not a folder"):
        fid_kid(tmp_path / "nope", eval_shards, split="train")
    make_image(empty / "b.png", (16, 16), seed=0)
    with pytest.raises(UserError, match="no val samples: use --split train"):
        fid_kid(empty, eval_shards, inception_weights="random")
