"""`ditfuse fit` through LightningCLI: every shipped YAML parses (--print_config), a short fit on
the demo shards whose outputs all live under --trainer.default_root_dir, `--ckpt_path last`
continuing that run (step count, optimizer, LR schedule, same version folder), own fusion-only
data on the shipped config, predict on CPU, the full demo (slow)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from test_checkpoint_io import _full_disk_after

from ditfuse import checkpoint_io
from ditfuse.checkpoint_io import AtomicCheckpointIO
from ditfuse.cli import main as ditfuse_main
from ditfuse.commands.lightning_cli import ConfigError, run_lightning_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
BASES = {"configs/demo.yaml", "configs/omnigen_lora.yaml"}


def _argv_for(config: str) -> list[str]:
    """How a config is meant to be used: bases alone, add-ons after omnigen_lora.yaml,
    predict.yaml with `predict`."""
    if config.endswith("predict.yaml"):
        return ["predict", "--config", config]
    if config in BASES:
        return ["fit", "--config", config]
    return ["fit", "--config", "configs/omnigen_lora.yaml", "--config", config]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_parses(config, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli([*_argv_for(config), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


def _short_fit_args(tmp: Path, max_steps: int, *extra: str) -> list[str]:
    """configs/demo.yaml shrunk to seconds; every output goes to --trainer.default_root_dir alone."""
    return ["fit", "--config", str(ROOT / "configs/demo.yaml"),
            f"--data.demo_dir={tmp / 'demo'}", f"--trainer.default_root_dir={tmp / 'run'}",
            f"--trainer.max_steps={max_steps}",
            "--data.batches_per_epoch=2", "--data.batch_size=2", "--data.val_batch_size=6",
            "--data.val_samples_per_task=1", "--data.image_size=16", "--data.num_workers=0",
            "--model.model_overrides={num_layers: 1}", "--model.val_sampler.steps=2",
            "--trainer.log_every_n_steps=1", "--trainer.enable_model_summary=false", *extra]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_default_root_dir_holds_every_output_and_ckpt_path_last_continues_the_run(tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the shipped config's relative paths (runs/demo, data/demo) would land here
    cli = run_lightning_cli(_short_fit_args(tmp_path, 2))
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    assert "val/m3/psnr" in m and "val/m3/psnr_mean" in m and "train/loss" in m
    files = _files(tmp_path / "run")
    assert {"tb/version_0/config.yaml", "tb/version_0/checkpoints/last.ckpt"} <= files
    assert any(f.startswith("tb/version_0/events.out.tfevents") for f in files)
    assert any(f.startswith("tb/version_0/checkpoints/best-step") for f in files)  # monitor val/loss
    assert not any(cwd.iterdir())  # nothing written outside default_root_dir
    last = tmp_path / "run" / "tb" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lr_schedulers"][0]["last_epoch"] == 2

    # the same command + --ckpt_path last: the newest run continues (same version folder, step 2 -> 4)
    cli = run_lightning_cli(_short_fit_args(tmp_path, 4, "--ckpt_path=last"))
    trainer = cli.trainer
    assert trainer.global_step == 4  # continued, not restarted
    assert Path(trainer.log_dir) == tmp_path / "run" / "tb" / "version_0"
    assert sorted(p.name for p in (tmp_path / "run" / "tb").iterdir()) == ["version_0"]
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {4}  # AdamW moments came back from the checkpoint
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert not (last.parent / "last-v1.ckpt").exists()

    # checkpoints are written atomically: a save that fails (a full disk) ends the run with one
    # line naming the file; last.ckpt still loads and holds step 4
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    monkeypatch.setattr(checkpoint_io.torch, "save", _full_disk_after(100))
    capsys.readouterr()
    assert ditfuse_main(_short_fit_args(tmp_path, 6, "--ckpt_path=last")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "could not write checkpoint" in err[-1] and "No space left on device" in err[-1], err[-5:]
    monkeypatch.undo()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name]


def test_demo_config_with_fusion_only_data_validates_and_checkpoints(tmp_path, demo_dir, capsys):
    """Own data on the shipped config: only fusion shards, no m3 -> no val/m3/* keys are logged;
    the checkpoint monitor (val/loss) is a key every run logs."""
    own = tmp_path / "fusion_only.yaml"
    own.write_text(f"data:\n  demo_dir: null\n  ratios: {{fusion: 1.0}}\n"
                   f"  shards: {{fusion: {demo_dir / 'train' / 'fusion'}}}\n"
                   f"  val_shards: {{fusion: {demo_dir / 'val' / 'fusion'}}}\n")
    args = _short_fit_args(tmp_path, 2)
    args[3:3] = ["--config", str(own)]
    cli = run_lightning_cli(args)
    assert cli.trainer.global_step == 2
    assert "val/loss" in cli.trainer.callback_metrics
    assert not any(k.startswith("val/m3/") for k in cli.trainer.callback_metrics)
    ckpts = _files(tmp_path / "run" / "tb" / "version_0" / "checkpoints")
    assert "last.ckpt" in ckpts and any(c.startswith("best-step2-valloss") for c in ckpts)
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'run' / 'tb' / 'version_0'}" in out
    assert "global batch 2 (world size 1 x data.batch_size 2 x accumulate_grad_batches 1)" in out


def test_predict_with_the_shipped_config_runs_on_cpu(tmp_path):
    """configs/predict.yaml as shipped (precision null, accelerator auto) on a CPU-only machine:
    precision follows the device (32-true here; bf16-mixed autocast on CPU breaks the model)."""
    import cv2
    import numpy as np

    from ditfuse.cli import main as ditfuse

    rng = np.random.default_rng(0)
    for sub in ("image1", "image2"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "pairs" / sub / "a.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    out = tmp_path / "fused"
    rc = ditfuse(["predict", "--config", str(ROOT / "configs/predict.yaml"), "--model.preset=tiny",
                  "--model.val_sampler.steps=1", f"--data.pairs_dir={tmp_path / 'pairs'}", "--data.num_workers=0",
                  f"--trainer.callbacks.output_dir={out}", "--trainer.enable_progress_bar=false"])
    assert rc == 0
    assert [p.name for p in out.iterdir()] == ["a.png"]


def test_precision_null_follows_the_device():
    from jsonargparse import Namespace

    from ditfuse.commands.lightning_cli import resolve_precision

    for accelerator in ("auto", "cpu"):
        trainer = Namespace(accelerator=accelerator, precision=None)
        resolve_precision(trainer)
        assert trainer.precision == ("bf16-mixed" if accelerator == "auto" and torch.cuda.is_available()
                                     else "32-true")
    trainer = Namespace(accelerator="cpu", precision="bf16-mixed")
    resolve_precision(trainer)
    assert trainer.precision == "bf16-mixed"  # an explicit choice is kept


def test_bad_model_path_fails_before_building(tmp_path):
    t0 = time.time()
    with pytest.raises(ConfigError, match="does not exist"):
        run_lightning_cli(["fit", "--config", str(ROOT / "configs/omnigen_lora.yaml"),
                           f"--model.pretrained={tmp_path / 'missing'}"])
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_demo_reaches_margin(tmp_path):
    """The acceptance run: configs/demo.yaml as shipped; val/m3/psnr >= val/m3/psnr_mean + 5 dB."""
    t0 = time.time()
    cli = run_lightning_cli(["fit", "--config", str(ROOT / "configs/demo.yaml"),
                             f"--data.demo_dir={tmp_path / 'demo'}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    m = cli.trainer.callback_metrics
    psnr, mean = float(m["val/m3/psnr"]), float(m["val/m3/psnr_mean"])
    print(f"demo: val/m3/psnr {psnr:.2f} dB, val/m3/psnr_mean {mean:.2f} dB, {time.time() - t0:.0f} s")
    assert psnr >= mean + 5.0
