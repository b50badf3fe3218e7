"""Sampling speed against the original OmniGen/DiTFuse code, same random weights, side by side.

    PYTHONPATH=$PWD python benchmarks/vs_original.py --original-python /tmp/venv45/bin/python \
        --original-src /path/to/DiTFuse [--layers 1] [--rounds 1] [--steps 10] [--size 256] [--flops]

Builds one random model of OmniGen-v1 width (hidden 3072, 32 heads, MLP 8192, Phi-3 "su" RoPE
with OmniGen-v1's 4096-position switch; `--layers` deep, vocabulary cut to the stand-in
tokenizers' ids, 1024, which changes no compute) in the original layout (tests/_release.py pieces),
writes two random 256x256 inputs and fuses them, 10 steps, guidance 2.0 / 1.6 (three branches),
seed 0, fp32, in fresh processes, interleaved round by round:

- `orig_test_py`: the original `OmniGenPipeline` called as DiTFuse's test.py calls it
  (separate_cfg_infer=True). test.py leaves `use_kv_cache` at True, but the original's
  OmniGenCache raises without a GPU, so on CPU this runs with the cache off (what a CPU user gets);
- `orig_kv`: the original with its own KV cache (offload off). On CPU only through a harness shim
  that removes OmniGenCache's GPU guard and its unused prefetch stream (nothing else changes);
- `ours_kv_batched`: this project (`--official` settings: test.py's resize rule, bf16-free fp32
  here), exact KV cache, the three branches batched in one call;
- `ours_kv_sequential`: the same with one branch per call.

Per job: process CPU time of the fuse call (wall too), peak RSS during it (VmHWM, reset after
loading) and RSS after loading, so `peak - loaded` is the sampling working set. Ratios are of median CPU times. The
agreement check compares the written 8-bit images with `orig_test_py` (the original's cache is
not exact: issue 11). `--flops` adds one untimed pass per job under torch's FlopCounterMode and
this machine's fp32 matmul peak (benchmarks/_child.py `gemm_peak`): the GFLOP each code runs, its
GFLOP per CPU-second, and the largest speed-up ours could show if it ran every FLOP at that peak
(FLOP count / peak is the least CPU time of any exact fp32 implementation of the same arithmetic).
The last line is a JSON object with every figure. The original needs its
transformers 4.45-era pins: benchmarks/setup_original_env.sh makes that venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _child import FLOP_COUNT, MEMORY_PROBES, gemm_peak

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, HEADS, MLP = 3072, 32, 8192  # OmniGen-v1 (Phi-3 mini)

COMMON = r"""
import json, os, resource, sys, time
import torch
cfg = json.loads(sys.argv[-1])
torch.set_num_threads(cfg["threads"])
""" + MEMORY_PROBES + FLOP_COUNT + r"""
def timed(fn):
    if cfg.get("flops"):  # the counting pass: not timed
        return count_flops(fn)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}
def report(stats, loaded):
    stats.update(loaded_MiB=loaded, peak_MiB=status_mib("VmHWM"),
                 threads=torch.get_num_threads())
    print("RESULT " + json.dumps(stats))
"""

ORIGINAL = COMMON + r"""
sys.path.insert(0, cfg["src"])
from PIL import Image
from OmniGen import OmniGenPipeline
import OmniGen.scheduler as S
from test import prepare_image_for_model, image_to_bytesio
if cfg["kv"] and not torch.cuda.is_available():
    # Shim: OmniGenCache refuses without a GPU only because of its offload prefetch stream; with
    # offload off it is a DynamicCache that keeps the condition tokens' K/V.
    def cpu_init(self, num_tokens_for_img, offload_kv_cache=False):
        S.DynamicCache.__init__(self)
        self.original_device, self.num_tokens_for_img, self.offload_kv_cache = [], num_tokens_for_img, False
    S.OmniGenCache.__init__ = cpu_init
