"""Ctrl-C and SIGTERM keep the work done: a resumable last.ckpt is written before the run exits.

(The end of fit writes it too when the periodic `every_n_train_steps` save is behind, so a run
whose max_steps is not a multiple of the period still ends with its final state in last.ckpt.)

A cluster signals every process of a job step at once: SLURM's `scancel` and its time limit send
SIGTERM to each rank and each DataLoader worker, a terminal's Ctrl-C sends SIGINT to the whole
foreground process group. So:

- DataLoader workers ignore SIGINT/SIGTERM/SIGUSR1 (`datamodules.workers.ignore_stop_signals`):
  the main process ends them, instead of torch reporting "worker killed by signal" mid-batch.
- During training this callback replaces the SIGINT/SIGTERM handlers with one that only notes
  the signal. After every optimizer step (the last micro-batch of a gradient-accumulation window:
  a checkpoint keeps no accumulated gradient) the ranks agree (one all-reduce MAX of the noted
  signal's priority, the ranks are in step there) whether any of them was signalled; if so every rank
  saves last.ckpt at that same step and raises `SignalStop`, exit status 128 + signal number
  (130 for SIGINT, 143 for SIGTERM, as a shell reports a process the signal ended).
  A signal to rank 0 alone stops all ranks alike; a signal to all ranks stops them once.
  During a validation inside fit they agree after each validation batch as well (a validation
  can outlast SLURM's KillWait); that save holds the step before the validation.
- SLURM's pre-time-limit signal (`#SBATCH --signal=SIGUSR1@90`, with Lightning's
  `SLURMEnvironment(auto_requeue=True)`) is noted and agreed on the same way: every rank saves
  `<default_root_dir>/hpc_ckpt_N.ckpt` (the name Lightning's own handler writes and a requeued
  run resumes from without --ckpt_path) at one step, rank 0 runs `scontrol requeue <job>`, and
  the run exits 128 + signal (138). A SIGTERM or SIGINT on any rank outranks it: no requeue of
  a job that is being cancelled.
- A second Ctrl-C or SIGTERM to a process (impatience) raises KeyboardInterrupt at once: no save,
  and the previous last.ckpt stays whole (checkpoints are written atomically, ditfuse.checkpoint_io).
  Once the checkpoint is written, the signals take their default action again (the process is
  ending; `scontrol requeue` itself makes SLURM send SIGTERM to the job).

Lightning's own SIGTERM and SLURM-requeue handlers are not kept during training: they run
collectives inside the handler (SIGTERM: a broadcast; requeue: `trainer.save_checkpoint`, whose
DataModule state gathers every rank's stream positions), out of step with the collectives the
ranks are in. With 2 simulated srun tasks signalled 0.7 s apart, the requeue handler hung both
ranks before writing anything: no checkpoint, no requeue, until SLURM's SIGKILL.
Lightning's `OnExceptionCheckpoint` is not used either: it needs a fixed `dirpath` (one file for
every run of a config, not per version folder), saves on any exception (also a NaN or a bug),
and turns every later `fit` without `--ckpt_path` into a resume from that file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

# lowest to highest priority when ranks noted different signals (the requeue signal goes first)
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


def requeue_signal(trainer: pl.Trainer) -> int | None:
    """The signal SLURM sends before the time limit when Lightning's auto-requeue is on
    (`SLURMEnvironment(auto_requeue=True)`, configs/cluster/ddp_a100.yaml), else None."""
    env = trainer._accelerator_connector.cluster_environment  # where Lightning's signal connector looks
    if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
        return int(env.requeue_signal)
    return None


def max_over_ranks(trainer: pl.Trainer, values: list[float], dtype: torch.dtype) -> list[float]:
    """Each value's maximum over the ranks (the values themselves on one rank). Every rank must
    call it."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return values
    # on the strategy's device: NCCL reduces CUDA tensors only (Lightning already syncs on a
    # one-element broadcast per step under DDP, so this adds no new kind of stall)
    both = torch.tensor(values, dtype=dtype, device=trainer.strategy.root_device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return both.tolist()


def agreed_signal(trainer: pl.Trainer, noted: int, ranked: Sequence[int]) -> int:
    """The highest-priority signal noted on any rank (0: none); `ranked` lists the signals from
    lowest to highest priority. Every rank must call it."""
    (code,) = max_over_ranks(trainer, [ranked.index(noted) + 1 if noted else 0], torch.int32)
    return ranked[int(code) - 1] if code else 0


def same_on_every_rank(trainer: pl.Trainer, value: float) -> bool:
    """Whether every rank passed the same number. Every rank must call it."""
    top, minus_bottom = max_over_ranks(trainer, [value, -value], torch.float64)
    return top == -minus_bottom


def slurm_job_id() -> str:
    """What `scontrol requeue` takes: `<array job>_<task>` in an array job, else the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue_job(job_id: str) -> str | None:
    """`scontrol requeue JOB`; None when it worked, else what went wrong, in a few words."""
    try:
        res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if res.returncode != 0:
        return f"exit status {res.returncode}: {(res.stderr or res.stdout).strip()[:200]}"
    return None


class InterruptCheckpoint(Checkpoint):
    """On SIGINT (Ctrl-C) / SIGTERM during fit, on any rank: every rank saves ModelCheckpoint's
    last.ckpt at the step reached, then exits with status 128 + signal; on SLURM's requeue
    signal (auto-requeue on): hpc_ckpt_N.ckpt and `scontrol requeue`, then the same exit. At the
    end of fit: save last.ckpt when the periodic save is behind the final step.

    A `Checkpoint` subclass so that Lightning runs its hooks after the other callbacks' (with the
    ModelCheckpoints): the state it saves after a batch includes what they did for that batch
    (an EMA update, the run log), as a periodic save's does.
    """

    def __init__(self) -> None:
        self._noted = 0
        self._previous: dict[int, Any] = {}
        self._requeue: int | None = None
        self._in_validation = False  # agree after each batch of the validation running

    @property
    def _ranked(self) -> tuple[int, ...]:
        """The signals acted on, lowest to highest priority."""
        return (self._requeue, *STOP_SIGNALS) if self._requeue else STOP_SIGNALS

    # -- the handler: note, nothing else (a collective or a save inside a handler could deadlock)
    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self._noted and self._noted != self._requeue:
            raise KeyboardInterrupt  # a second Ctrl-C / SIGTERM: stop now, without a checkpoint
        if not self._noted or signum != self._requeue:
            # SLURM's SIGTERM at the time limit after its requeue signal outranks it; the requeue
            # signal twice is one
            self._noted = signum

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal.signal's requirement
            self._previous = {s: signal.signal(s, self._note) for s in self._ranked}

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _release(self) -> None:
        """The checkpoint is written and the run is ending: Ctrl-C and SIGTERM end the process at
        once, a late requeue signal (this rank's own, after another rank's ended the run) is
        ignored. Lightning's handlers, which run collectives, do not come back."""
        for s in self._previous:
            if s == self._requeue:
                signal.signal(s, signal.SIG_IGN)
            else:
                signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)
        self._previous = {}

    # -- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its handlers (Trainer._run), before the first batch
        self._noted = 0
        self._requeue = requeue_signal(trainer)
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            # mid gradient accumulation: a checkpoint holds no accumulated gradient, so one taken
            # here would resume into an optimizer step short of these micro-batches. Every rank is
            # at the same micro-batch, so every rank skips the agreement alike.
            return
        self._stop_if_signalled(trainer, "")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation inside fit can outlast what a cluster waits between its signal and SIGKILL
        # (SLURM: KillWait after SIGTERM, 90 s after SIGUSR1 in fit.sbatch), so the ranks agree
        # after each validation batch too, when every rank has as many (Lightning's distributed
        # sampler pads them to that; a loader of the user's may not, and an all-reduce more on
        # one rank would hang). The training state saved is the step before the validation;
        # the validation is not finished and logs nothing.
        # (fit's training has begun, on every rank alike: only then do the ranks all-reduce here)
        self._in_validation = (bool(self._previous) and not trainer.sanity_checking
                               and same_on_every_rank(trainer, float(sum(trainer.num_val_batches))))

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._in_validation:
            self._stop_if_signalled(trainer, " (during validation)")

    def _stop_if_signalled(self, trainer: pl.Trainer, where: str) -> None:
        signum = agreed_signal(trainer, self._noted, self._ranked)
        if not signum:
            return
        step = trainer.global_step
        if signum == self._requeue:
            self._save_and_requeue(trainer, signum, where)
        else:
            self._save_last(trainer, signum, where)
        self._release()
        raise SignalStop(signum, step)

    def _save_last(self, trainer: pl.Trainer, signum: int, where: str) -> None:
        what, step = NAMES.get(signum, f"signal {signum}") + where, trainer.global_step
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

    def _save_and_requeue(self, trainer: pl.Trainer, signum: int, where: str) -> None:
        # Lightning's name (hpc_ckpt_<N+1> in default_root_dir), which its restore picks up when a
        # requeued run has no --ckpt_path; rank 0 chooses it, so every rank writes the same file
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        step = trainer.global_step
        trainer.save_checkpoint(path)  # a collective: every rank is here, after the same batch
        what = f"SLURM's requeue signal ({signal.Signals(signum).name}){where}"
        if not trainer.is_global_zero:
            return
        job = slurm_job_id()
        failed = requeue_job(job)
        if failed is None:
            rank_zero_info(f"[ditfuse] {what} at step {step}: saved {path} (all {trainer.world_size} rank(s)); "
                           f"requeued SLURM job {job}, which resumes from it")
        else:
            rank_zero_warn(f"{what} at step {step}: saved {path}, but `scontrol requeue {job}` failed ({failed}); "
                           "submit the job again to continue from it")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        cb = last_checkpointer(trainer)
        if cb is not None and trainer.global_step > getattr(cb, "_last_global_step_saved", -1):
            save_last(trainer, cb)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
