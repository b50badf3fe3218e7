"""A test-only callback for `ditfuse validate` subprocesses: what each rank logged and drew.

Writes `<out>/rank<r>.json` at the end of validation: the logged metrics (trainer.callback_metrics),
the keys and tasks of the batches this rank validated, and SampleGrid's chosen keys per task (rank 0).
Found by the subprocess through PYTHONPATH=tests/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from callbacks.samples import SampleGrid


class ValRecord(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.batches: list[dict[str, Any]] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.batches.append({"tasks": list(batch["task"]), "keys": [str(k) for k in batch["key"]]})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grids = [cb.logged for cb in trainer.callbacks if isinstance(cb, SampleGrid)]
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "batches": self.batches,
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                  "grids": grids[0] if grids else None}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))