pipe = OmniGenPipeline.from_pretrained(cfg["model"])
a = prepare_image_for_model(Image.open(cfg["image1"]).convert("RGB"), max_side=cfg["size"])
b = prepare_image_for_model(Image.open(cfg["image2"]).convert("RGB"), max_side=cfg["size"])
loaded = rss_mib()
img, stats = timed(lambda: pipe(prompt=cfg["prompt"], input_images=[image_to_bytesio(a), image_to_bytesio(b)],
                               height=a.size[1], width=a.size[0], num_inference_steps=cfg["steps"],
                               guidance_scale=2.0, img_guidance_scale=1.6, separate_cfg_infer=True,
                               use_kv_cache=cfg["kv"], offload_kv_cache=False, seed=0, dtype=torch.float32)[0])
img.save(cfg["out"])
report(stats, loaded)
"""

OURS = COMMON + r"""
from PIL import Image
from ditfuse.core.images import read_image
from ditfuse.pipeline import FusionPipeline
from ditfuse.sampling.sampler import SamplerSettings
s = SamplerSettings(steps=cfg["steps"], guidance_scale=2.0, img_guidance_scale=1.6, kv_cache=cfg["kv"],
                    batch_branches=cfg["batched"], seed=0, noise="device", state="model")  # as --official
pipe = FusionPipeline.load(model=cfg["model"], device="cpu", dtype="fp32", max_side=cfg["size"], sampler=s,
                           official=True)
