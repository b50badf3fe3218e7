"""`ditfuse fit` through LightningCLI: every shipped YAML parses (--print_config), a short fit on
the demo shards, resume from last.ckpt (step count, optimizer, LR schedule), the full demo (slow)."""

from __future__ import annotations

import glob
import time
from pathlib import Path

import pytest
import torch

from ditfuse.lightning_cli import run_lightning_cli

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


def _short_fit_args(tmp: Path, max_steps: int) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/demo.yaml"),
            f"--data.demo_dir={tmp / 'demo'}", f"--trainer.default_root_dir={tmp / 'run'}",
            f"--trainer.logger.init_args.save_dir={tmp / 'run'}", f"--trainer.max_steps={max_steps}",
            "--data.batches_per_epoch=2", "--data.batch_size=2", "--data.val_batch_size=6",
            "--data.val_samples_per_task=1", "--data.image_size=16", "--data.num_workers=0",
            "--model.model_overrides={num_layers: 1}", "--model.val_sampler.steps=2",
            "--trainer.log_every_n_steps=1"]


def test_short_fit_then_resume(tmp_path):
    cli = run_lightning_cli(_short_fit_args(tmp_path, 2))
    assert cli.trainer.global_step == 2
    m = cli.trainer.callback_metrics
    assert "val/m3/psnr" in m and "val/m3/psnr_mean" in m and "train/loss" in m
    last = glob.glob(str(tmp_path / "run" / "**" / "last.ckpt"), recursive=True)
    assert len(last) == 1
    assert glob.glob(str(tmp_path / "run" / "**" / "config.yaml"), recursive=True)
    ckpt = torch.load(last[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lr_schedulers"][0]["last_epoch"] == 2

    cli = run_lightning_cli([*_short_fit_args(tmp_path, 4), f"--ckpt_path={last[0]}"])
    trainer = cli.trainer
    assert trainer.global_step == 4  # continued, not restarted
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    opt = trainer.optimizers[0]
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {4}  # AdamW moments came back from the checkpoint


def test_bad_model_path_fails_before_building(tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_lightning_cli(["fit", "--config", str(ROOT / "configs/omnigen_lora.yaml"),
                           f"--model.pretrained={tmp_path / 'missing'}"])
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_demo_reaches_margin(tmp_path):
    """The acceptance run: configs/demo.yaml as shipped; val/m3/psnr >= val/m3/psnr_mean + 5 dB."""
    t0 = time.time()
    cli = run_lightning_cli(["fit", "--config", str(ROOT / "configs/demo.yaml"),
                             f"--data.demo_dir={tmp_path / 'demo'}", f"--trainer.default_root_dir={tmp_path / 'run'}",
                             f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}"])
    m = cli.trainer.callback_metrics
    psnr, mean = float(m["val/m3/psnr"]), float(m["val/m3/psnr_mean"])
    print(f"demo: val/m3/psnr {psnr:.2f} dB, val/m3/psnr_mean {mean:.2f} dB, {time.time() - t0:.0f} s")
    assert psnr >= mean + 5.0
