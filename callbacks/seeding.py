"""Per-rank, per-step seeding of torch's global RNG for the training step.

`seed_everything(s)` gives every DDP rank the same seed, so whatever `training_step` draws from
torch's global generator (flow matching's noise x0 and time t, the condition dropout) is the same
on every rank: different images, identical noise, a smaller effective batch of noise draws.
And Lightning checkpoints do not hold the generator state, so a resumed run draws other noise
than the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import lightning.pytorch as pl
import torch


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """A stable 63-bit seed for one training batch of one rank."""
    digest = hashlib.blake2b(f"{seed}/rank{rank}/step{step}/batch{batch_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RankSeed(pl.Callback):
    """Reseed torch (CPU and CUDA) from (seed, global rank, global step, batch index) before
    every training batch: draws differ across ranks, and a resumed run draws at step k exactly
    what the uninterrupted run drew at step k.

    `seed`: the base seed; None takes the run's `seed_everything` value (0 when unset).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.base_seed(), trainer.global_rank, trainer.global_step, batch_idx))
