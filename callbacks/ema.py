"""Exponential moving average of the trainable weights only.

Lightning's `EMAWeightAveraging` keeps an `AveragedModel`, a deep copy of the whole module: for a
LoRA run on the 3.8B backbone that is 7.6 GB of frozen weights copied for nothing, and it lands in
every checkpoint. Here the average covers exactly the parameters that train (the adapter, or
everything for a full fine-tune), so it costs what the adapter costs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

CHECKPOINT_KEY = "ema_state_dict"  # `ditfuse fuse --checkpoint` reads the EMA weights from here


class EMA(pl.Callback):
    """ema <- decay * ema + (1 - decay) * weight after every `every_n_steps` optimizer steps.

    With `use_for_validation` the averaged weights are swapped in for validation and swapped out
    again afterwards; at the end of training they are written into the model (for export). The
    average is kept in float32 whatever the training precision, and saved in the checkpoint.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1,
                 use_for_validation: bool = True, apply_at_end: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        if every_n_steps < 1 or start_step < 0:
            raise ValueError("EMA every_n_steps must be >= 1 and start_step >= 0")
        self.decay, self.start_step, self.every_n_steps = decay, start_step, every_n_steps
        self.use_for_validation, self.apply_at_end = use_for_validation, apply_at_end
        self.shadow: dict[str, Tensor] = {}
        self._backup: dict[str, Tensor] | None = None
        self._last_step: int | None = None  # global_step of the last update (or of the train start)

    @staticmethod
    def _trainable(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if type(trainer.strategy).__name__ in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
            raise RuntimeError(f"the EMA callback averages whole local parameters and does not support "
                               f"{type(trainer.strategy).__name__} (sharded parameters); remove it from "
                               f"trainer.callbacks or train with the ddp strategy")
        params = self._trainable(pl_module)
        if self.shadow:  # restored from a checkpoint: only move it next to the weights
            missing = sorted(set(params) - set(self.shadow))
            if missing:
                raise RuntimeError(f"EMA state in the checkpoint lacks {len(missing)} trainable tensors "
                                   f"(e.g. {missing[0]}); was it saved with another LoRA/trainable setup?")
            self.shadow = {n: self.shadow[n].to(params[n].device) for n in params}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now on resume (it is not at fit start)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Once per optimizer step: with gradient accumulation this hook runs for every micro-batch,
        # and global_step only moves when the optimizer stepped.
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step < self.start_step or step % self.every_n_steps:
            return
        params = self._trainable(pl_module)
        names = list(self.shadow)
        # lerp towards the weights: ema + (1 - decay) * (w - ema), one fused call for all tensors
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - self.decay)

    # -- swap in for validation ------------------------------------------------------------------
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        params = self._trainable(pl_module)
        self._backup = {n: params[n].detach().clone() for n in self.shadow}
        self._copy(params, self.shadow)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is not None:
            self._copy(self._trainable(pl_module), self._backup)
            self._backup = None

    @staticmethod
    @torch.no_grad()
    def _copy(params: dict[str, Tensor], values: dict[str, Tensor]) -> None:
        for n, v in values.items():
            params[n].copy_(v.to(params[n].dtype))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_for_validation and self.shadow and not trainer.sanity_checking:
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.apply_at_end and self.shadow:
            self._copy(self._trainable(pl_module), self.shadow)

    # -- checkpointing ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A validation-time save must not store the swapped-in EMA as the raw weights.
        if self._backup is not None:
            state = checkpoint.get("state_dict", {})
            for n, v in self._backup.items():
                if n in state:
                    state[n] = v.detach().clone()
        checkpoint[CHECKPOINT_KEY] = {n: v.detach().cpu() for n, v in self.shadow.items()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Next to the weights already: some strategies restore after `on_fit_start` has run.
        params = self._trainable(pl_module)
        self.shadow = {n: v.float().to(params[n].device) if n in params else v.float()
                       for n, v in checkpoint.get(CHECKPOINT_KEY, {}).items()}
