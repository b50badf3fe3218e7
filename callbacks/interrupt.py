"""Ctrl-C and SIGTERM keep the work done: a resumable last.ckpt is written before the run exits.

(The end of fit writes it too when the periodic `every_n_train_steps` save is behind, so a run
whose max_steps is not a multiple of the period still ends with its final state in last.ckpt.)

Lightning turns SIGINT into KeyboardInterrupt and SIGTERM into SIGTERMException (after the
current batch, on every rank: its signal connector broadcasts the flag), and calls each
callback's `on_exception` before tearing down. This callback then saves where ModelCheckpoint
writes its `last.ckpt`, so the same command with `--ckpt_path last` continues from the step the
run was stopped at instead of the last periodic checkpoint.

Lightning's own `OnExceptionCheckpoint` is not used: it needs a fixed `dirpath` (one file for
every run of a config, not per version folder), saves on any exception (also a NaN or a bug),
and turns every later `fit` without `--ckpt_path` into a resume from that file.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


def last_checkpointer(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ModelCheckpoint that keeps a last.ckpt (what `--ckpt_path last` looks for)."""
    return next((cb for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath), None)


def save_last(trainer: pl.Trainer, cb: ModelCheckpoint) -> str:
    path = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
    trainer.save_checkpoint(path)
    cb.last_model_path = path  # so the resumed run overwrites it instead of writing last-v1.ckpt
    cb._last_global_step_saved = trainer.global_step  # Lightning's own record of its last save
    return path


class InterruptCheckpoint(Callback):
    """On SIGINT (Ctrl-C) / SIGTERM during fit: save ModelCheckpoint's last.ckpt, then exit.
    At the end of fit: save it when the periodic save is behind the final step."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = last_checkpointer(trainer)
        if cb is not None and trainer.global_step > getattr(cb, "_last_global_step_saved", -1):
            save_last(trainer, cb)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.global_step == 0:
            return  # a bug or a NaN is not a state worth resuming; step 0 has nothing to keep
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        cb = last_checkpointer(trainer)
        if cb is None:
            rank_zero_warn(f"{what} at step {trainer.global_step}: no ModelCheckpoint(save_last=true) in "
                           "trainer.callbacks, so no checkpoint is written")
            return
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size > 1:
            # each rank stops wherever Ctrl-C found it: a collective save could wait forever
            rank_zero_warn(f"Ctrl-C under {trainer.world_size} ranks: not saving (the ranks are not in step); "
                           "send SIGTERM instead to stop with a checkpoint")
            return
        path = save_last(trainer, cb)
        rank_zero_info(f"[ditfuse] {what} at step {trainer.global_step}: saved {path}; resume with the same "
                       "command and --ckpt_path last")
