"""Realized data-mix shares next to the configured ratios, so a sweep can be checked."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

KINDS = ("fusion", "m3", "seg", "control")


class MixMonitor(pl.Callback):
    """Counts `batch["kind"]` over training and logs `data/share/<kind>` and `data/ratio/<kind>`.

    Counts are summed over all DDP ranks before logging and live in the checkpoint, so a resumed
    run keeps its totals.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.counts: Counter[str] = Counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: dict[str, Any], batch_idx: int) -> None:
        self.counts.update(batch["kind"])
        if (trainer.global_step + 1) % self.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    def global_counts(self, device: torch.device) -> dict[str, int]:
        local = torch.tensor([self.counts[k] for k in KINDS], dtype=torch.long, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
        return dict(zip(KINDS, local.tolist()))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = self.global_counts(pl_module.device)
        total = max(sum(counts.values()), 1)
        ratios = _configured_ratios(trainer)
        for kind in KINDS:
            pl_module.log(f"data/share/{kind}", counts[kind] / total, rank_zero_only=True)
            if kind in ratios:
                pl_module.log(f"data/ratio/{kind}", ratios[kind], rank_zero_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = Counter(state_dict.get("counts", {}))


def _configured_ratios(trainer: pl.Trainer) -> dict[str, float]:
    """The DataModule's normalised ratios, when it exposes them (`ratios` attribute)."""
    dm = getattr(trainer, "datamodule", None)
    ratios = getattr(dm, "normalized_ratios", None) or getattr(dm, "ratios", None) or {}
    total = sum(float(v) for v in ratios.values()) or 1.0
    return {k: float(v) / total for k, v in ratios.items()}
