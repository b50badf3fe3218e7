"""Small `ditfuse fit` subprocess runs on the tiny demo config (test_ddp, test_preemption).

The override keeps a run to seconds per step on a shared 2-core CPU: 32 px images, no
validation, no sample grids or metrics callbacks; `RunLog` (tests/_runlog.py) records each
rank's batches; `callbacks.RankSeed` gives the ranks their own noise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def override(tmp: Path, demo_dir: Path, *, max_steps: int, callbacks: list[dict[str, Any]] | None = None,
             data: dict[str, Any] | None = None, **trainer: Any) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "log_every_n_steps": 1, "default_root_dir": str(tmp / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp / "run"), "name": "tb", "version": "v0",
                                     "default_hp_metric": False}},
            "callbacks": [{"class_path": "callbacks.RankSeed"},
                          *(callbacks or []),
                          {"class_path": "_runlog.RunLog", "init_args": {"out": str(tmp / "runlog")}}],
            **trainer,
        },
        "model": {"preset": "tiny"},
        "data": {"demo_dir": str(demo_dir), "image_size": 32, "batch_size": 8, "num_workers": 0,
                 "batches_per_epoch": 50, "val_samples_per_task": 1,
                 "ratios": {"fusion": 0.25, "m3": 0.5, "seg": 0.125, "control": 0.125}, **(data or {})},
    }
    path = tmp / "override.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    """A loopback port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_cmd(config: Path, *extra: str) -> list[str]:
    base = ["--config", str(DEMO)] if DEMO.is_file() else []
    return [sys.executable, "-m", "ditfuse.cli", "fit", *base, "--config", str(config), *extra]


def fit_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), env.get("PYTHONPATH", "")])
    # one intra-op thread per process: DDP ranks get that anyway, so single-process and DDP
    # step rates compare per process; the tiny model gains nothing from more on a shared CPU
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return env


def run_fit(config: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(fit_cmd(config, *extra), cwd=ROOT, env=fit_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res
