"""A CPU `ditfuse fit` killed mid-run and restarted with the same command continues where it was.

1. SIGKILL after a periodic checkpoint (what a node loss does), restart with `--ckpt_path last`.
2. Ctrl-C (SIGINT) or SIGTERM to the whole process group (with 2 DataLoader workers; under
   2-rank DDP to every rank or to rank 0 alone): callbacks.interrupt.InterruptCheckpoint saves
   last.ckpt at the step every rank agreed on, the run exits 128 + signal; the same command with
   `--ckpt_path last` resumes from it.
3. SLURM's pre-timeout SIGUSR1 to both tasks of a simulated 2-task srun step (SLURM variables
   per task, a fake `scontrol` on PATH), during a validation: every rank stops at one validation
   batch, hpc_ckpt_1.ckpt holds the step before it, rank 0 requeues; the requeued job (the same
   command, no ckpt_path) resumes from it.
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
from _fit import ROOT, fit_cmd, fit_env, free_port, override, run_fit
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


def _batches(log: list[dict], pid: int | None) -> list[dict]:
    """The batch records of process `pid` (None: of every process)."""
    return [r for r in log if r["event"] == "batch" and pid in (None, r["pid"])]


def _tb_loss_steps(event_file: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_file))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


def _check_resumed(tmp: Path, ckpt_step: int, first_pid: int, overlap: bool = True, accumulate: int = 1) -> None:
    """overlap: the first run went on past its checkpoint, so both runs have steps to compare.
    accumulate: micro-batches per optimizer step (trainer.accumulate_grad_batches)."""
    log = read_runlog(tmp / "runlog")
    pids = list(dict.fromkeys(r["pid"] for r in log))
    assert pids[0] == first_pid and len(pids) == 2, pids
    before, after = _batches(log, pids[0]), _batches(log, pids[1])
    start = next(r for r in log if r["event"] == "train_start" and r["pid"] == pids[1])

    # the step count continues from the checkpoint, no jump back to step 0
    assert start["step"] == ckpt_step > 0
    # a batch logs the step count after it: with accumulation k, k, k+1, k+1, ... (whole windows:
    # a checkpoint taken inside one would resume into an optimizer step short of micro-batches)
    n_after = accumulate * (MAX_STEPS - ckpt_step)
    assert [b["step"] for b in after] == [ckpt_step + (i + 1) // accumulate for i in range(n_after)]
    # so does the logged curve: the resumed run's event file holds consecutive points after the
    # checkpoint. Lightning logs optimizer step k at x = k - 1; after a checkpoint taken by the
    # SIGUSR1 handler in the middle of a batch it counts that batch as done, so x = k there
    # (a one-point gap in the curve, never an overlap or a jump back).
    event_files = sorted((tmp / "run" / "tb" / "v0").glob("events.out.tfevents.*"), key=os.path.getmtime)
    xs = list(dict.fromkeys(_tb_loss_steps(event_files[-1])))  # (one point per micro-batch, at its step)
    assert xs[0] in (ckpt_step, ckpt_step + 1) and xs == list(range(xs[0], xs[0] + MAX_STEPS - ckpt_step))
    # torch's global RNG continues exactly where the killed run would have been
    if overlap:
        by_step = {b["step"]: b["rng"] for b in before}
        shared = [b for b in after if b["step"] in by_step]
        assert shared and all(b["rng"] == by_step[b["step"]] for b in shared)
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


def _interrupt_callbacks(tmp: Path) -> list[dict]:
    # the periodic save (every 100 steps) never fires in an 8-step run: only the interrupt saves
    return [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(tmp / "ckpt"), "every_n_train_steps": 100, "save_last": True,
                           "save_top_k": 0}},
            {"class_path": "callbacks.interrupt.InterruptCheckpoint"}]


def _start_group(cmd: list[str]) -> subprocess.Popen:
    """The fit in a process group of its own (as a job step or a terminal's foreground job), with
    SIGINT's default action as in a terminal (a background shell running pytest ignores it, and
    children inherit that)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=fit_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stopped(proc: subprocess.Popen, sig: int, tmp: Path) -> tuple[int, str]:
    """Wait for the signalled run; it exits 128 + sig with no traceback. -> (saved step, output)."""
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the signalled run did not exit within 300 s") from None
    assert proc.returncode == 128 + sig, out[-3000:]  # the shell's convention: 130 SIGINT, 143 SIGTERM
    assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
    assert "--ckpt_path last" in out  # it says how to resume
    last = tmp / "ckpt" / "last.ckpt"
    assert last.is_file(), out[-3000:]
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"], out


