"""A CPU `ditfuse fit` killed mid-run and restarted with the same command continues where it was.

1. SIGKILL after a periodic checkpoint (what a node loss does), restart with `--ckpt_path last`.
2. Ctrl-C (SIGINT) or SIGTERM outside SLURM: callbacks.interrupt.InterruptCheckpoint saves
   last.ckpt before the run exits; the same command with `--ckpt_path last` resumes from it.
3. SLURM's pre-timeout SIGUSR1 (simulated: SLURM variables set, a fake `scontrol` on PATH):
   Lightning saves hpc_ckpt_N.ckpt and requeues; the requeued job (the same command, no
   ckpt_path) resumes from it.
Both check: the step count continues (no jump back to step 0), the logged train/loss curve of
the resumed run starts after the checkpoint, torch's RNG continues exactly (RankSeed), the data
stream draws new samples instead of replaying the epoch start, and optimizer / scheduler /
mix counters continue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _fit import ROOT, fit_cmd, fit_env, override, run_fit
from _runlog import read_runlog

pytestmark = pytest.mark.slow
MAX_STEPS = 8


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 400) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"fit exited (rc={proc.returncode}) before {what}:\n{out[-4000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _batches(log: list[dict], pid: int) -> list[dict]:
    return [r for r in log if r["event"] == "batch" and r["pid"] == pid]


def _tb_loss_steps(event_file: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_file))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


def _check_resumed(tmp: Path, ckpt_step: int, first_pid: int, overlap: bool = True) -> None:
    """overlap: the first run went on past its checkpoint, so both runs have steps to compare."""
    log = read_runlog(tmp / "runlog")
    pids = list(dict.fromkeys(r["pid"] for r in log))
    assert pids[0] == first_pid and len(pids) == 2, pids
    before, after = _batches(log, pids[0]), _batches(log, pids[1])
    start = next(r for r in log if r["event"] == "train_start" and r["pid"] == pids[1])

    # the step count continues from the checkpoint, no jump back to step 0
    assert start["step"] == ckpt_step > 0
    assert [b["step"] for b in after] == list(range(ckpt_step + 1, MAX_STEPS + 1))
    # so does the logged curve: the resumed run's event file holds consecutive points after the
    # checkpoint. Lightning logs optimizer step k at x = k - 1; after a checkpoint taken by the
    # SIGUSR1 handler in the middle of a batch it counts that batch as done, so x = k there
    # (a one-point gap in the curve, never an overlap or a jump back).
    event_files = sorted((tmp / "run" / "tb" / "v0").glob("events.out.tfevents.*"), key=os.path.getmtime)
    xs = _tb_loss_steps(event_files[-1])
    assert xs[0] in (ckpt_step, ckpt_step + 1) and xs == list(range(xs[0], xs[0] + MAX_STEPS - ckpt_step))
    # torch's global RNG continues exactly where the killed run would have been
    by_step = {b["step"]: b["rng"] for b in before}
    shared = [b for b in after if b["step"] in by_step]
    assert (bool(shared) or not overlap) and all(b["rng"] == by_step[b["step"]] for b in shared)
    # the data stream continues with new draws instead of replaying the start of the epoch
    assert all(a["keys"] != b["keys"] for a, b in zip(after, before))

    final = torch.load(tmp / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    assert final["lr_schedulers"][0]["last_epoch"] == MAX_STEPS  # the LR schedule continued
    adam_steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {float(MAX_STEPS)}  # AdamW moments carried over, not restarted
    mix = final["DiTFuseDataModule"]["mix_counts"]
    assert sum(mix.values()) >= MAX_STEPS * 8  # realized-mix counters continued too


def _checkpointing(tmp: Path) -> list[dict]:
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 2, "save_last": True,
                           "save_top_k": -1}}]


def test_sigkill_then_restart_with_ckpt_path_last(tmp_path, demo_dir):
    cfg = override(tmp_path, demo_dir, max_steps=MAX_STEPS, callbacks=_checkpointing(tmp_path))
    cmd = fit_cmd(cfg, "--ckpt_path", "last")  # the same command starts and resumes the run
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # step 4's checkpoint is written at the end of step 4, before step 5's batch ends
    _wait(lambda: len(_batches(read_runlog(tmp_path / "runlog"), proc.pid)) >= 5, proc, "5 training steps")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt_step = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert ckpt_step >= 4

    run_fit(cfg, "--ckpt_path", "last")
    _check_resumed(tmp_path, ckpt_step, proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_last_ckpt_that_the_same_command_resumes(tmp_path, demo_dir, sig):
    # the periodic save (every 100 steps) never fires in this 8-step run: only the interrupt saves
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 100, "save_last": True,
                                "save_top_k": 0}},
                 {"class_path": "callbacks.interrupt.InterruptCheckpoint"}]
    cfg = override(tmp_path, demo_dir, max_steps=MAX_STEPS, callbacks=callbacks)
    cmd = fit_cmd(cfg, "--ckpt_path", "last")
    # SIGINT's default action, as in a terminal (a background shell running pytest ignores it,
    # and children inherit that)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=fit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait(lambda: len(_batches(read_runlog(tmp_path / "runlog"), proc.pid)) >= 3, proc, "3 training steps")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]  # it stopped early, not at max_steps
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file(), out[-3000:]
    ckpt_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 3 <= ckpt_step < MAX_STEPS
    assert "--ckpt_path last" in out  # it says how to resume

    run_fit(cfg, "--ckpt_path", "last")
    # the interrupt saved the step it stopped at: no step ran twice (no overlap to compare RNG on);
    # the end of fit wrote last.ckpt at MAX_STEPS (the periodic save never fired)
    _check_resumed(tmp_path, ckpt_step, proc.pid, overlap=False)


def test_slurm_sigusr1_saves_requeues_and_the_same_command_resumes(tmp_path, demo_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    env = fit_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ditfuse-test",
               SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="localhost", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_NODEID="0")
    plugins = [{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
                "init_args": {"auto_requeue": True, "requeue_signal": "SIGUSR1"}}]  # as ddp_a100.yaml
    cfg = override(tmp_path, demo_dir, max_steps=MAX_STEPS, callbacks=_checkpointing(tmp_path), plugins=plugins)
    cmd = fit_cmd(cfg)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: len(_batches(read_runlog(tmp_path / "runlog"), proc.pid)) >= 3, proc, "3 training steps")
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` sends before the time limit
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    _wait(lambda: (tmp_path / "scontrol.log").is_file(), proc, "the requeue call")
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert hpc.is_file()
    # SLURM ends the job once it is requeued; here it runs one more step first, so that both
    # runs have a step to compare
    signalled = len(_batches(read_runlog(tmp_path / "runlog"), proc.pid))
    _wait(lambda: len(_batches(read_runlog(tmp_path / "runlog"), proc.pid)) > signalled, proc, "one more step")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpt_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]

    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "hpc_ckpt_1.ckpt" in res.stdout + res.stderr  # Lightning restored the preemption checkpoint
    _check_resumed(tmp_path, ckpt_step, proc.pid)
