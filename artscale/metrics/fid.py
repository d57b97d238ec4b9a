"""`artscale eval GENERATED_DIR SHARDS`: FID and KID of generated images against a split of the shards.

Features are the standard FID network's: torch-fidelity's port of the TensorFlow Inception-v3
graph that FID was defined on (2048-d pool features, inputs resized to 299 px with TF1's
bilinear resize), so the figures compare with published ones at equal sample counts. Features
are computed once per image; the overall and the per-class figures all come from them.
"""

from __future__ import annotations

import io
import itertools
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_fidelity import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, FeatureExtractorInceptionV3
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_kid import kid_features_to_metric

from artscale import __version__
from artscale.core.atomic import write_json_atomic
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.data.images import SkipImage, load_image
from artscale.data.listing import list_inputs
from artscale.data.loader import SkipCounter, data_spec, shard_images
from artscale.data.manifest import read_manifest
from artscale.data.store import is_url
from artscale.models.state_dict import read_state_dict

log = logging.getLogger(__name__)

INCEPTION_FILE = Path(URL_INCEPTION_V3).name  # weights-inception-2015-12-05-6726825d.pth
RANDOM_INCEPTION_WARNING = (
    "--inception-weights random: FID and KID use an UNTRAINED Inception-v3 (for tests only, the figures mean nothing)"
)
FEW_SAMPLES = 2048  # below the feature dimension the covariance is rank-deficient and FID is biased upward
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's and torchmetrics' defaults


