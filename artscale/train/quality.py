"""This module measures sample quality while training (`eval_every`): KID, and FID where counts allow.

What the model makes is compared with the val split, overall and per class, with `artscale eval`'s
features and arithmetic (artscale/metrics/fid.py: torch-fidelity's Inception-v3, the same KID and FID).

- diffusion: the EMA model draws `eval_samples` images per class with the run's sampler, steps and
  guidance, from noise drawn from (seed, "eval/i"): the same noise at every eval, so the curve
  follows the model, not the draw.
- reconstruct (the article's): the model's outputs of the val images against the val images (the
  reconstruction KID/FID autoencoders report; `eval_samples` is unused).

FID is logged only when both sides have FEW_SAMPLES (2048) images or more: below the feature
dimension the covariance is rank-deficient and FID reads high by an amount that depends on the
count. KID is unbiased at any count. Work is split across ranks (image i on rank i % world), the
features are gathered and the figures computed on the main process. Every rank enters at the
same step and runs the same number of batches; before each batch the ranks agree whether a stop
was asked for, and a stop abandons the eval so that the loop goes on to its checkpoint. The val
split's features are computed once per run, kept in memory and in run_dir/eval/ under a key of
the manifest and the weights (a resumed run reads them back). metrics/fid.py, and torch-fidelity with it,
is imported only when eval_every > 0: a run without eval does not pay for the import.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artscale.core.atomic import write_atomic
from artscale.core.errors import UserError
from artscale.core.progress import Progress
from artscale.data.loader import DataSpec, SkipCounter, shard_images
from artscale.data.manifest import MANIFEST
from artscale.data.store import join, read_bytes
from artscale.diffusion.noise import noise_for
from artscale.diffusion.sampling import sample, to_uint8, torch_predict
from artscale.diffusion.schedulers import make_sampler
from artscale.models.article import normalize
from artscale.train.config import TrainConfig

RANDOM_EVAL_WARNING = (
    "eval_inception=random: KID and FID during training use an UNTRAINED Inception-v3 "
    "(for tests only, the figures mean nothing)"
)
FEATURES_DIR = "eval"


def gather_rows(acc: Any, x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (counts may differ), in rank order, on the CPU of every rank."""
    if acc.num_processes == 1:
        return x.cpu()
    from accelerate.utils import gather, pad_across_processes

    counts = gather(torch.tensor([len(x)], device=acc.device)).tolist()
    padded = pad_across_processes(x.to(acc.device), dim=0)
    rows = gather(padded).cpu()
    size = padded.shape[0]
    return torch.cat([rows[r * size : r * size + n] for r, n in enumerate(counts)])


