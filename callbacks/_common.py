"""Helpers shared by the validation callbacks: one sampling per batch, grouping by task."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

_OUTPUT_KEY = "_sampled_output"


def sampled_outputs(pl_module: pl.LightningModule, batch: dict[str, Any], outputs: Any) -> Tensor:
    """The model's sampled images for a validation batch, (B, 3, H, W) in [-1, 1].

    `DiTFuseModule.validation_step` returns `{"output": ...}`; every callback reads that, so the
    (expensive) sampler runs once per batch however many callbacks look at it. A module that
    returns nothing is sampled here once and the result cached on the batch dict, which Lightning
    hands to every callback.
    """
    if isinstance(outputs, dict) and outputs.get("output") is not None:
        return outputs["output"]
    if _OUTPUT_KEY not in batch:
        with torch.no_grad():
            batch[_OUTPUT_KEY] = pl_module.sample(batch)
    return batch[_OUTPUT_KEY]


def task_indices(batch: dict[str, Any]) -> dict[str, Tensor]:
    """task -> indices of the batch rows that ask for it (rows keep their batch order)."""
    groups: dict[str, list[int]] = {}
    for i, task in enumerate(batch["task"]):
        groups.setdefault(task, []).append(i)
    return {task: torch.tensor(rows, dtype=torch.long) for task, rows in groups.items()}


def to_255(x: Tensor) -> Tensor:
    """[-1, 1] float -> 0..255 float rounded to integer levels, as 8-bit images on disk are."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Run on every n-th validation epoch, never during the sanity check."""
    return not trainer.sanity_checking and trainer.current_epoch % every_n_epochs == 0


def check_every(every_n_epochs: int) -> int:
    if every_n_epochs < 1:
        raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
    return every_n_epochs


def log_means(pl_module: pl.LightningModule, means: dict[str, MeanMetric]) -> None:
    """Log every mean that some rank updated this epoch.

    Each rank holds the same ordered set of metrics, and which of them to log is agreed on in one
    all-reduce, so the per-metric syncs inside `compute()` run in lockstep on every rank even when
    a rank saw no sample of some task.
    """
    seen = torch.tensor([float(m.update_count > 0) for m in means.values()], device=pl_module.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(seen)
    for (name, mean), any_rank in zip(means.items(), seen.tolist()):
        if any_rank:
            pl_module.log(name, mean.compute(), sync_dist=False)


def first_keys(local: dict[str, list[str]], n: int) -> dict[str, set[str]]:
    """task -> the `n` smallest sample keys over all ranks, given each rank's candidates.

    Choosing validation samples by key (not by rank or batch position) picks the same samples for
    any world size and batch size. Every rank must call this (one all_gather of the keys).
    """
    parts = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, local)
    tasks = sorted({t for part in parts for t in part})
    return {t: set(sorted({k for part in parts for k in part.get(t, [])})[:n]) for t in tasks}
