"""Ctrl-C and SIGTERM keep the work done: a resumable last.ckpt is written before the run exits.

(The end of fit writes it too when the periodic `every_n_train_steps` save is behind, so a run
whose max_steps is not a multiple of the period still ends with its final state in last.ckpt.)

A cluster signals every process of a job step at once: SLURM's `scancel` and its time limit send
SIGTERM to each rank and each DataLoader worker, a terminal's Ctrl-C sends SIGINT to the whole
foreground process group. So:

- DataLoader workers ignore SIGINT/SIGTERM/SIGUSR1 (`datamodules.workers.ignore_stop_signals`):
  the main process ends them, instead of torch reporting "worker killed by signal" mid-batch.
- During training this callback replaces the SIGINT/SIGTERM handlers with one that only notes
  the signal. After every training batch the ranks agree (one all-reduce MAX of the noted
  signal, the ranks are in step there) whether any of them was signalled; if so every rank
  saves last.ckpt at that same step and raises `SignalStop`, exit status 128 + signal number
  (130 for SIGINT, 143 for SIGTERM, as a shell reports a process the signal ended).
  A signal to rank 0 alone stops all ranks alike; a signal to all ranks stops them once.
- A second signal to a process (an impatient Ctrl-C) raises KeyboardInterrupt at once: no save,
  and the previous last.ckpt stays whole (checkpoints are written atomically, ditfuse.checkpoint_io).

Lightning's own SIGTERM handler is not kept during training: it re-sends the signal to the
other local ranks and runs a collective broadcast inside the handler, out of step with the
collectives the ranks are in (a hang or a gloo error with the signal to all ranks).
Lightning's `OnExceptionCheckpoint` is not used either: it needs a fixed `dirpath` (one file for
every run of a config, not per version folder), saves on any exception (also a NaN or a bug),
and turns every later `fit` without `--ckpt_path` into a resume from that file.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class SignalStop(SystemExit):
    """Every rank stopped at the same step after a signal; exit status 128 + the signal number."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


def last_checkpointer(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The first ModelCheckpoint that keeps a last.ckpt (what `--ckpt_path last` looks for)."""
    return next((cb for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath), None)


def save_last(trainer: pl.Trainer, cb: ModelCheckpoint) -> str:
    path = cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST)
    # set before saving, so the checkpoint's ModelCheckpoint state has them too: the resumed run
    # then overwrites last.ckpt instead of writing last-v1.ckpt next to it
    cb.last_model_path = path
    cb._last_global_step_saved = trainer.global_step  # Lightning's own record of its last save
    trainer.save_checkpoint(path)  # a collective: every rank calls it, rank 0 writes
    return path


def agreed_signal(trainer: pl.Trainer, noted: int) -> int:
    """The largest signal number noted on any rank (0: none). Every rank must call it."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return noted
    # on the strategy's device: NCCL reduces CUDA tensors only (Lightning already syncs on a
    # one-element broadcast per step under DDP, so this adds no new kind of stall)
    flag = torch.tensor([noted], dtype=torch.int32, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


class InterruptCheckpoint(Checkpoint):
    """On SIGINT (Ctrl-C) / SIGTERM during fit, on any rank: every rank saves ModelCheckpoint's
    last.ckpt at the step reached, then exits with status 128 + signal. At the end of fit: save
    it when the periodic save is behind the final step.

    A `Checkpoint` subclass so that Lightning runs its hooks after the other callbacks' (with the
    ModelCheckpoints): the state it saves after a batch includes what they did for that batch
    (an EMA update, the run log), as a periodic save's does.
    """

    def __init__(self) -> None:
        self._noted = 0
        self._previous: dict[int, Any] = {}

    # -- the handler: note, nothing else (a collective or a save inside a handler could deadlock)
    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self._noted:
            raise KeyboardInterrupt  # a second signal: stop now, without a checkpoint
        self._noted = signum

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    # -- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its handlers (Trainer._run), before the first batch
        self._noted = 0
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        signum = agreed_signal(trainer, self._noted)
        if not signum:
            return
        what, step = NAMES.get(signum, f"signal {signum}"), trainer.global_step
        cb = last_checkpointer(trainer)
        if cb is not None and getattr(cb, "_last_global_step_saved", -1) == step:
            rank_zero_info(f"[ditfuse] {what} at step {step}: {cb.last_model_path} holds this step; resume "
                           "with the same command and --ckpt_path last")
        elif cb is None:
            rank_zero_warn(f"{what} at step {step}: no ModelCheckpoint(save_last=true) in trainer.callbacks, "
                           "so no checkpoint is written")
        else:
            path = save_last(trainer, cb)
            rank_zero_info(f"[ditfuse] {what} at step {step}: saved {path} (all {trainer.world_size} rank(s)); "
                           "resume with the same command and --ckpt_path last")
        self._restore()
        raise SignalStop(signum, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        cb = last_checkpointer(trainer)
        if cb is not None and trainer.global_step > getattr(cb, "_last_global_step_saved", -1):
            save_last(trainer, cb)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
