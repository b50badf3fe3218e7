"""Two-process CPU DDP (gloo): equal steps on both ranks, different data, different noise."""

from __future__ import annotations

import pytest
from _fit import override, run_fit
from _runlog import read_runlog

from callbacks.seeding import RankSeed, step_seed

STEPS = 4


def steps_per_second(records: list[dict]) -> float:
    """Optimizer steps per second between the first and the last batch (start-up excluded)."""
    batches = [r for r in records if r["event"] == "batch"]
    return (len(batches) - 1) / (batches[-1]["t"] - batches[0]["t"])


def test_step_seed_differs_per_rank_and_step():
    seeds = {step_seed(0, r, s, b) for r in range(4) for s in range(50) for b in range(2)}
    assert len(seeds) == 400
    assert step_seed(7, 1, 3, 0) == step_seed(7, 1, 3, 0) != step_seed(8, 1, 3, 0)
    assert RankSeed(seed=5).base_seed() == 5


@pytest.mark.slow
def test_two_process_ddp_fit(tmp_path, demo_dir, capsys):
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    # with a validation at step 2 and InterruptCheckpoint, which all-reduces after every training
    # and validation batch: a rank with more validation batches than the other would hang here
    run_fit(override(ddp, demo_dir, max_steps=STEPS, strategy="ddp", devices=2, limit_val_batches=None,
                     val_check_interval=2, callbacks=[{"class_path": "callbacks.interrupt.InterruptCheckpoint"}],
                     data={"val_samples_per_task": 1, "val_batch_size": 1}))
    ranks = [read_runlog(ddp / "runlog", r) for r in (0, 1)]
    batches = [[r for r in log if r["event"] == "batch"] for log in ranks]
    vals = [[r["step"] for r in log if r["event"] == "val_batch"] for log in ranks]
    assert vals[0] and vals[0] == vals[1] and set(vals[0]) == {2, 4}

    # both ranks ran the same steps, as a world of 2, in different processes
    assert [[b["step"] for b in bs] for bs in batches] == [list(range(1, STEPS + 1))] * 2
    assert {b["world"] for bs in batches for b in bs} == {2}
    assert batches[0][0]["pid"] != batches[1][0]["pid"]
    # different data: no sample key appears on both ranks
    keys = [{k for b in bs for k in b["keys"]} for bs in batches]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    # different noise: torch's global RNG differs between ranks at every step (RankSeed)
    assert all(a["rng"] != b["rng"] for a, b in zip(*batches))

    # (comparing the step rate with one process is a benchmark's job, not a test's: no second,
    # single-process fit here just to print a ratio)
    rates = [steps_per_second(log) for log in ranks]
    with capsys.disabled():
        print(f"\n[ddp] CPU steps/s per rank: {rates[0]:.2f}, {rates[1]:.2f} (2 processes, gloo)")
