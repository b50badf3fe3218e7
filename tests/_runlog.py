"""A test-only callback for `ditfuse fit` subprocesses: one JSON line per training batch per rank.

Used by test_ddp.py and test_preemption.py through `--trainer.callbacks+=`; the subprocess
finds it through PYTHONPATH=tests/.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class RunLog(pl.Callback):
    """Appends {rank, world, step, batch_idx, keys, kinds, loss, rng, t, pid} to
    `<out>/rank<r>.jsonl` after every training batch, and a `train_start` line (with the step
    training starts from), a `val_batch` line per validation batch and a `val_end` line, and an
    `exception` line (type, step) when fit stops on one."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self._rng = ""

    def _write(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "world": trainer.world_size, "pid": os.getpid(),
                                "t": time.time(), **record}) + "\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, {"event": "train_start", "step": trainer.global_step,
                              "ckpt_path": str(trainer.ckpt_path)})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # fingerprint of torch's global RNG as training_step will find it (nothing is drawn)
        self._rng = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=6).hexdigest()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: dict[str, Any], batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(trainer, {"event": "batch", "step": trainer.global_step, "batch_idx": batch_idx,
                              "keys": list(batch.get("key", [])), "kinds": list(batch.get("kind", [])),
                              "loss": float(torch.as_tensor(loss).detach()), "rng": self._rng})

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._write(trainer, {"event": "val_batch", "step": trainer.global_step, "batch_idx": batch_idx})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, {"event": "val_end", "step": trainer.global_step})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._write(trainer, {"event": "exception", "step": trainer.global_step, "type": type(exception).__name__})


def read_runlog(out: Path, rank: int = 0) -> list[dict[str, Any]]:
    path = Path(out) / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]