class Evals:
    """`maybe(step, model)` every `eval_every` steps and at the last: the figures go to `log`
    (metrics.jsonl and the trackers) as eval/kid, eval/kid_std, eval/fid and eval/kid/<class>..."""

    def __init__(
        self,
        acc: Any,
        spec: DataSpec,
        cfg: TrainConfig,
        objective: Any,
        last_step: int,
        log: Callable[[int, dict[str, float]], None],
        stop: Callable[[], str],
    ) -> None:
        self.acc, self.spec, self.cfg, self.objective = acc, spec, cfg, objective
        self.last_step, self.log, self.stop = last_step, log, stop
        self.every, self.net = cfg.eval_every, None
        self.real: tuple[torch.Tensor, torch.Tensor] | None = None  # val features and labels, main process
        self.real_ready = False  # on every rank: the main process has them
        self.diffusion = cfg.objective in ("diffusion", "distill")
        if not self.every:
            return
        if (spec.val_count or 0) < 2:
            raise UserError(
                f"eval_every={self.every} compares with the val split, and data={cfg.data} has "
                f"{spec.val_count or 'no'} val images (KID needs 2): pack with a larger --val-fraction, or set eval_every=0"
            )
        from artscale.metrics.fid import INCEPTION_FILE, inception_path, load_inception

        weights = cfg.eval_inception or None
        path = inception_path(weights)
        have = weights == "random" or path.is_file()
        if acc.num_processes > 1:  # every rank extracts features: all have the weights, or none evaluates
            have = acc.reduce(torch.tensor([float(have)], device=acc.device), "sum").item() == acc.num_processes
        if not have:
            if weights:
                where = " on every process" if acc.num_processes > 1 else ""
                raise UserError(f"eval_inception={weights}: no such file{where} (torch-fidelity's {INCEPTION_FILE})")
            acc.print(
                f"eval_every={self.every}: no Inception-v3 weights at {path} (docs/install.md, offline weights; "
                "or set eval_inception=FILE): no KID/FID in this run"
            )
            self.every = 0
            return
        self.net = load_inception(weights, RANDOM_EVAL_WARNING)
        self.key = self._features_key(weights, path)
        acc.print(self._describe())

    def _describe(self) -> str:
        from artscale.metrics.fid import FEW_SAMPLES

        n, real = self._count(), self.spec.val_count or 0
        fid = "KID and FID" if min(n, real) >= FEW_SAMPLES else f"KID (FID from {FEW_SAMPLES} images a side)"
        if self.diffusion:
            what = (
                f"{n} images ({self.cfg.eval_samples} per class, {self.objective.sampler} {self.objective.sample_steps} "
                f"steps, guidance {self.cfg.guidance:g})"
            )
        else:
            what = f"the model's outputs of the {n} val images"
        return f"eval every {self.every} steps: {what} vs the {real} val images, {fid}, overall and per class"

    def _count(self) -> int:
        return self.cfg.eval_samples * len(self.spec.classes) if self.diffusion else self.spec.val_count or 0

    def _features_key(self, weights: str | None, path: Path) -> str:
        h = hashlib.sha256(read_bytes(join(self.cfg.data, MANIFEST)))  # a path or a URL
        h.update(b"random" if weights == "random" else f"{path.name}:{path.stat().st_size}".encode())
        return h.hexdigest()[:16]

    def maybe(self, step: int, model: Callable[[], torch.nn.Module]) -> None:
        """At eval steps (every rank, the same steps): evaluate `model()`, the EMA weights where there are some."""
        if not self.every or (step % self.every and step != self.last_step):
            return
        started = time.perf_counter()
        net = model()
        was_training = net.training
        net.eval()
        try:
            fake = self._fake_features(net) if self._real_features() else None
        finally:
            net.train(was_training)
        if fake is None:
            self.acc.print(f"eval at step {step}: abandoned (a stop was asked for)")
            return
        if self.acc.is_main_process:
            metrics = self._metrics(*fake, started)
            self.log(step, metrics)
            fid = f", FID {metrics['eval/fid']:.3f}" if "eval/fid" in metrics else ""
            print(
                f"eval at step {step}: KID {metrics['eval/kid']:.5f} +- {metrics['eval/kid_std']:.5f}{fid} "
                f"({len(fake[0])} images vs {len(self.real[0])} val; {metrics['eval/seconds']:.0f} s)",
                flush=True,
            )

    def _metrics(self, fake: torch.Tensor, fake_labels: torch.Tensor, started: float) -> dict[str, float]:
        from artscale.metrics.fid import FEW_SAMPLES, class_distances, distances

        real, real_labels = self.real
        overall = distances(real, fake, fid_min=FEW_SAMPLES)
        metrics = {"eval/kid": overall["kid_mean"], "eval/kid_std": overall["kid_std"], "eval/fid": overall["fid"]}
        per_class = class_distances(
            real, real_labels.tolist(), fake, fake_labels.tolist(), self.spec.classes, fid_min=FEW_SAMPLES
        )
        for name, m in per_class.items():  # a class with fewer than 2 val images has no figure
            metrics[f"eval/kid/{name}"], metrics[f"eval/fid/{name}"] = m["kid_mean"], m["fid"]
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        metrics.update({"eval/images": len(fake), "eval/real_images": len(real)})
        metrics["eval/seconds"] = time.perf_counter() - started
        return metrics

    def _features_file(self) -> Path:
        return Path(self.cfg.run_dir) / FEATURES_DIR / f"val-features-{self.key}.safetensors"

    def _real_features(self) -> bool:
        """The val split's features on the main process: from memory, from run_dir/eval/, or computed
        (every rank its part). False when a stop abandoned them."""
        if self.real_ready:
            return True
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save

        path = self._features_file()
        if self.acc.is_main_process and path.is_file():
            try:
                saved = load_file(str(path))
                self.real = saved["features"].double(), saved["labels"]
            except (OSError, SafetensorError, KeyError) as e:  # a torn or foreign file: computed again
                self.acc.print(f"eval: {path} unreadable ({e}); computing the val features again")
        cached = [self.real is not None]
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(cached)
        if not cached[0]:
            found = self._pass(self._val_batches(), self._val_batch_count(), "eval: val features")
            if found is None:
                return False
            if self.acc.is_main_process:
                self.real = found
                write_atomic(
                    path,
                    save({"features": found[0].float().contiguous(), "labels": found[1]}),
                    root=self.cfg.run_dir,  # eval/ made inside the run dir, never through a link
                )
        self.real_ready = True
        return True

    def _fake_features(self, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.diffusion:
            per_rank = math.ceil(self._count() / self.acc.num_processes)
            return self._pass(self._drawn(net), math.ceil(per_rank / self.cfg.batch_size), "eval: samples")
        return self._pass(self._reconstructed(net), self._val_batch_count(), "eval: outputs")

    def _val_batch_count(self) -> int:
        """Batches of this pass over the val split: the same on every rank (the largest share's)."""
        return math.ceil(math.ceil((self.spec.val_count or 0) / self.acc.num_processes) / self.cfg.batch_size)

    def _stopping(self) -> bool:
        """Whether some rank was asked to stop (every rank asks at the same batch)."""
        asked = bool(self.stop())
        if self.acc.num_processes > 1:
            asked = self.acc.reduce(torch.tensor([float(asked)], device=self.acc.device), "sum").item() > 0
        return asked

    def _pass(
        self, batches: Iterator[tuple[np.ndarray, list[int]]], count: int, desc: str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Features and labels of `count` batches (uint8 NHWC, labels) on every rank, gathered; None on a stop.
        A rank whose batches run out (skipped samples) takes part with empty ones."""
        from artscale.metrics.fid import extract_features

        acc = self.acc
        feats, labels = [], []
        with Progress(count, desc, unit="batch", enabled=acc.is_main_process) as bar:
            for _ in range(count):
                if self._stopping():
                    return None
                images, batch_labels = next(batches, (None, []))
                if batch_labels:
                    f, _ = extract_features(self.net, zip(images, batch_labels), len(batch_labels), device=acc.device)
                    feats.append(f)
                    labels.extend(batch_labels)
                bar.update(1)
        features = torch.cat(feats) if feats else torch.zeros((0, 2048), dtype=torch.float64)
        return gather_rows(acc, features), gather_rows(acc, torch.tensor(labels, dtype=torch.long))

    def _val_batches(self) -> Iterator[tuple[np.ndarray, list[int]]]:
        """This rank's part of the val split (samples rank, rank + world, ...) in batches."""
        images = shard_images(
            self.spec.val_urls, SkipCounter(), rank=self.acc.process_index, world=self.acc.num_processes
        )
        while group := list(itertools.islice(images, self.cfg.batch_size)):
            yield np.stack([im for im, _ in group]), [label for _, label in group]

    def _drawn(self, net: torch.nn.Module) -> Iterator[tuple[np.ndarray, list[int]]]:
        """This rank's samples (image i of class i // eval_samples, noise from (seed, "eval/i")) in batches."""
        cfg, obj, device = self.cfg, self.objective, self.acc.device
        mine = range(self.acc.process_index, self._count(), self.acc.num_processes)
        size = self.spec.image_size
        for i in range(0, len(mine), cfg.batch_size):
            keys = mine[i : i + cfg.batch_size]
            labels = [k // cfg.eval_samples for k in keys]
            noise = noise_for(cfg.seed, [f"eval/{k}" for k in keys], (3, size, size)).to(device)
            x = sample(
                torch_predict(net),
                make_sampler(obj.sampler, obj.scheduler.config),
                noise,
                torch.tensor(labels, device=device),
                obj.null_label,
                steps=obj.sample_steps,
                guidance=obj.guidance,  # a student's is baked in: 1, one pass per step
            )
            yield to_uint8(x), labels

    def _reconstructed(self, net: torch.nn.Module) -> Iterator[tuple[np.ndarray, list[int]]]:
        """The model's outputs of this rank's part of the val split, in batches."""
        for images, labels in self._val_batches():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.acc.device).float().div(255)
            with torch.no_grad(), self.acc.autocast():
                out = net(normalize(x)).float().clamp(0, 1)
            yield out.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy(), labels