@pytest.mark.parametrize("sig, accumulate", [(signal.SIGINT, 1), (signal.SIGTERM, 3)],
                         ids=["SIGINT", "SIGTERM-accumulate3"])
def test_signal_to_the_process_group_writes_last_ckpt_that_the_same_command_resumes(tmp_path, demo_dir, sig,
                                                                                     accumulate):
    """The signal reaches the main process and its 2 DataLoader workers at once (Ctrl-C in a
    terminal, `scancel`): the workers ignore it, the main process saves at the step reached
    (with gradient accumulation: at the end of the window it is in)."""
    cfg = override(tmp_path, demo_dir, max_steps=MAX_STEPS, callbacks=_interrupt_callbacks(tmp_path),
                   data={"num_workers": 2}, accumulate_grad_batches=accumulate)
    cmd = fit_cmd(cfg, "--ckpt_path", "last")
    proc = _start_group(cmd)
    # with accumulation, the signal comes as the first micro-batch of step 3's window runs
    _wait(lambda: len(_batches(read_runlog(tmp_path / "runlog"), proc.pid)) >= (3 if accumulate == 1 else 2 * accumulate),
          proc, "the first steps")
    os.killpg(proc.pid, sig)
    ckpt_step, _ = _stopped(proc, sig, tmp_path)
    assert 2 <= ckpt_step < MAX_STEPS
    ran = _batches(read_runlog(tmp_path / "runlog"), proc.pid)
    assert ran[-1]["step"] == ckpt_step  # saved at the step reached, after its batch was logged
    assert len(ran) == accumulate * ckpt_step  # ... and after the window's last micro-batch

    run_fit(cfg, "--ckpt_path", "last")
    # the interrupt saved the step it stopped at: no step ran twice (no overlap to compare RNG on);
    # the end of fit wrote last.ckpt at MAX_STEPS (the periodic save never fired)
    _check_resumed(tmp_path, ckpt_step, proc.pid, overlap=False, accumulate=accumulate)


def test_ddp_signal_every_rank_stops_at_one_step_and_resumes(tmp_path, demo_dir):
    """2 gloo ranks, one run resumed twice (each DDP launch is 2 fresh interpreters, so the cases
    share them): SIGINT to every process (Ctrl-C, a job step's scancel), then, in the resumed run,
    SIGTERM to rank 0 alone. Each time the ranks agree on the step, rank 0 saves it, both exit
    128 + signal; the same command resumes at that step, and the last run ends the schedule."""
    max_steps = 12  # room for two stops of at least 2 steps each
    cfg = override(tmp_path, demo_dir, max_steps=max_steps, callbacks=_interrupt_callbacks(tmp_path),
                   strategy="ddp", devices=2)
    cmd = fit_cmd(cfg, "--ckpt_path", "last")
    earlier: set[int] = set()  # the pids of the runs before the current one

    def batches(rank: int) -> list[dict]:
        return [r for r in read_runlog(tmp_path / "runlog", rank) if r["event"] == "batch" and r["pid"] not in earlier]

    def run_until_signal(sig: int, target: str, start_step: int, steps: int) -> int:
        proc = _start_group(cmd)
        _wait(lambda: all(len(batches(r)) >= steps for r in (0, 1)), proc, f"{steps} training steps on both ranks")
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)  # rank 0 is the launching process; rank 1 is its child
        step, _ = _stopped(proc, sig, tmp_path)
        for rank in (0, 1):
            log = [r for r in read_runlog(tmp_path / "runlog", rank) if r["pid"] not in earlier]
            assert [r["step"] for r in log if r["event"] == "train_start"] == [start_step]
            assert [(r["type"], r["step"]) for r in log if r["event"] == "exception"] == [("SignalStop", step)]
            assert [r["step"] for r in log if r["event"] == "batch"] == list(range(start_step + 1, step + 1))
            earlier.update(r["pid"] for r in log)
        return step

    first = run_until_signal(signal.SIGINT, "group", 0, 3)
    assert 3 <= first < max_steps
    second = run_until_signal(signal.SIGTERM, "rank0", first, 2)
    assert first + 2 <= second < max_steps

    run_fit(cfg, "--ckpt_path", "last")
    for rank in (0, 1):
        log = [r for r in read_runlog(tmp_path / "runlog", rank) if r["pid"] not in earlier]
        assert [r["step"] for r in log if r["event"] == "train_start"] == [second]
        assert [r["step"] for r in log if r["event"] == "batch"] == list(range(second + 1, max_steps + 1))
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == max_steps