a, b = read_image(cfg["image1"]), read_image(cfg["image2"])
loaded = rss_mib()
img, stats = timed(lambda: pipe.fuse(a, b, cfg["prompt"]))
Image.fromarray(img).save(cfg["out"])
report(stats, loaded)
"""

JOBS = {  # name: (code, settings)
    "orig_test_py": ("original", {"kv": False}),
    "orig_kv": ("original", {"kv": True}),
    "ours_kv_batched": ("ours", {"kv": True, "batched": True}),
    "ours_kv_sequential": ("ours", {"kv": True, "batched": False}),
}


def write_model(folder: Path, layers: int) -> Path:
    """Original-layout OmniGen-v1-width folder with random weights of OmniGen's scale (std 0.02)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _release import RELEASE_PHI3, write_tokenizer, write_vae
    from _tiny_checkpoints import random_original_state_dict
    from safetensors.torch import save_file

    half = HIDDEN // HEADS // 2
    cfg = {**RELEASE_PHI3, "hidden_size": HIDDEN, "intermediate_size": MLP, "num_hidden_layers": layers,
           "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "max_position_embeddings": 131072,
           "vocab_size": 1024,  # >= the stand-in tokenizer (192) and ditfuse's BuiltinTokenizer (train_step.py)
           "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "su", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                            "long_factor": [1.0 + 0.5 * i for i in range(half)]}}
    if (folder / "model.safetensors").is_file():
        return folder
    sd = random_original_state_dict(0, cfg)
    for k, v in sd.items():  # the helper's 0.2 std suits width 32; OmniGen's own scale is 0.02
        if not (k.endswith("layernorm.weight") or k == "llm.norm.weight"):
            sd[k] = v * (0.02 if k.startswith("final_layer.linear") else 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(folder)
    write_vae(folder / "vae")
    return folder


def run_job(name: str, args, base: dict, work: Path, flops: bool = False) -> dict:
    code, extra = JOBS[name]
    cfg = {**base, **extra, "flops": flops, "out": str(work / (f"{name}_flops.png" if flops else f"{name}.png"))}
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "OMP_NUM_THREADS": str(args.threads), "HOME": os.environ.get("HOME", "/tmp")}
    if code == "original":
        cmd = [args.original_python, "-c", ORIGINAL, json.dumps(cfg)]
    else:
        cmd = [sys.executable, "-c", OURS, json.dumps(cfg)]
        env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{name} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def compare(a: Path, b: Path) -> dict:
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB")).astype(np.float64) for p in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return {"max_abs_255": int(np.abs(x - y).max()), "mean_abs_255": float(np.abs(x - y).mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-python", required=True, help="a Python with the original's pins (setup_original_env.sh)")
    p.add_argument("--original-src", required=True, help="DiTFuse sources: its OmniGen/ folder and test.py")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the issue's table: 3)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", default=",".join(JOBS), help=f"subset of {','.join(JOBS)}")
    p.add_argument("--work", default=None, help="folder for the model and images (kept; reused)")
    p.add_argument("--flops", action="store_true",
                   help="also one untimed pass per job under torch's FlopCounterMode: the matmul and attention "
                        "GFLOP each code runs, so a speed-up reads as fewer FLOPs or more FLOP/s")
    args = p.parse_args()
    names = args.jobs.split(",")
    if unknown := [n for n in names if n not in JOBS]:
        raise SystemExit(f"--jobs: unknown {unknown}; choose from {list(JOBS)}")
    from PIL import Image

    from ditfuse.core import prompts as P

    work = Path(args.work or tempfile.mkdtemp(prefix="vs_original_"))
    model = write_model(work / "OmniGen-v1-width", args.layers)
    g = np.random.default_rng(0)
    for k in (1, 2):
        Image.fromarray(g.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(work / f"in{k}.png")
    base = {"src": args.original_src, "model": str(model), "image1": str(work / "in1.png"),
            "image2": str(work / "in2.png"), "prompt": P.default_prompt("ivif"), "size": args.size,
            "steps": args.steps, "threads": args.threads}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            runs[n].append(run_job(n, args, base, work))
            print(f"round {r + 1} {n}: {runs[n][-1]}", flush=True)
    counted = {n: run_job(n, args, base, work, flops=True) for n in names} if args.flops else {}
    for n, c in counted.items():
        print(f"FLOPs {n}: {c['gflop']:.0f} GFLOP {c['gflop_by_op']}", flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in ("cpu_s", "wall_s", "peak_MiB", "loaded_MiB")}
           for n, v in runs.items()}
    ratios = {f"{o}/{u}": med[o]["cpu_s"] / med[u]["cpu_s"] for o in names if o.startswith("orig")
              for u in names if u.startswith("ours")}
    ref = "orig_test_py" if "orig_test_py" in names else names[0]
    agree = {n: compare(work / f"{n}.png", work / f"{ref}.png") for n in names if n != ref}
    print(f"work folder {work}; {args.layers} layer(s) at hidden {HIDDEN}, {args.size}px pair, {args.steps} steps, "
          f"3 branches, fp32, {args.threads} threads, median of {args.rounds} round(s), process CPU time")
    for n in names:
        m = med[n]
        print(f"  {n:20s} {m['cpu_s']:8.1f} s CPU {m['wall_s']:8.1f} s wall  peak {m['peak_MiB']:7.0f} MiB "
              f"(+{m['peak_MiB'] - m['loaded_MiB']:.0f} over loaded)")
    for k, v in ratios.items():
        print(f"  speed-up {k}: {v:.2f}x")
    for n, v in agree.items():
        print(f"  agreement {n} vs {ref}: {v}")
    flop = {}
    if counted:
        peak = gemm_peak(args.threads, hidden=HIDDEN, mlp=MLP)
        flop = {"gemm_peak_gflop_per_cpu_s": peak, "gflop": {n: c["gflop"] for n, c in counted.items()},
                "gflop_per_cpu_s": {n: counted[n]["gflop"] / med[n]["cpu_s"] for n in names},
                "flop_ratio": {k: counted[k.split("/")[0]]["gflop"] / counted[k.split("/")[1]]["gflop"] for k in ratios}}
        print("  FLOPs (torch FlopCounterMode: matmuls, convolutions, attention; elementwise ops not counted):")
        for n in names:
            print(f"    {n:20s} {flop['gflop'][n]:8.0f} GFLOP  {flop['gflop_per_cpu_s'][n]:6.1f} GFLOP per CPU-s")
        flop["max_speedup_at_gemm_peak"] = {k: med[k.split("/")[0]]["cpu_s"] / (flop["gflop"][k.split("/")[1]] / peak)
                                            for k in ratios}
        print(f"    this machine's fp32 matmul peak: {peak:.1f} GFLOP per CPU-s ({args.threads} threads)")
        for k, v in flop["flop_ratio"].items():
            print(f"    {k}: FLOP ratio {v:.2f}x (the speed-up at equal GFLOP per CPU-s; measured {ratios[k]:.2f}x); "
                  f"at most {flop['max_speedup_at_gemm_peak'][k]:.2f}x if ours ran every FLOP at the matmul peak")
    print(json.dumps({"layers": args.layers, "size": args.size, "steps": args.steps, "rounds": args.rounds,
                      "threads": args.threads, "median": med, "cpu_ratio": ratios, "agreement": agree, "flops": flop, "runs": runs}))


if __name__ == "__main__":
    main()
