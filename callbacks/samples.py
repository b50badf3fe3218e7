"""TensorBoard sample grids per task: image 1 | image 2 | output | target, with the prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from callbacks._common import check_every, first_keys, is_due, sampled_outputs, task_indices

COLUMNS = ("image 1", "image 2", "output", "target")


@dataclass
class _Row:
    key: str
    cells: Tensor  # (4, 3, H, W) uint8 on the CPU: image 1, image 2, output, target
    prompt: str


class SampleGrid(pl.Callback):
    """Every n validation epochs, log `samples/<task>` (rows: image 1 | image 2 | output | target,
    the columns labelled on top) and the rows' prompts as `samples/<task>/prompts` text.

    The rows of a task are its `num_samples` validation samples with the smallest keys over the
    whole validation set, whichever rank saw them: every rank keeps its own smallest, the ranks
    agree on the global choice by exchanging keys, and only the chosen rows travel to rank 0. The
    validation set is fixed and the module samples each row with a seed from its key, so a grid
    compares the same inputs across epochs, world sizes and batch sizes.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 4, upscale_to: int = 128) -> None:
        self.every_n_epochs = check_every(every_n_epochs)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.upscale_to = upscale_to  # tiny demo images are hard to see at 32 px
        self._rows: dict[str, list[_Row]] = {}
        self.logged: dict[str, list[str]] = {}  # task -> keys of the last grids written (rank 0)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not is_due(trainer, self.every_n_epochs):
            return
        out = sampled_outputs(pl_module, batch, outputs)
        for task, rows in task_indices(batch).items():
            have = self._rows.setdefault(task, [])
            for i in rows.tolist():
                key = str(batch["key"][i])
                if len(have) >= self.num_samples and key >= have[-1].key:
                    continue  # cells are built only for rows that can still make the cut
                cells = torch.stack([batch["images"][i, 0], batch["images"][i, 1], out[i], batch["target"][i]])
                have.append(_Row(key, _to_uint8(cells), str(batch["prompt"][i])))
                have.sort(key=lambda r: r.key)
                del have[self.num_samples:]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_due(trainer, self.every_n_epochs):
            return
        rows = self._gather_chosen()  # a collective: every rank calls it
        if trainer.global_rank != 0:
            return
        self.logged = {task: [r.key for r in rs] for task, rs in rows.items()}
        writer = _tensorboard(trainer)
        if writer is None:
            return
        for task, rs in rows.items():
            grid = self._grid([r.cells for r in rs])
            writer.add_image(f"samples/{task}", grid, global_step=trainer.global_step)
            text = "\n\n".join(f"{k}. `{r.key}`: `{r.prompt}`" for k, r in enumerate(rs, 1))
            writer.add_text(f"samples/{task}/prompts", text, global_step=trainer.global_step)

    # -- choosing across ranks -------------------------------------------------------------------
    def _gather_chosen(self) -> dict[str, list[_Row]]:
        """task -> the globally first `num_samples` rows by key (complete on rank 0 only)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {t: rs for t, rs in sorted(self._rows.items())}
        chosen = first_keys({t: [r.key for r in rs] for t, rs in self._rows.items()}, self.num_samples)
        tagged = [(t, r) for t in chosen for r in self._rows.get(t, []) if r.key in chosen[t]]
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(tagged, parts, dst=0)
        out: dict[str, dict[str, _Row]] = {t: {} for t in chosen}
        for part in parts or []:
            for t, r in part:
                out[t].setdefault(r.key, r)  # a batch the sampler repeated to even out the ranks
        return {t: [rs[k] for k in sorted(rs)] for t, rs in out.items()}

    # -- drawing ---------------------------------------------------------------------------------
    def _grid(self, cells: list[Tensor]) -> Tensor:
        images = self._upscale(torch.cat(cells).float() / 255)
        pad = 2
        grid = make_grid(images, nrow=len(COLUMNS), padding=pad, pad_value=1.0)
        return torch.cat([_header(grid.shape[-1], images.shape[-1], pad), grid], dim=1)

    def _upscale(self, images: Tensor) -> Tensor:
        h = images.shape[-2]
        if self.upscale_to and h < self.upscale_to:
            scale = max(1, self.upscale_to // h)
            images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        return images


def _to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images as uint8 on the CPU: 4x smaller to keep and to send to rank 0."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _header(width: int, cell: int, pad: int, height: int = 14) -> Tensor:
    """A white strip (3, height, width) with the column names centred over the grid's columns."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(COLUMNS):
        centre = pad + j * (cell + pad) + cell // 2
        text_w = draw.textlength(name)
        draw.text((centre - text_w / 2, 1), name, fill="black")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def _tensorboard(trainer: pl.Trainer):
    """The SummaryWriter of the first TensorBoard logger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