def _srun_tasks(cmd: list[str], tmp: Path, port: int, restart: int) -> list[subprocess.Popen]:
    """The 2 tasks of one simulated `srun` job step on one node: SLURM's per-task variables (as
    srun sets them; Lightning's SLURMEnvironment reads them and starts no processes itself), a
    fake `scontrol` on PATH that logs its arguments, each task in a process group of its own."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp / 'scontrol.log'}\n")
    scontrol.chmod(0o755)
    tasks = []
    for rank in range(2):
        env = fit_env()
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ditfuse-test",
                   SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="localhost", SLURM_NODEID="0",
                   SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_RESTART_COUNT=str(restart),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        tasks.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return tasks


def _ended(tasks: list[subprocess.Popen], limit: float) -> list[str]:
    outs = []
    for task in tasks:
        try:
            outs.append(task.communicate(timeout=limit)[0])
        except subprocess.TimeoutExpired:
            for t in tasks:
                os.killpg(t.pid, signal.SIGKILL)
            raise AssertionError(f"a task of the step still runs {limit:.0f} s later") from None
    return outs


def test_slurm_requeue_signal_during_validation_saves_one_step_requeues_once_and_the_job_resumes(tmp_path,
                                                                                                  demo_dir):
    """`#SBATCH --signal=SIGUSR1@90` signals every task of the step (and its DataLoader worker),
    each at its own point, here during a validation (one can outlast the 90 s). Lightning's
    handler saved inside the handler, where the DataModule's state gathers every rank's stream
    positions: the ranks hung before writing anything. InterruptCheckpoint agrees on it after
    the validation batch in flight: every rank stops there, hpc_ckpt_1.ckpt holds the step
    before the validation, rank 0 requeues the job once, and the requeued job (the same command,
    no --ckpt_path) continues from that step."""
    plugins = [{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
                "init_args": {"auto_requeue": True, "requeue_signal": "SIGUSR1"}}]  # as ddp_a100.yaml
    cfg = override(tmp_path, demo_dir, max_steps=MAX_STEPS, callbacks=_interrupt_callbacks(tmp_path),
                   plugins=plugins, strategy="ddp", devices=2, limit_val_batches=None, val_check_interval=3,
                   data={"num_workers": 1, "val_samples_per_task": 4, "val_batch_size": 1})  # 12 batches/rank
    cmd = fit_cmd(cfg)
    tasks = _srun_tasks(cmd, tmp_path, free_port(), restart=0)
    events = lambda rank, kind: [r["step"] for r in read_runlog(tmp_path / "runlog", rank) if r["event"] == kind]
    _wait(lambda: events(0, "val_batch"), tasks[0], "the first validation batch")
    os.killpg(tasks[0].pid, signal.SIGUSR1)  # rank 0 and its worker first, rank 1 a moment later
    time.sleep(0.3)
    os.killpg(tasks[1].pid, signal.SIGUSR1)
    outs = _ended(tasks, 120)
    first_pid = tasks[0].pid

    assert tasks[0].returncode == 128 + signal.SIGUSR1, outs[0][-3000:]
    # rank 1 exits 138 too, unless its own signal arrives after the run ended on rank 0's (then,
    # past Lightning's teardown, the signal's default action ends it: the work is saved by then)
    assert tasks[1].returncode in (128 + signal.SIGUSR1, -signal.SIGUSR1), outs[1][-3000:]
    assert not any("Traceback" in out for out in outs), outs[0][-3000:] + outs[1][-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # once, by rank 0
    hpc = tmp_path / "run" / "hpc_ckpt_1.ckpt"
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] == 3
    for rank in (0, 1):  # every rank stopped inside the validation after step 3, at one batch
        assert events(rank, "batch")[-1] == 3 and not events(rank, "val_end")
    assert len(events(0, "val_batch")) == len(events(1, "val_batch")) < 12
    assert f"(SIGUSR1) (during validation) at step 3: saved {hpc}" in outs[0]
    assert "requeued SLURM job 4242" in outs[0]

    requeued = _srun_tasks(cmd, tmp_path, free_port(), restart=1)  # the same command, no --ckpt_path
    outs = _ended(requeued, 300)
    assert [t.returncode for t in requeued] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "hpc_ckpt_1.ckpt" in outs[0]  # Lightning restored the preemption checkpoint
    assert events(1, "train_start") == [0, 3]
    # Lightning does not repeat the interrupted validation (step 3 has no val/ point); the next
    # one runs whole on both ranks, and training goes on from the checkpointed step
    assert events(0, "val_end") == events(1, "val_end") == [6]
    _check_resumed(tmp_path, 3, first_pid, overlap=False)


def _survivor_out(proc: subprocess.Popen, limit: float = 80) -> str:
    """rank 0's output once it has exited (a stopped rank 1 keeps the shared pipe open)."""
    proc.wait(timeout=limit)
    os.set_blocking(proc.stdout.fileno(), False)
    return proc.stdout.read() or ""


