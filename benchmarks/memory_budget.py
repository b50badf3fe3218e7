"""Per-GPU memory of the shipped cluster recipes at full OmniGen-v1 depth (ditfuse/model/memory_budget.py:
fake-tensor trace + torch's MemTracker), at the configured per-GPU batch and halved ones, and the
validation of the traced step against a real CPU measurement at 2 layers of OmniGen-v1 width.

Validation: the same training step (bf16 autocast, backward, AdamW) runs for real in a child
process; its measured peak is VmHWM minus the resident size before the step (after a warm-up step
allocated AdamW's state; /proc/self/clear_refs resets VmHWM), with glibc's mmap threshold fixed
at 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the process at once. The prediction is
the trace's peak minus what was resident before (parameters, buffers, optimizer state).

  heavy python benchmarks/memory_budget.py             # table + validation, ~3 min
  heavy python benchmarks/memory_budget.py --no-validate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditfuse.model.memory_budget import GB, Recipe, estimate, recipe_from_configs, trace_step

RECIPES = {"ddp_a100 (LoRA r=8, bf16 base)": "configs/cluster/ddp_a100.yaml",
           "fsdp_a100 (full fine-tune, fp32 sharded)": "configs/cluster/fsdp_a100.yaml"}
CARDS = (80, 40)  # A100 80 GB / 40 GB
HEADROOM = 0.9  # the budget test's 10%

CHILD = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from ditfuse.model.memory_budget import Recipe, build_step
torch.set_num_threads(2)
spec = json.loads(sys.argv[2])
spec["bucket"] = tuple(spec["bucket"])
spec["base_dtype"] = getattr(torch, spec["base_dtype"]) if spec["base_dtype"] else None
step = build_step(Recipe(**spec), spec["num_layers"], fake=False)
step.run()  # warm-up: AdamW state allocated, grads freed again
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
step.run()
print(json.dumps({"delta": kib("VmHWM") - before}))
'''


def measured_delta(recipe: Recipe, layers: int) -> int:
    spec = {k: v for k, v in vars(recipe).items()}
    spec.update(num_layers=layers, bucket=list(recipe.bucket),
                base_dtype=str(recipe.base_dtype).removeprefix("torch.") if recipe.base_dtype else None)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), json.dumps(spec)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["delta"]


def predicted_delta(recipe: Recipe, layers: int) -> int:
    peak = trace_step(recipe, layers)
    return peak["grad"] + peak["act"] + peak["temp"]  # params, buffers, optimizer state were resident


def budget_rows() -> list[dict]:
    rows = []
    for name, overlay in RECIPES.items():
        base = recipe_from_configs(name, ROOT / "configs/omnigen_lora.yaml", ROOT / overlay)
        batch = base.batch_size
        while batch >= 1:
            r = Recipe(**{**vars(base), "batch_size": batch})
            e = estimate(r)
            rows.append({"recipe": name, "batch": batch, "bucket": f"{r.bucket[0]}x{r.bucket[1]}",
                         "tokens": e["tokens"], **{k: e.get(k, 0) / GB for k in
                                                   ("param", "buffer", "grad", "optstate", "gathered", "act", "temp",
                                                    "total")},
                         "configured": batch == base.batch_size})
            batch //= 2
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-validate", action="store_true")
    args = p.parse_args(argv)
    rows = budget_rows()
    print("| recipe | batch/GPU | bucket (tokens/GPU) | params | buffers | grads | Adam | gathered units | "
          "activations | temporaries | total GB | fits 80 GB (<=72) | fits 40 GB (<=36) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = ["yes" if r["total"] <= HEADROOM * c else "no" for c in CARDS]
        print(f"| {r['recipe']}{' (shipped)' if r['configured'] else ''} | {r['batch']} | {r['bucket']} "
              f"({r['tokens']:,}) | {r['param']:.2f} | {r['buffer']:.2f} | {r['grad']:.2f} | {r['optstate']:.2f} | "
              f"{r['gathered']:.2f} | {r['act']:.2f} | {r['temp']:.2f} | {r['total']:.1f} | {fits[0]} | {fits[1]} |")
    checks = []
    if not args.no_validate:
        print("\nvalidation at 1-2 layers of OmniGen-v1 width, 256x256 bucket (3 x 256 image tokens), batch 1:")
        print("| model | predicted (trace) MB | measured (VmHWM) MB | error |")
        print("|---|---|---|---|")
        for name, lora in (("LoRA r=8, bf16 base", 8), ("full fine-tune, fp32", None)):
            base = recipe_from_configs("base", ROOT / "configs/omnigen_lora.yaml")  # base_dtype: bf16
            r = Recipe(name=name, batch_size=1, bucket=(256, 256), lora_r=lora,
                       base_dtype=base.base_dtype if lora else None)
            for layers in (1, 2):
                pred, meas = predicted_delta(r, layers), measured_delta(r, layers)
                err = pred / meas - 1
                checks.append({"model": name, "layers": layers, "predicted_mb": pred / 1e6, "measured_mb": meas / 1e6,
                               "error": err})
                print(f"| {name}, {layers} layer{'s' * (layers > 1)} | {pred / 1e6:.0f} | {meas / 1e6:.0f} | "
                      f"{100 * err:+.1f}% |")
    print(json.dumps({"budgets": rows, "validation": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
