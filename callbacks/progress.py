"""A progress line every N optimizer steps when the output is not a terminal.

In a terminal Lightning's tqdm bar shows the step, rate and ETA. Piped to a file (SLURM
output, `nohup`, `| tee`) tqdm's carriage-return updates make one unreadable line, so there this
callback turns the bar off and prints plain lines instead:

    [step 300/1200] epoch 0 | train/loss 0.1834 | 2.41 steps/s | ETA 0:06:13
    [val  300/1200] val/loss 0.1712 | val/psnr 21.40
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

VAL_KEYS = ("val/loss", "val/psnr")


def _fmt(metrics: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " | ".join(f"{k} {float(metrics[k]):.4g}" for k in keys if k in metrics)


class StepLog(Callback):
    """Print a line every `every_n_steps` optimizer steps (and after each validation) when
    stdout is not a TTY (`always=True`: in a terminal too). The tqdm bar is turned off then."""

    def __init__(self, every_n_steps: int = 50, always: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"StepLog every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.always = every_n_steps, always
        self._t0, self._step0, self._last = 0.0, 0, -1

    @property
    def active(self) -> bool:
        return self.always or not sys.stdout.isatty()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._step0 = time.perf_counter(), trainer.global_step  # a resumed run starts at k

    @rank_zero_only
    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        step = trainer.global_step
        if not self.active or step == self._last or step % self.every_n_steps:
            return
        self._last = step
        rate = (step - self._step0) / max(time.perf_counter() - self._t0, 1e-9)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        eta = f" | ETA {timedelta(seconds=round((total - step) / rate))}" if total and rate > 0 else ""
        loss = _fmt(trainer.callback_metrics, ("train/loss",))
        print(f"[step {step}/{total or '?'}] epoch {trainer.current_epoch}"
              f"{' | ' + loss if loss else ''} | {rate:.2f} steps/s{eta}", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active and not trainer.sanity_checking:
            total = trainer.max_steps if trainer.max_steps > 0 else "?"
            print(f"[val  {trainer.global_step}/{total}] {_fmt(trainer.callback_metrics, VAL_KEYS)}", flush=True)
