"""No-reference IQA (CLIPIQA, MANIQA through pyiqa) of the sampled outputs, per task."""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor

from callbacks._common import check_every, first_keys, is_due, log_global_means, sampled_outputs, task_indices
from ditfuse.eval.iqa import build_iqa_metrics
from ditfuse.module import GlobalMeans

TASKS = ("ivif", "mff", "mef", "m3", "seg", "control")


class IQAMetrics(pl.Callback):
    """Log `val/<task>/<metric>` for CLIPIQA/MANIQA on the `max_images` outputs per task with the
    smallest sample keys over all ranks (the same images whatever the world size and batch size;
    each rank scores those it sampled, the means are merged over ranks by sample id, so a sample
    on two ranks (a batch the distributed sampler repeats) counts once).

    Weights come only from local files: `weights_dir` (laid out like pyiqa's torch-hub cache) or
    explicit `files`. They are resolved in `setup()`, before any training step: a missing file
    fails at once with one line naming it, or, with `required: false`, warns once and drops that
    metric. Nothing is downloaded. On CPU a 512 px image costs seconds (MANIQA with 20 crops, a
    minute): keep `max_images` small there; `maniqa_crops` trades accuracy for time.
    """

    def __init__(self, weights_dir: str | None = None, files: dict[str, str] | None = None,
                 metrics: Sequence[str] = ("clipiqa", "maniqa"), required: bool = True,
                 every_n_epochs: int = 1, max_images: int = 16, maniqa_crops: int | None = None) -> None:
        self.every_n_epochs = check_every(every_n_epochs)
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.weights_dir, self.files = weights_dir, files
        self.names, self.required = tuple(metrics), required
        self.max_images, self.maniqa_crops = max_images, maniqa_crops
        self._scorers: dict[str, Any] = {}
        self._means = GlobalMeans([])
        self._kept: dict[str, dict[str, Tensor]] = {}  # task -> key -> output (this rank's first keys)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._scorers:
            return
        self._scorers = build_iqa_metrics(weights_dir=self.weights_dir, files=self.files, names=self.names,
                                          required=self.required, device=str(pl_module.device),
                                          maniqa_crops=self.maniqa_crops)
        self._means = GlobalMeans([f"val/{t}/{n}" for t in TASKS for n in self._scorers])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._kept = {}
        self._means.reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep this rank's `max_images` smallest-key outputs per task (scored at epoch end)."""
        if not self._scorers or not is_due(trainer, self.every_n_epochs):
            return
        out = sampled_outputs(pl_module, batch, outputs)
        for task, rows in task_indices(batch).items():
            kept = self._kept.setdefault(task, {})
            for i in rows.tolist():
                kept[str(batch["key"][i])] = out[i].detach()
            for key in sorted(kept)[self.max_images:]:
                del kept[key]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._scorers or not is_due(trainer, self.every_n_epochs):
            return
        # the same images for any world size / batch size: the first max_images keys of each task
        chosen = first_keys({t: list(kept) for t, kept in self._kept.items()}, self.max_images)
        for task, kept in self._kept.items():
            keys = [k for k in sorted(kept) if k in chosen[task]]
            if not keys:
                continue
            images = (torch.stack([kept[k] for k in keys]).float().clamp(-1, 1) + 1) / 2
            for name, scorer in self._scorers.items():
                # by sample id: a key a repeated batch put on two ranks counts once
                self._means.add(f"val/{task}/{name}", _as_tensor(scorer(images)), [f"{task}/{k}" for k in keys])
        self._kept = {}
        log_global_means(pl_module, self._means)


def _as_tensor(x: Any) -> Tensor:
    return x.flatten().float()
