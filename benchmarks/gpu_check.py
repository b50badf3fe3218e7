"""The GPU figures a fresh GPU machine with little time on it should produce, in one run (<= 8 min):
run by benchmarks/gpu_check.sh, which is the command to type. Every figure goes to
OUT/gpu_check.json and OUT/gpu_check.md (a markdown table).

  1. fuse latency, 50 steps, bf16, full size (random weights: latency does not depend on values),
     at 640x480 and 1024x768, KV cache and batched guidance branches (the defaults)
  2. the sdpa kernel each attention path picked (training forward/backward, condition prefill,
     denoising step), from the profiler's aten ops
  3. LoRA train step at 1024 px with gradient checkpointing: time, tokens/s, peak memory
  4. `ditfuse fit` of the full-size folder for a few steps under bf16-mixed (the CLI, as a user)
  5. `--official` (bf16) vs the default path in fp32 and bf16 on one pair: PSNR and max difference

--cpu-dry-run runs every part on CPU at tiny sizes on the tests' tiny release folder, so the
fast test suite keeps this script working (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
SDPA_OPS = ("flash", "efficient", "cudnn", "math", "flash_attention_for_cpu")


def sizes(dry: bool) -> dict:
    if dry:  # tiny release: pixel-size multiples of 16 (8x VAE x 2x2 patches), seconds on CPU
        return {"fuse": [(48, 64), (64, 80)], "steps": 2, "train_px": 64, "fit_bucket": 32, "fit_steps": 2,
                "official_side": 64}
    return {"fuse": [(480, 640), (768, 1024)], "steps": 50, "train_px": 1024, "fit_bucket": 512, "fit_steps": 3,
            "official_side": 1024}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def images(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return tuple(g.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2))


def fuse_latency(folder: Path, dev: torch.device, cfg: dict) -> list[dict]:
    from dataclasses import replace

    from ditfuse.pipeline import FusionPipeline, check_max_side
    from ditfuse.core.prompts import default_prompt
    from ditfuse.sampling.sampler import SamplerSettings

    settings = SamplerSettings(steps=cfg["steps"], guidance_scale=2.5, img_guidance_scale=1.6, seed=0)
    pipe = FusionPipeline.load(model=str(folder), device=str(dev), dtype="bf16", sampler=settings)
    out = []
    for h, w in cfg["fuse"]:
        pipe.max_side = check_max_side(pipe.module, max(h, w))
        a, b = images(h, w)
        pipe.sampler = replace(settings, steps=2)
        pipe.fuse(a, b, default_prompt("ivif"))  # warm-up at this size: kernels, allocator
        pipe.sampler = settings
        sync(dev)
        peak_reset(dev)
        t0 = time.perf_counter()
        fused = pipe.fuse(a, b, default_prompt("ivif"))
        sync(dev)
        sec = time.perf_counter() - t0
        out.append({"size": f"{w}x{h}", "steps": cfg["steps"], "seconds": sec, "s_per_step": sec / cfg["steps"],
                    "peak_gib": peak_gib(dev), "output": list(fused.shape)})
    del pipe
    return out


def sdpa_kernels(fn) -> list[str]:
    """aten sdpa kernels run by fn() (profiler op names)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    kernels = ("aten::_efficient_attention", "aten::_flash_attention", "aten::_cudnn_attention")
    return sorted(n for n in names if "scaled_dot_product" in n or n.startswith(kernels))


def train_module(folder: Path, dev: torch.device, checkpointing: bool = True):
    from ditfuse.model.lora import LoraSettings
    from ditfuse.module import DiTFuseModule

    m = DiTFuseModule(preset="omnigen-v1", pretrained=str(folder), lora=LoraSettings(r=8, alpha=8.0),
                      base_dtype="bf16", gradient_checkpointing=checkpointing)
    return m.to(dev).train()


def train_batch(px: int, batch: int = 1) -> dict:
    from ditfuse.core.prompts import default_prompt

    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(batch, 2, 3, px, px, generator=g) * 2 - 1,
            "target": torch.rand(batch, 3, px, px, generator=g) * 2 - 1, "prompt": [default_prompt("ivif")] * batch}


