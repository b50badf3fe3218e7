"""Helpers shared by the validation callbacks: one sampling per batch, grouping by task."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ditfuse.module import GlobalMeans

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


def sample_ids(batch: dict[str, Any]) -> list[str]:
    """A validation sample's id, `task/key` (as DiTFuseModule.validation_step names it): the same
    on every rank, so per-sample values merge over ranks without counting a repeat twice."""
    return [f"{t}/{k}" for t, k in zip(batch["task"], batch["key"], strict=True)]


def log_global_means(pl_module: pl.LightningModule, means: GlobalMeans) -> None:
    """Log each mean over the distinct samples of all ranks (a collective: every rank calls it).
    The values are already global and equal on every rank, so no further sync."""
    for name, value in means.reduce().items():
        pl_module.log(name, value, sync_dist=False)


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