@pytest.mark.parametrize("killed, sig", [(0, signal.SIGKILL), (1, signal.SIGKILL), (1, signal.SIGSTOP)],
                         ids=["rank0-dies", "rank1-dies", "rank1-hangs"])
def test_ddp_a_rank_that_dies_ends_the_survivor_within_the_timeout_with_one_line(tmp_path, demo_dir, killed, sig):
    """SIGKILL one of 2 gloo ranks mid-run (a lost node), or SIGSTOP it (a hung node): the
    survivor does not wait forever; it exits within the strategy's process-group timeout
    (trainer.strategy.timeout; a dead peer's closed socket ends it sooner) with one line naming
    the lost rank."""
    timeout_s = 20
    strategy = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                "init_args": {"timeout": f"0:00:{timeout_s}"}}
    cfg = override(tmp_path, demo_dir, max_steps=200, strategy=strategy, devices=2)
    proc = _start_group(fit_cmd(cfg))
    both_ran = lambda n: all(len(_batches(read_runlog(tmp_path / "runlog", r), None)) >= n for r in (0, 1))
    _wait(lambda: both_ran(2), proc, "2 training steps on both ranks")
    victim = _batches(read_runlog(tmp_path / "runlog", killed), None)[-1]["pid"]
    os.kill(victim, sig)
    t0 = time.time()
    try:  # both ranks write to the pipe: it closes when the survivor has exited too
        out, _ = proc.communicate(timeout=timeout_s + 60) if sig == signal.SIGKILL else (_survivor_out(proc), None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"rank {1 - killed} still running {timeout_s + 60} s after rank {killed} died") from None
    finally:
        if sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGKILL)  # the stopped rank still holds the pipe
    took = time.time() - t0
    assert took < timeout_s + 60
    said = [ln for ln in out.splitlines() if "error:" in ln and f"rank {killed} of 2 was lost" in ln]
    assert len(said) == 1 and "Traceback" not in out, out[-3000:]
    print(f"\n[rank lost] rank {killed} {sig.name}: rank {1 - killed} exited {took:.1f} s later: {said[0]}")
