"""benchmarks/gpu_check.sh --cpu-dry-run: every part of the prepared GPU check runs on CPU at tiny
sizes and writes its JSON and markdown table, so the script is ready for the next GPU session."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_dry_run_writes_every_figure(tmp_path, demo_dir):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--demo-dir",
                          str(demo_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert out["dry_run"] and out["device"] == "cpu"
    assert [f["size"] for f in out["fuse_latency"]] == ["64x48", "80x64"]
    assert all(f["seconds"] > 0 and f["output"][:2] == [int(f["size"].split("x")[1]), int(f["size"].split("x")[0])]
               for f in out["fuse_latency"])
    assert set(out["sdpa_kernels"]) == {"train (fwd+bwd)", "prefill (condition rows)", "denoising step (output rows)"}
    assert all(any("attention" in k for k in ks) for ks in out["sdpa_kernels"].values())
    t = out["train_step"]
    assert t["tokens_per_s"] > 0 and t["trainable_params"] > 0
    assert out["fit"]["rc"] == 0 and out["fit"]["global_step"] == 2 and out["fit"]["trainable_params"] > 0
    for name in ("default bf16", "official bf16"):
        assert math.isfinite(out["official_vs_fp32"][name]["max_abs_uint8"])
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "CPU DRY RUN" in table and "| ditfuse fit, 2 steps" in table
