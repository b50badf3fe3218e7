"""Validation under DDP (2 gloo processes): the same checkpoint validated on 1 and on 2 ranks logs
the same val/* values, with one batch per task (so the ranks see different tasks) and with an odd
number of batches (so the sampler repeats one), and the sample grids hold every task, chosen by key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from _fit import DEMO, ROOT, fit_env
from test_model_module import hand_batch
from torch.utils.data import DataLoader

from ditfuse.commands.lightning_cli import run_lightning_cli
from ditfuse.core import prompts as P
from ditfuse.module import GlobalMeans, DiTFuseModule, sample_seed, val_metric_names

pytestmark = pytest.mark.xdist_group("val_ddp")  # the module's checkpoint fixture is built once
TASKS = P.TASKS
REL = 1e-4


def test_global_means_skip_unseen_keys_weigh_by_samples_and_drop_repeats():
    means = GlobalMeans(val_metric_names())
    means.reset()
    means.add("val/ivif/psnr", torch.tensor([10.0, 20.0, 30.0]), ["ivif/a", "ivif/b", "ivif/c"])
    means.add("val/ivif/psnr", torch.tensor([40.0]), ["ivif/d"])
    # a batch the distributed sampler repeats (to even out the ranks) counts once
    means.add("val/ivif/psnr", torch.tensor([10.0, 20.0]), ["ivif/a", "ivif/b"])
    assert means.reduce() == {"val/ivif/psnr": 25.0}  # per sample, not per batch; unseen keys absent
    with pytest.raises(KeyError, match="val/nope"):
        means.add("val/nope", torch.tensor([1.0]), ["x"])


def test_sample_seed_is_per_key():
    assert sample_seed(0, "loss", "m3", "a") == sample_seed(0, "loss", "m3", "a")
    assert len({sample_seed(0, "loss", t, k) for t in TASKS for k in "abc"}) == 3 * len(TASKS)


def test_builtin_tokenizer_ids_do_not_depend_on_the_hash_seed():
    """Every rank is its own process with its own PYTHONHASHSEED: the ids must not move."""
    code = ("from ditfuse.model.tokenizer import load_tokenizer; t = load_tokenizer('builtin'); "
            "print(t.id_to_token)")
    outs = {subprocess.run([sys.executable, "-c", code], env={**fit_env(), "PYTHONHASHSEED": str(h)},
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout for h in (1, 2, 3)}
    assert len(outs) == 1


def test_val_values_do_not_depend_on_batch_size_or_order():
    model = DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1},
                          val_sampler={"steps": 2, "guidance_scale": 1.0, "img_guidance_scale": 1.0})
    batch = hand_batch(tasks=("m3", "ivif", "m3", "seg"))

    def run(batches) -> dict[str, float]:
        model._val_means.reset()
        for b in batches:
            model.validation_step(b, 0)
        return model._val_means.reduce()

    whole = run([batch])
    rows = [{k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v[i:i + 1]) for k, v in batch.items()}
            for i in range(4)]
    one_by_one = run(rows[::-1])  # other batch size, other order
    assert whole.keys() == one_by_one.keys() == {"val/loss", "val/psnr", "val/loss/m3", "val/loss/ivif",
                                                 "val/loss/seg", "val/m3/psnr", "val/ivif/psnr",
                                                 "val/seg/psnr", "val/m3/psnr_mean"}
    for k in whole:
        assert abs(whole[k] - one_by_one[k]) <= REL * abs(whole[k]), k


# ---------------------------------------------------------------------------------------------
# 1 rank vs 2 ranks through `ditfuse validate`
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny demo-config model after one training step (the output layers are no longer zero)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    model = DiTFuseModule(preset="tiny")
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp)
    trainer.fit(model, DataLoader([hand_batch(size=32)], batch_size=None))
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def _validate(tmp: Path, ckpt: Path, devices: int, data: dict, callbacks: list[dict]) -> list[dict]:
    cfg = {
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp), "name": "tb", "version": "v0", "default_hp_metric": False}},
            "callbacks": [*callbacks, {"class_path": "callbacks.fusion_metrics.FusionMetrics"},
                          {"class_path": "_valrecord.ValRecord", "init_args": {"out": str(tmp / "record")}}],
        },
        "model": {"val_sampler": {"steps": 4}},
        "data": {"num_workers": 0, **data},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    override = tmp / "override.yaml"
    override.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["validate", "--config", str(DEMO), "--config", str(override), "--ckpt_path", str(ckpt)]
    if devices == 1:  # in this process: a fresh interpreter's start-up is most of a 1-rank validate
        run_lightning_cli(args)
    else:  # Lightning's DDP launcher re-runs the command line for rank 1
        res = subprocess.run([sys.executable, "-m", "ditfuse.cli", *args], cwd=ROOT, env=fit_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return [json.loads((tmp / "record" / f"rank{r}.json").read_text()) for r in range(devices)]


def _same_val_keys(one: dict, two: list[dict], capsys, layout: str) -> dict[str, float]:
    """Every rank of the 2-rank run logged the 1-rank run's val/* keys, all with its values."""
    val = {k: v for k, v in one["metrics"].items() if k.startswith("val/")}
    for rank in two:  # every rank logged the same keys, all of them global means
        got = {k: v for k, v in rank["metrics"].items() if k.startswith("val/")}
        assert got.keys() == val.keys()
        bad = {k: (val[k], got[k]) for k in val if abs(got[k] - val[k]) > REL * max(abs(val[k]), 1e-6)}
        assert not bad, bad
        worst = max(abs(got[k] - val[k]) / max(abs(val[k]), 1e-6) for k in val)
        with capsys.disabled():
            print(f"\n[val-ddp {layout}] rank {rank['rank']}: {len(val)} val/* keys, max relative difference "
                  f"1 vs 2 ranks {worst:.1e}; val/loss {got['val/loss']:.6f} vs {val['val/loss']:.6f}")
    return val


