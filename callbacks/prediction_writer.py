"""`ditfuse predict` callbacks: `FusedImageWriter` (PNGs at each pair's source size, never
overwritten) and `UseEMAWeights` (predict with the EMA weights of `ckpt_path`).

Every rank writes the batches it predicted (datamodules/pairs.py shards pairs so that each is
predicted by exactly one rank), so each output is written once, with no gather.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from callbacks.ema import CHECKPOINT_KEY
from ditfuse.interop.pairs import restore
from ditfuse.pipeline import apply_ema


class FusedImageWriter(BasePredictionWriter):
    """Write `output_dir/<key>.png` (image 1's original size) for every predicted pair.

    Args:
        output_dir: folder for the outputs (created).
        overwrite: replace existing files; when False (default) an existing output stops the run
            before any sampling (the DataModule's `output_names()` are checked) or at write time.
    """

    def __init__(self, output_dir: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir, self.overwrite = Path(output_dir), overwrite
        self.written: list[Path] = []

    def _path(self, key: str) -> Path:
        return self.output_dir / f"{key}.png"

    def _refuse(self, path: Path) -> FileExistsError:
        return FileExistsError(f"{path} already exists; set the writer's overwrite: true or choose another "
                               "output_dir")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = []
        names = getattr(trainer.datamodule, "output_names", None)
        if self.overwrite or names is None:
            return
        existing = [self._path(k) for k in names() if self._path(k).exists()]
        if existing:
            raise self._refuse(existing[0])

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Tensor,
                           batch_indices: Any, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(batch["key"]):
            rgb = restore(prediction[i], batch["content_hw"][i], batch["original_hw"][i])
            _, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
            path = self._path(key)
            try:
                with open(path, "wb" if self.overwrite else "xb") as f:
                    f.write(buf.tobytes())
            except FileExistsError:
                raise self._refuse(path) from None
            self.written.append(path)


class UseEMAWeights(pl.Callback):
    """Swap in the EMA weights (callbacks/ema.py) of the checkpoint given as `ckpt_path` before
    predicting; without a checkpoint, or one without EMA state, the loaded weights stay."""

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=False)  # the user's own checkpoint
        if ckpt.get(CHECKPOINT_KEY):
            n = apply_ema(pl_module, ckpt)
            rank_zero_info(f"predicting with the EMA weights of {trainer.ckpt_path} ({n} tensors)")