def inception_cache() -> Path:
    """Where torch-fidelity downloads its Inception weights: torch's hub cache ($TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class _Inception(FeatureExtractorInceptionV3):
    """torch-fidelity's FID Inception-v3, 2048-d features only.

    Its constructor loads weights itself: a download, or `torch.load` of a path without
    weights_only. It gets an empty dict here (skipped below); the real weights are read with
    weights_only by `load_inception` and loaded after."""

    def __init__(self) -> None:
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)

    def load_state_dict(self, state_dict, *args, **kwargs):
        if not state_dict:  # the constructor's empty dict; load_inception loads the weights
            return nn.modules.module._IncompatibleKeys([], [])
        return super().load_state_dict(state_dict, *args, **kwargs)


def inception_path(weights: str | None = None) -> Path:
    """Where the weights are looked for: the file given, else torch-fidelity's file in torch's hub cache.
    (`artscale eval` and training's eval_every find them alike; this does not check the file exists.)"""
    return inception_cache() if weights is None else Path(weights).expanduser()


def load_inception(weights: str | None = None, random_warning: str = RANDOM_INCEPTION_WARNING) -> nn.Module:
    """The FID feature extractor. `weights`: None (torch-fidelity's file in torch's hub cache),
    a path to that file, or `random` (tests only; logs `random_warning`)."""
    net = _Inception()
    if weights == "random":
        log.warning(random_warning)
        # PyTorch's default init shrinks activations to ~1e-8 by the pool layer (every FID would
        # read 0); He init keeps them near unit scale, so a test's shift shows in the features.
        gen = torch.Generator().manual_seed(0)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
        return net
    path = inception_path(weights)
    if weights is None:
        if not path.is_file():
            raise UserError(
                f"FID needs torch-fidelity's Inception-v3 weights: download {URL_INCEPTION_V3} to {path}, "
                "or pass --inception-weights FILE"
            )
    else:
        if not path.is_file():
            raise UserError(f"--inception-weights {weights}: no such file (torch-fidelity's {INCEPTION_FILE})")
    state = read_state_dict(path, "Inception-v3 weights")
    try:
        nn.Module.load_state_dict(net, state)  # strict; not the override above, which skips an empty dict
    except RuntimeError as e:
        raise UserError(f"{path} is not torch-fidelity's {INCEPTION_FILE}: {str(e).splitlines()[0][:200]}") from None
    return net


def _cov_factor(x: torch.Tensor) -> torch.Tensor:
    """R with R @ R.T = cov(x): the centred samples (d x n) when there are fewer samples than
    dimensions, else the symmetric square root of the d x d covariance."""
    centred = (x - x.mean(0)) / (len(x) - 1) ** 0.5
    if len(x) <= x.shape[1]:
        return centred.T
    w, v = torch.linalg.eigh(centred.T @ centred)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (rows are samples), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2).

    With S = R R^T, tr((S_a S_b)^1/2) is the sum of the singular values of R_a^T R_b: exact, and
    symmetric (no square roots of rounding noise). torch-fidelity and torchmetrics take the
    eigenvalues of the non-symmetric 2048 x 2048 product instead, whatever the sample count:
    3-60 s per FID on 2 busy CPU cores, and about 1e-6 for a set against itself. Here a FID
    over fewer images than dimensions (a per-class figure) takes well under a second."""
    a, b = a.double().cpu(), b.double().cpu()
    ra, rb = _cov_factor(a), _cov_factor(b)
    diff = a.mean(0) - b.mean(0)
    cross = torch.linalg.svdvals(ra.T @ rb).sum()
    return float(diff @ diff + ra.square().sum() + rb.square().sum() - 2 * cross)


def kernel_distance(
    a: torch.Tensor, b: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE
) -> dict:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets
    (of at most the smaller set's size), drawn from a fixed seed."""
    size = min(subset_size, len(a), len(b))
    kid = kid_features_to_metric(
        a.double().cpu(), b.double().cpu(), kid_subsets=subsets, kid_subset_size=size, rng_seed=KID_SEED, verbose=False
    )
    return {"kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD], "kid_subset_size": size}


@torch.inference_mode()
def extract_features(
    net: nn.Module,
    images: Iterable[tuple[np.ndarray, int]],
    batch_size: int = 32,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Features of (uint8 HWC image, label) pairs, and their labels in the same order as the rows.
    Images of one size are batched together (the network resizes each batch to 299 px). `device`:
    the current CUDA device if there is one, else the CPU, unless given (a training rank's own)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(
        device, memory_format=torch.channels_last
    ).eval()  # channels_last: the faster layout for its convolutions on CPU
    feats, labels = [], []
    groups: dict[tuple, list] = {}

    def run(group: list) -> None:
        x = torch.from_numpy(np.stack([im for im, _ in group])).permute(0, 3, 1, 2).to(device)
        feats.append(net(x.contiguous(memory_format=torch.channels_last))[0].double().cpu())
        labels.extend(label for _, label in group)
        if progress is not None:
            progress.update(len(group))

    for im, label in images:
        group = groups.setdefault(im.shape, [])
        group.append((im, label))
        if len(group) == batch_size:
            run(groups.pop(im.shape))
    for group in groups.values():
        run(group)
    return (torch.cat(feats) if feats else torch.zeros(0, 2048, dtype=torch.float64)), labels


@dataclass
class FolderScan:
    """What walking GENERATED_DIR found besides the images: unreadable files, junk, image sizes."""

    skipped: list[dict] = field(default_factory=list)
    ignored: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> images


def generated_images(root: Path, classes: list[str], scan: FolderScan) -> Iterator[tuple[np.ndarray, int]]:
    """Every readable image under root, with its class index (its top folder named as a manifest
    class) or -1; what cannot be read goes to `scan.skipped`, hidden files and junk to `scan.ignored`."""
    index = {name: i for i, name in enumerate(classes)}
    for entry in list_inputs(root, ".png"):
        if entry.ignored:
            scan.ignored += 1
            continue
        if entry.reason:
            scan.skipped.append({"path": entry.rel, "reason": entry.reason})
            continue
        try:
            im, _ = load_image(root / entry.rel)
        except SkipImage as e:
            scan.skipped.append({"path": entry.rel, "reason": str(e)})
            continue
        size = f"{im.width}x{im.height}"
        scan.sizes[size] = scan.sizes.get(size, 0) + 1
        top = entry.rel.split("/")[0] if "/" in entry.rel else ""
        yield np.asarray(im, dtype=np.uint8), index.get(top, -1)


def distances(
    real: torch.Tensor,
    fake: torch.Tensor,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    fid_min: int = 2,
) -> dict:
    """FID and KID of two feature sets. Both None (with a note) below 2 images on a side; FID None
    below `fid_min` images on a side (training's eval asks FEW_SAMPLES: it is biased upward below)."""
    if min(len(real), len(fake)) < 2:
        return {"fid": None, "kid_mean": None, "kid_std": None, "note": "fewer than 2 images on a side"}
    fid = frechet_distance(real, fake) if min(len(real), len(fake)) >= fid_min else None
    return {"fid": fid, **kernel_distance(real, fake, kid_subsets, kid_subset_size)}


def class_distances(
    real: torch.Tensor,
    real_labels: list[int],
    fake: torch.Tensor,
    fake_labels: list[int],
    classes: list[str],
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    fid_min: int = 2,
) -> dict[str, dict]:
    """`distances` per class, for the classes that have generated images, from the same features."""
    real_lab, fake_lab = torch.tensor(real_labels, dtype=torch.long), torch.tensor(fake_labels, dtype=torch.long)
    out = {}
    for i, name in enumerate(classes):
        n_fake = int((fake_lab == i).sum())
        if n_fake:
            r, f = real[real_lab == i], fake[fake_lab == i]
            out[name] = {"generated": n_fake, "real": len(r), **distances(r, f, kid_subsets, kid_subset_size, fid_min)}
    return out


def fid_kid(
    generated: Path,
    shards: str | Path,
    *,
    split: str = "val",
    out: Path | None = None,
    inception_weights: str | None = None,
    batch_size: int = 32,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
) -> dict:
    """FID and KID of the images under `generated` against `split` of `shards`; writes and returns the result."""
    started = time.perf_counter()
    generated, shards = Path(generated), shards if is_url(shards) else Path(shards)
    if not generated.is_dir():
        raise UserError(f"GENERATED_DIR {generated} is not a folder")
    if batch_size < 1 or kid_subsets < 1 or kid_subset_size < 2:
        raise UserError("--batch-size and --kid-subsets must be >= 1, --kid-subset-size >= 2")
    manifest = read_manifest(shards)
    spec = data_spec(str(shards), manifest["image_size"])
    urls = spec.val_urls if split == "val" else spec.train_urls
    if not urls:
        raise UserError(f"{shards} has no {split} samples: use --split train, or pack with a larger --val-fraction")
    classes = manifest["classes"]
    out = Path(out) if out is not None else generated / "eval.json"

    # The generated side first: a folder without images fails before the network is loaded.
    scan = FolderScan()
    skipped = scan.skipped
    gen_iter = generated_images(generated, classes, scan)
    first = next(gen_iter, None)
    if first is None:
        why = f"; skipped {len(skipped)} files, e.g. {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise UserError(f"GENERATED_DIR {generated} holds no readable images (png, jpg, webp...){why}")
    net = load_inception(inception_weights)

    counter = SkipCounter()
    total = spec.val_count if split == "val" else spec.train_count
    bar = Progress(total, f"eval: {split} features")
    real, real_labels = extract_features(net, shard_images(urls, counter), batch_size, bar)
    bar.close()
    bar = Progress(None, "eval: generated features")
    fake, fake_labels = extract_features(net, itertools.chain([first], gen_iter), batch_size, bar)
    bar.close()
    if skipped:
        print(
            f"artscale: skipped {len(skipped)} unreadable files in {generated}, e.g. "
            f"{skipped[0]['path']}: {skipped[0]['reason']}",
            file=sys.stderr,
        )
    size = manifest["image_size"]
    if set(scan.sizes) != {f"{size}x{size}"}:
        print(
            f"artscale: warning: generated images are {', '.join(sorted(scan.sizes))}, the shards' are {size}x{size}: "
            "FID and KID measure that difference too (sample at the shards' size)",
            file=sys.stderr,
        )
    if len(fake) < 2 or len(real) < 2:
        raise UserError(f"FID needs at least 2 images on each side: {len(fake)} generated, {len(real)} {split}")

    result = {
        **distances(real, fake, kid_subsets, kid_subset_size),
        "kid_subsets": kid_subsets,
        "generated": {
            "dir": str(generated),
            "images": len(fake),
            "skipped": len(skipped),
            "ignored": scan.ignored,
            "sizes": scan.sizes,
            "skipped_files": skipped,
        },
        "real": {"shards": str(shards), "split": split, "images": len(real), "skipped": counter.count},
        "features": "Inception-v3 (torch-fidelity inception-v3-compat), 2048-d pool3, 299 px",
        "inception_weights": "random" if inception_weights == "random" else str(inception_weights or inception_cache()),
        # only the classes that GENERATED_DIR has a folder for
        "per_class": class_distances(real, real_labels, fake, fake_labels, classes, kid_subsets, kid_subset_size),
        "artscale_version": __version__,
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result, sort_keys=False)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    _report(result, out)
    return result


def _fmt(m: dict) -> str:
    if m["fid"] is None:
        return m["note"]
    return f"FID {m['fid']:.3f}, KID {m['kid_mean']:.5f} +- {m['kid_std']:.5f} (subsets of {m['kid_subset_size']})"


def _report(r: dict, out: Path) -> None:
    g, real = r["generated"], r["real"]
    print(
        f"{_fmt(r)}: {g['images']} generated images (skipped {g['skipped']}) vs {real['images']} "
        f"{real['split']} images of {real['shards']}"
    )
    for name, m in r["per_class"].items():
        print(f"  {name}: {_fmt(m)}: {m['generated']} generated vs {m['real']} {real['split']}")
    if min(g["images"], real["images"]) < FEW_SAMPLES:
        print(
            f"artscale: note: FID from fewer than {FEW_SAMPLES} images is biased upward; compare runs only at equal "
            "image counts (KID is unbiased)",
            file=sys.stderr,
        )
    print(f"wrote {out} ({r['seconds']} s)")
