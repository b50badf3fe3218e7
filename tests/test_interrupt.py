"""callbacks.interrupt's pieces without a Trainer: which signal the ranks agree on, which signal is
SLURM's requeue signal, and what `scontrol requeue` is called with and says when it fails. The
runs that signal real processes are in test_preemption.py."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from callbacks import interrupt
from callbacks.interrupt import agreed_signal, requeue_job, requeue_signal, slurm_job_id

RANKED = (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM)  # lowest to highest priority
NONE = 0


def _two_ranks(monkeypatch, peer: Callable[[], list[float]], **trainer) -> SimpleNamespace:
    """A trainer of 2 ranks; the other rank all-reduces the values `peer()` returns (MAX, as
    gloo/NCCL would compute it)."""
    def all_reduce(t, op):
        assert op == torch.distributed.ReduceOp.MAX
        t.copy_(torch.maximum(t, torch.tensor(peer(), dtype=t.dtype)))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    return SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")), **trainer)


@pytest.mark.parametrize("mine, other, agreed", [
    (NONE, NONE, NONE),
    (signal.SIGUSR1, NONE, signal.SIGUSR1),  # a requeue signal that reached one rank stops all
    (NONE, signal.SIGINT, signal.SIGINT),
    (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM),  # a job being cancelled is not requeued
    (signal.SIGINT, signal.SIGUSR1, signal.SIGINT),  # priority, not the signal number (2 < 10)
    (signal.SIGTERM, signal.SIGINT, signal.SIGTERM),
])
def test_the_ranks_agree_on_the_signal_of_highest_priority(monkeypatch, mine, other, agreed):
    peer = lambda: [RANKED.index(other) + 1 if other else 0]  # the other rank's priority code
    assert agreed_signal(_two_ranks(monkeypatch, peer), mine, RANKED) == agreed


def _trainer_in(environment) -> SimpleNamespace:
    return SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=environment))


def test_the_requeue_signal_is_slurms_when_auto_requeue_is_on():
    assert requeue_signal(_trainer_in(SLURMEnvironment(auto_requeue=True))) == signal.SIGUSR1
    assert requeue_signal(_trainer_in(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGHUP))) \
        == signal.SIGHUP
    assert requeue_signal(_trainer_in(SLURMEnvironment(auto_requeue=False))) is None
    assert requeue_signal(_trainer_in(LightningEnvironment())) is None


def test_the_job_id_of_an_array_task_names_the_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "4243"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "4200_7"


def test_scontrol_requeue_gets_the_job_and_a_failure_is_said(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'log'}\n"
                        "[ \"$2\" = bad ] && { echo 'Invalid job id specified' >&2; exit 1; }\nexit 0\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert requeue_job("4242") is None
    assert "exit status 1: Invalid job id specified" == requeue_job("bad")
    assert (tmp_path / "log").read_text().split("\n")[:2] == ["requeue 4242", "requeue bad"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # not on a SLURM node
    assert requeue_job("4242").startswith("FileNotFoundError")


def test_the_callback_notes_the_requeue_signal_only_under_slurm_auto_requeue(monkeypatch):
    """on_train_start installs the note-only handler for the signals it will act on."""
    cb = interrupt.InterruptCheckpoint()
    before = {s: signal.getsignal(s) for s in RANKED}
    try:
        cb.on_train_start(_trainer_in(SLURMEnvironment(auto_requeue=True)), None)
        assert all(signal.getsignal(s) == cb._note for s in RANKED)
        cb._release()  # after the save: a late requeue signal is ignored, SIGTERM ends the process
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
        cb.on_train_start(_trainer_in(LightningEnvironment()), None)
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # not taken over off SLURM
        cb._restore()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_second_signal_aborts_except_after_the_requeue_signal():
    """Ctrl-C twice stops at once (KeyboardInterrupt, no save). SLURM's sequence, the requeue
    signal and then SIGTERM at the time limit, is not impatience: SIGTERM outranks it."""
    cb = interrupt.InterruptCheckpoint()
    cb._requeue = signal.SIGUSR1
    cb._note(signal.SIGUSR1, None)
    cb._note(signal.SIGUSR1, None)  # twice is once
    assert cb._noted == signal.SIGUSR1
    cb._note(signal.SIGTERM, None)
    assert cb._noted == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        cb._note(signal.SIGINT, None)

    plain = interrupt.InterruptCheckpoint()  # not under SLURM: no requeue signal
    plain._note(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        plain._note(signal.SIGINT, None)


def test_validation_batches_are_agreed_on_only_when_every_rank_has_as_many(monkeypatch):
    """An all-reduce after each validation batch needs as many batches on every rank (Lightning's
    distributed sampler pads them so; a user's own loader may not)."""
    other = {"n": 12.0}
    cb = interrupt.InterruptCheckpoint()
    cb._previous = {signal.SIGTERM: signal.SIG_DFL}  # training has begun
    trainer = _two_ranks(monkeypatch, lambda: [other["n"], -other["n"]], sanity_checking=False,
                         num_val_batches=[12])
    cb.on_validation_start(trainer, None)
    assert cb._in_validation
    other["n"] = 11.0
    cb.on_validation_start(trainer, None)
    assert not cb._in_validation
    trainer.sanity_checking, other["n"] = True, 12.0
    cb.on_validation_start(trainer, None)
    assert not cb._in_validation