@pytest.mark.slow
def test_one_and_two_ranks_log_the_same_val_values(tmp_path, demo_dir, checkpoint, capsys):
    # the case: 2 samples per task in batches of 2 = one batch per task
    data = {"demo_dir": str(demo_dir), "val_samples_per_task": 2, "val_batch_size": 2}
    grid = [{"class_path": "callbacks.samples.SampleGrid", "init_args": {"num_samples": 2}}]
    (one,) = _validate(tmp_path / "one", checkpoint, 1, data, grid)
    two = _validate(tmp_path / "two", checkpoint, 2, data, grid)

    # one batch per task, dealt out over the ranks: each rank saw only some tasks
    seen = [{t for b in r["batches"] for t in b["tasks"]} for r in two]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {t for b in one["batches"] for t in b["tasks"]} == set(TASKS)

    val = _same_val_keys(one, two, capsys, "one batch per task")
    assert {f"val/{t}/psnr" for t in TASKS} | {"val/loss", "val/m3/PSNR", "val/seg/miou"} <= set(val)

    # sample grids: every task, the same samples (smallest keys) as on one rank, in TensorBoard
    assert two[0]["grids"] == one["grids"] and set(one["grids"]) == set(TASKS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "two" / "tb" / "v0"), size_guidance={"images": 0})
    events.Reload()
    assert {f"samples/{t}" for t in TASKS} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_a_batch_repeated_to_even_out_the_ranks_counts_once(tmp_path, demo_dir, checkpoint, capsys):
    """An odd number of validation batches: Lightning's distributed sampler gives rank 1 a copy
    of batch 0. The module's val/*, FusionMetrics and IQAMetrics merge by sample id: every val/
    key of 2 ranks equals the 1-rank value."""
    from _tiny_iqa import make_tiny_iqa_weights

    # fusion only: 3 tasks x 5 samples in batches of 2 (2 + 2 + 1) = 9 batches
    data = {"demo_dir": None, "ratios": {"fusion": 1.0}, "val_samples_per_task": 5, "val_batch_size": 2,
            "shards": {"fusion": str(demo_dir / "train" / "fusion")},
            "val_shards": {"fusion": str(demo_dir / "val" / "fusion")}}
    iqa = [{"class_path": "callbacks.iqa.IQAMetrics",
            "init_args": {"weights_dir": str(make_tiny_iqa_weights(tmp_path / "iqa")), "maniqa_crops": 1}}]
    (one,) = _validate(tmp_path / "one", checkpoint, 1, data, iqa)
    two = _validate(tmp_path / "two", checkpoint, 2, data, iqa)

    assert len(one["batches"]) == 9 and [len(r["batches"]) for r in two] == [5, 5]
    assert two[1]["batches"][-1] == one["batches"][0]  # the repeated batch: 2 of ivif's 5 samples twice
    val = _same_val_keys(one, two, capsys, "odd, repeated batch")
    assert {"val/ivif/PSNR", "val/ivif/ref_psnr", "val/ivif/clipiqa", "val/ivif/maniqa", "val/ivif/psnr"} <= set(val)
