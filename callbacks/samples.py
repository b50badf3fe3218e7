"""TensorBoard sample grids per task: image 1 | image 2 | output | target, with the prompt."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid

from callbacks._common import check_every, is_due, sampled_outputs, task_indices


class SampleGrid(pl.Callback):
    """Every n validation epochs, log `samples/<task>` (rows: image 1 | image 2 | output | target).

    The samples are the first `num_samples` validation samples of each task; the validation set is
    finite and deterministic and the module samples it with fixed seeds, so the same cells compare
    across epochs. The prompts go to `samples/<task>/prompts` as TensorBoard text.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 4, upscale_to: int = 128) -> None:
        self.every_n_epochs = check_every(every_n_epochs)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.upscale_to = upscale_to  # tiny demo images are hard to see at 32 px
        self._rows: dict[str, list[Tensor]] = {}
        self._prompts: dict[str, list[str]] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows, self._prompts = {}, {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not is_due(trainer, self.every_n_epochs) or trainer.global_rank != 0:
            return
        out = sampled_outputs(pl_module, batch, outputs)
        for task, rows in task_indices(batch).items():
            have = self._rows.setdefault(task, [])
            for i in rows.tolist()[: self.num_samples - len(have)]:
                cells = torch.stack([batch["images"][i, 0], batch["images"][i, 1], out[i], batch["target"][i]])
                have.append(((cells.float().clamp(-1, 1) + 1) / 2).cpu())  # (4, 3, H, W) in [0, 1]
                self._prompts.setdefault(task, []).append(batch["prompt"][i])

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_due(trainer, self.every_n_epochs):
            return
        writer = _tensorboard(trainer)
        if writer is None:
            return
        for task, rows in self._rows.items():
            grid = make_grid(self._upscale(torch.cat(rows)), nrow=4, padding=2, pad_value=1.0)
            writer.add_image(f"samples/{task}", grid, global_step=trainer.global_step)
            text = "\n\n".join(f"{k}. `{p}`" for k, p in enumerate(self._prompts[task], 1))
            writer.add_text(f"samples/{task}/prompts", text, global_step=trainer.global_step)

    def _upscale(self, images: Tensor) -> Tensor:
        h = images.shape[-2]
        if self.upscale_to and h < self.upscale_to:
            scale = max(1, self.upscale_to // h)
            images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        return images


def _tensorboard(trainer: pl.Trainer):
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
