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


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A stable 63-bit seed for one training batch (micro-batch `micro` of optimizer step
    `step`) of one rank."""
    digest = hashlib.blake2b(f"{seed}/rank{rank}/step{step}/micro{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RankSeed(pl.Callback):
    """Reseed torch (CPU and CUDA) from (seed, global rank, global step, micro-batch) before
    every training batch: draws differ across ranks, and a resumed run draws at step k exactly
    what the uninterrupted run drew at step k.

    The micro-batch index counts the batches seen at the current global step (0 without gradient
    accumulation), not Lightning's batch_idx: after a checkpoint written mid-batch (SLURM's
    SIGUSR1 handler) the resumed run's batch_idx is one ahead of the interrupted run's.

    `seed`: the base seed; None takes the run's `seed_everything` value (0 when unset).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._step, self._micro = -1, 0

    def base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        self._micro = self._micro + 1 if step == self._step else 0
        self._step = step
        torch.manual_seed(step_seed(self.base_seed(), trainer.global_rank, step, self._micro))