def train_step_figures(folder: Path, dev: torch.device, cfg: dict) -> tuple[dict, dict]:
    m = train_module(folder, dev)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    batch = train_batch(cfg["train_px"])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = m.flow_loss(batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    sync(dev)
    peak_reset(dev)
    n = 3
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    sec = (time.perf_counter() - t0) / n
    tokens = 3 * (cfg["train_px"] // 16) ** 2  # 2 input images + the output, text not counted
    kernels = {"train (fwd+bwd)": sdpa_kernels(step)}
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    fig = {"px": cfg["train_px"], "batch": 1, "image_tokens": tokens, "s_per_step": sec, "tokens_per_s": tokens / sec,
           "peak_gib": peak_gib(dev), "trainable_params": trainable, "gradient_checkpointing": True}
    return fig, kernels


def inference_kernels(folder: Path, dev: torch.device, cfg: dict) -> dict:
    """Kernels of the condition prefill (masked prefix rows) and of one denoising step (output rows)."""
    from ditfuse.model.conditioning import build_conditioning
    from ditfuse.module import DiTFuseModule
    from ditfuse.core.prompts import default_prompt

    m = DiTFuseModule(preset="omnigen-v1", pretrained=str(folder)).to(dev, torch.bfloat16).eval()
    m.codec.float()
    px = cfg["fuse"][0][0]
    with torch.no_grad():
        lat = m.encode_images((torch.rand(1, 2, 3, px, px) * 2 - 1).to(dev))
        n = (lat.shape[-2] // 2) * (lat.shape[-1] // 2)
        cond = build_conditioning(m.tokenizer, [default_prompt("ivif")], 2, tokens_per_image=n, num_output_tokens=n,
                                  device=dev)
        cache = m.backbone.prefill(cond, lat.to(torch.bfloat16))
        x = torch.randn(1, lat.shape[2], lat.shape[-2], lat.shape[-1], device=dev, dtype=torch.bfloat16)
        t = torch.full((1,), 0.5, device=dev)
        out = {"prefill (condition rows)": sdpa_kernels(lambda: m.backbone.prefill(cond, lat.to(torch.bfloat16))),
               "denoising step (output rows)": sdpa_kernels(lambda: m.backbone.step(x, t, cache))}
    return out


def official_difference(folder: Path, dev: torch.device, cfg: dict) -> dict:
    from ditfuse.pipeline import FusionPipeline
    from ditfuse.core.prompts import default_prompt
    from ditfuse.sampling.sampler import SamplerSettings

    side = cfg["official_side"]
    a, b = images(side * 3 // 4, side, seed=1)
    settings = SamplerSettings(steps=cfg["steps"] if cfg["steps"] < 50 else 10, guidance_scale=2.5,
                               img_guidance_scale=1.6, seed=0)
    outs = {}
    for name, dtype, official in (("default fp32", "fp32", False), ("default bf16", "bf16", False),
                                  ("official bf16", "bf16", True)):
        pipe = FusionPipeline.load(model=str(folder), device=str(dev), dtype=dtype, max_side=side, sampler=settings,
                                   official=official)
        outs[name] = pipe.fuse(a, b, default_prompt("ivif")).astype(np.float64)
        del pipe
    ref = outs["default fp32"]
    res = {"steps": settings.steps, "size": f"{side}x{side * 3 // 4}"}
    for name in ("default bf16", "official bf16"):
        o = outs[name]
        if o.shape != ref.shape:
            res[name] = {"shape": list(o.shape), "vs": list(ref.shape)}
            continue
        mse = float(((o - ref) ** 2).mean())
        res[name] = {"psnr_db_vs_fp32": 10 * math.log10(255**2 / mse) if mse else float("inf"),
                     "max_abs_uint8": float(np.abs(o - ref).max()), "mean_abs_uint8": float(np.abs(o - ref).mean())}
    return res


def cli_fit(folder: Path, dev: torch.device, cfg: dict, work: Path, demo: Path | None) -> dict:
    from real_size import checkpoint_facts, fit_cmd

    demo = demo or work / "demo"
    cmd = fit_cmd(folder, work, demo, cfg["fit_bucket"], f"--trainer.max_steps={cfg['fit_steps']}",
                  f"--trainer.accelerator={'gpu' if dev.type == 'cuda' else 'cpu'}", "--trainer.precision=bf16-mixed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    (work / "fit.log").write_text(res.stdout + res.stderr)
    out = {"rc": res.returncode, "wall_s": time.perf_counter() - t0, "steps": cfg["fit_steps"],
           "bucket": cfg["fit_bucket"], "log_tail": (res.stdout + res.stderr)[-600:] if res.returncode else ""}
    ckpt = work / "ckpt" / "last.ckpt"
    if ckpt.is_file():
        out.update(checkpoint_facts(ckpt))
    return out


def tiny_folder(root: Path) -> Path:
    from _release import write_release

    model, _ = write_release(root)
    return model


def markdown(res: dict) -> str:
    lines = [f"# gpu_check ({res['device']}, {'CPU DRY RUN, tiny sizes' if res['dry_run'] else 'full size'})", "",
             "| figure | value |", "|---|---|"]
    for f in res["fuse_latency"]:
        peak = f", peak {f['peak_gib']:.1f} GiB" if f["peak_gib"] is not None else ""
        lines.append(f"| fuse {f['size']}, {f['steps']} steps, bf16 | {f['seconds']:.2f} s "
                     f"({1000 * f['s_per_step']:.0f} ms/step{peak}) |")
    for path, ks in res["sdpa_kernels"].items():
        lines.append(f"| sdpa kernel, {path} | {', '.join(k.removeprefix('aten::') for k in ks) or 'none'} |")
    t = res["train_step"]
    peak = f", peak {t['peak_gib']:.1f} GiB" if t["peak_gib"] is not None else ""
    lines.append(f"| LoRA train step {t['px']} px, batch 1, checkpointing | {t['s_per_step']:.2f} s, "
                 f"{t['tokens_per_s']:.0f} image tokens/s{peak} |")
    fit = res["fit"]
    lines.append(f"| ditfuse fit, {fit['steps']} steps at {fit['bucket']} px, bf16-mixed | rc {fit['rc']}, "
                 f"{fit['wall_s']:.0f} s, checkpoint {fit.get('ckpt_mb', '?')} MB |")
    for name in ("default bf16", "official bf16"):
        d = res["official_vs_fp32"].get(name, {})
        if "psnr_db_vs_fp32" in d:
            lines.append(f"| {name} vs default fp32 ({res['official_vs_fp32']['steps']} steps) | "
                         f"PSNR {d['psnr_db_vs_fp32']:.1f} dB, max |diff| {d['max_abs_uint8']:.0f}/255 |")
    lines.append(f"| total wall time | {res['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--folder", type=Path, help="full-size release folder (default: made under --work)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ditfuse-gpu-check")
    p.add_argument("--cpu-dry-run", action="store_true", help="every part on CPU at tiny sizes (tests)")
    p.add_argument("--demo-dir", type=Path, help="demo shards folder for the fit (default: built under --work)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; pass --cpu-dry-run to check the script on CPU")
    dev = torch.device("cpu" if dry else "cuda")
    cfg = sizes(dry)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.folder
    if folder is None:
        folder = tiny_folder(args.work) if dry else args.work / "OmniGen-v1-random"
        if not dry and not (folder / "vae" / "config.json").is_file():
            from make_real_size import main as make

            make([str(folder), "--device", "cuda"])
    res: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dry_run": dry,
                 "torch": torch.__version__, "folder": str(folder)}
    res["fuse_latency"] = fuse_latency(folder, dev, cfg)
    res["train_step"], kernels = train_step_figures(folder, dev, cfg)
    res["sdpa_kernels"] = {**kernels, **inference_kernels(folder, dev, cfg)}
    res["official_vs_fp32"] = official_difference(folder, dev, cfg)
    res["fit"] = cli_fit(folder, dev, cfg, args.work, args.demo_dir)
    res["wall_s"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if res["fit"]["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
