"""Transformer evaluations per fused image against quality, on a model that has learned (issue 18).

    heavy python benchmarks/nfe_quality.py --checkpoint /work/ckpt18/demo/tb/version_0/checkpoints/last.ckpt \
        --plot docs/img/nfe_quality.png
    python benchmarks/nfe_quality.py            # no checkpoint: trains configs/demo.yaml for --train-steps first

The model is the `ditfuse fit --config configs/demo.yaml` one (tiny preset, 32x32). Held out: the
demo's validation photographs (never trained on), the M3 set and the fusion set (ivif + mff + mef),
each image under --seeds initial noises. Guidance is on, as `ditfuse fuse` runs it (dual CFG
2.5 / 1.6, three branches). For every setting the table gives the transformer evaluations of one
branch of one image (NFE: 50 Euler steps x 3 branches = 150), seconds per image (all images in
one batch), PSNR / SSIM to the target per set, and the max / mean |difference| (pixels in [0, 1])
to the 50-step Euler dual-CFG reference and to a fine ODE solution (--fine-steps Heun steps).
Plain Euler appears at the NFE of every other method, so what a method adds at equal evaluations
is visible. Then: the goals (fast <= 50 NFE within 0.1 dB of the reference on both sets, a <= 30
NFE setting within 0.3 dB) and the per-image time of `fast` against today's default, measured
side by side (alternating, one pair at a time, encode + sample + decode) in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SETS = {"m3": ("m3",), "fusion": ("ivif", "mff", "mef")}
GUIDANCE = (2.5, 1.6)  # ditfuse fuse / OmniGen pipeline defaults



def grid() -> list[tuple[str, str, dict]]:
    """(family, label, sampler settings): one plot line per family. Plain Euler at the NFE of each
    other method (48, 30, 24, 18, 15 = 3 branches x steps)."""
    g = [("euler", f"euler {n}", {"steps": n}) for n in (25, 16, 10, 8, 6, 5)]
    g += [("heun", f"heun {n}", {"solver": "heun", "steps": n}) for n in (8, 5, 3)]
    g += [("midpoint", f"midpoint {n}", {"solver": "midpoint", "steps": n}) for n in (8, 5)]
    g += [("dpm++2m", f"dpm++2m {n}", {"solver": "dpm++2m", "steps": n}) for n in (16, 10, 8, 6, 5)]
    g += [("unipc", f"unipc {n}", {"solver": "unipc", "steps": n}) for n in (16, 10, 8, 6, 5)]
    g += [(f"dpm++2m shift {s}", f"dpm++2m 8 shift {s}",
           {"solver": "dpm++2m", "steps": 8, "schedule": "shifted", "shift": s}) for s in (0.5, 2.0)]
    for lo, hi in ((0.2, 0.8), (0.5, 1.0), (0.0, 0.5)):
        g += [(f"dpm++2m cfg[{lo},{hi}]", f"dpm++2m {n} cfg[{lo},{hi}]",
               {"solver": "dpm++2m", "steps": n, "guidance_interval": [lo, hi]}) for n in (16, 10)]
        g += [(f"euler cfg[{lo},{hi}]", f"euler 16 cfg[{lo},{hi}]", {"steps": 16, "guidance_interval": [lo, hi]})]
    g += [("euler 50 cache", f"euler 50 cache {c}", {"steps": 50, "cache_threshold": c}) for c in (0.1, 0.2)]
    g += [("dpm++2m 16 cache", f"dpm++2m 16 cache {c}", {"solver": "dpm++2m", "steps": 16, "cache_threshold": c})
          for c in (0.1, 0.2)]
    return g


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a `ditfuse fit --config configs/demo.yaml` checkpoint (default: train one)")
    p.add_argument("--train-steps", type=int, default=600, help="steps of the demo run made without --checkpoint")
    p.add_argument("--demo-dir", default=None, help="the demo shards (default: the config's data.demo_dir)")
    p.add_argument("--seeds", type=int, default=1, help="initial noises per held-out image")
    p.add_argument("--fine-steps", type=int, default=50, help="Heun steps of the fine ODE solution (2nd order; "
                   "2 x 3 x 50 = 300 NFE)")
    p.add_argument("--fusion-per-task", type=int, default=0, help="held-out ivif / mff / mef samples per task "
                   "(0: all 8 of the demo); M3 keeps all 8")
    p.add_argument("--timing-pairs", type=int, default=8, help="pairs in the side-by-side timing")
    p.add_argument("--timing-size", type=int, default=32, help="side of the timed pairs (px; the demo's)")
    p.add_argument("--no-grid", action="store_true", help="only the reference, the fine solution and the fast "
                   "preset (the goals and the timing after changing FAST_PRESET)")
    p.add_argument("--plot", help="write the quality-vs-evaluations plot here (PNG)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--wide-layers", type=int, default=0, help="also time default vs fast side by side on a "
                   "random-init model of OmniGen-v1 width (hidden 3072, 32 heads, MLP 8192) with this many "
                   "layers, pixel codec, --wide-pairs pairs at --timing-size (0: skip)")
    p.add_argument("--wide-pairs", type=int, default=2)
    return p.parse_args(argv)


def train_demo(steps: int, root: Path) -> Path:
    """`ditfuse fit --config configs/demo.yaml` for `steps` steps; its last.ckpt."""
    cmd = [sys.executable, "-m", "ditfuse.cli", "fit", "--config", str(DEMO), f"--trainer.max_steps={steps}",
           f"--trainer.default_root_dir={root}"]
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return max(root.rglob("last.ckpt"), key=lambda f: f.stat().st_mtime)


def held_out(demo_dir: str | None, fusion_per_task: int = 0) -> dict[str, dict]:
    """The demo validation samples per set: prompts, images (n, 2, 3, h, w), targets (n, 3, h, w)."""
    from datamodules.datamodule import DiTFuseDataModule

    cfg = yaml.safe_load(DEMO.read_text())["data"]
    cfg.update(num_workers=0, **({"demo_dir": demo_dir} if demo_dir else {}))
    if not Path(cfg["demo_dir"]).is_absolute():
        cfg["demo_dir"] = str(ROOT / cfg["demo_dir"])
    dm = DiTFuseDataModule(**cfg)
    dm.prepare_data()
    dm.setup("validate")
    rows = {name: {"prompt": [], "images": [], "target": [], "key": []} for name in SETS}
    taken: dict[str, int] = {}
    for batch in dm.val_dataloader():
        for i, task in enumerate(batch["task"]):
            taken[task] = taken.get(task, 0) + 1
            if fusion_per_task and task in SETS["fusion"] and taken[task] > fusion_per_task:
                continue
            for name, tasks in SETS.items():
                if task in tasks:
                    for k in ("prompt", "key"):
                        rows[name][k].append(batch[k][i])
                    rows[name]["images"].append(batch["images"][i])
                    rows[name]["target"].append(batch["target"][i])
    return {name: {**r, "images": torch.stack(r["images"]), "target": torch.stack(r["target"])}
            for name, r in rows.items()}


def repeat_seeds(data: dict, seeds: int) -> dict:
    """Each image under `seeds` initial noises: rows (image, seed), seed = row index."""
    n = len(data["prompt"])
    return {"prompt": data["prompt"] * seeds, "images": data["images"].repeat(seeds, 1, 1, 1, 1),
            "target": data["target"].repeat(seeds, 1, 1, 1), "seed": list(range(n * seeds))}


@torch.no_grad()
def fuse(module, data: dict, settings, stats: dict | None = None) -> torch.Tensor:
    """module.sample's path (encode, sample, decode), counting evaluations: (n, 3, h, w) in [-1, 1]."""
    from ditfuse.sampling.sampler import sample_latents

    lat = module.encode_images(data["images"])
    d = module.codec.downsample
    out_shape = (lat.shape[2], data["images"].shape[-2] // d, data["images"].shape[-1] // d)
    z = sample_latents(module.backbone, module.tokenizer, data["prompt"], lat, out_shape, settings,
                       data["seed"], stats)
    return module.codec.decode(z).float().clamp(-1, 1)


def quality(out: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as ssim,
    )

    from ditfuse.module import psnr

    a, b = (out + 1) / 2, (target.float() + 1) / 2
    return float(psnr(out, target).mean()), float(ssim(a, b, data_range=1.0))


def run_setting(module, sets: dict, settings, family: str, label: str, kw: dict) -> tuple[dict, dict]:
    """(row with NFE, seconds per image, PSNR / SSIM per set; outputs per set)."""
    row = {"family": family, "label": label, "settings": kw, "sets": {}}
    nfe, seconds, n, outs = [], 0.0, 0, {}
    for name, data in sets.items():
        stats: dict = {}
        t0 = time.perf_counter()
        out = outs[name] = fuse(module, data, settings, stats)
        seconds += time.perf_counter() - t0
        n += out.shape[0]
        nfe.append(stats["evaluations"])  # per image of this set
        p, q = quality(out, data["target"])
        row["sets"][name] = {"psnr": p, "ssim": q}
    # mean NFE per image over both sets (step caching skips depending on the images)
    row["nfe"] = round(sum(e * len(d["prompt"]) for e, d in zip(nfe, sets.values())) / n, 1)
    row["s_per_image"] = seconds / n
    return row, outs


def add_diffs(row: dict, outs: dict, against: dict, key: str) -> None:
    """max / mean |out - against| per set, pixels in [0, 1]."""
    for name in SETS:
        diff = ((outs[name] - against[name]) / 2).abs()
        row["sets"][name][f"max_{key}"], row["sets"][name][f"mean_{key}"] = float(diff.max()), float(diff.mean())


def fmt_row(r: dict) -> str:
    cells = [f"{r['label']:<26}", f"{r['nfe']:>5g}", f"{1000 * r['s_per_image']:>7.1f}"]
    for name in SETS:
        x = r["sets"][name]
        cells += [f"{x['psnr']:>6.2f}", f"{x['ssim']:.4f}", f"{x.get('max_ref', 0):.4f}", f"{x.get('mean_ref', 0):.4f}",
                  f"{x.get('mean_fine', 0):.4f}"]
    return " | ".join(cells)


HEADER = (" | ".join([f"{'setting':<26}", "  NFE", "ms/img"] + [f"{s} PSNR | SSIM   | max|dref| | mean|dref| | "
                     f"mean|dfine|" for s in SETS]))


@torch.no_grad()
def side_by_side(module, data: dict, pairs: int, size: int, default, fast) -> dict:
    """Per-pair seconds (encode + sample + decode, one pair at a time), alternating the two settings."""
    import torch.nn.functional as F

    imgs = F.interpolate(data["images"][:pairs].flatten(0, 1), size=(size, size), mode="bilinear",
                         align_corners=False).unflatten(0, (-1, 2))
    times = {"default": [], "fast": []}
    for i in range(imgs.shape[0]):
        one = {"prompt": data["prompt"][i:i + 1], "images": imgs[i:i + 1], "seed": [i]}
        for name, s in (("default", default), ("fast", fast)):
            t0 = time.perf_counter()
            fuse(module, one, s)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pairs": int(imgs.shape[0]), "size": size, "s_default": med["default"], "s_fast": med["fast"],
            "speedup": med["default"] / med["fast"]}


def wide_model(layers: int):
    """Random-init tiny preset at OmniGen-v1's width (docs: ditfuse/model/config.py _OMNIGEN_V1), pixel codec:
    the time of a transformer evaluation at the real width, without the SDXL VAE."""
    from ditfuse.module import DiTFuseModule

    shape = {"hidden_size": 3072, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
             "num_layers": layers}
    return DiTFuseModule(preset="tiny", model_overrides=shape).eval().requires_grad_(False)


def plot(rows: list[dict], ref: dict, path: str) -> None:
    """Top: PSNR to the target per set; bottom: mean |difference| to the fine ODE solution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SETS), figsize=(12, 8), sharex=True)
    for col, name in enumerate(SETS):
        families: dict[str, list] = {}
        for r in rows:
            x = r["sets"][name]
            families.setdefault(r["family"], []).append((r["nfe"], x["psnr"], max(x["mean_fine"], 1e-6)))
        for fam, pts in families.items():
            pts.sort()
            style = {"lw": 2.5, "color": "k"} if fam == "euler" else {"lw": 1}
            for row, k in ((0, 1), (1, 2)):
                axes[row, col].plot([p[0] for p in pts], [p[k] for p in pts], marker="o", ms=3, label=fam, **style)
        y = ref["sets"][name]["psnr"]
        axes[0, col].axhline(y, color="k", ls="--", lw=0.8)
        axes[0, col].axhspan(y - 0.1, y + 0.1, color="k", alpha=0.08)
        axes[0, col].set_ylabel(f"{name}: PSNR to target (dB)")
        axes[0, col].set_title(f"held-out demo {name}; dashed: 50-step Euler reference, band +-0.1 dB", fontsize=9)
        axes[1, col].set_yscale("log")
        axes[1, col].set_ylabel(f"{name}: mean |output - fine ODE solution|")
        axes[1, col].set_xlabel("transformer evaluations per image (NFE; 50-step Euler dual CFG = 150)")
        for row in (0, 1):
            axes[row, col].axvline(50, color="gray", ls=":", lw=0.8)
            axes[row, col].set_xscale("log")
    axes[0, -1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def goals(rows: list[dict], ref: dict, fast_label: str, timing: dict) -> list[str]:
    def close(r, db):
        return all(abs(r["sets"][n]["psnr"] - ref["sets"][n]["psnr"]) <= db for n in SETS)

    fast = next(r for r in rows if r["label"] == fast_label)
    fifth = [r for r in rows if r["nfe"] <= ref["nfe"] / 5 and close(r, 0.3)]
    best5 = min(fifth, key=lambda r: r["nfe"]) if fifth else None
    lines = [f"goal fast <= 1/3 NFE within 0.1 dB: {fast_label}: {fast['nfe']} NFE, "
             + ", ".join(f"{n} {fast['sets'][n]['psnr'] - ref['sets'][n]['psnr']:+.3f} dB" for n in SETS)
             + f" -> {'MET' if fast['nfe'] * 3 <= ref['nfe'] and close(fast, 0.1) else 'NOT MET'}",
             "goal <= 1/5 NFE within 0.3 dB: " + (f"{best5['label']} ({best5['nfe']} NFE) -> MET" if best5
                                                  else "no setting -> NOT MET"),
             (f"goal fast >= 2.5x faster per image ({timing['pairs']} pairs at {timing['size']} px): "
              f"{timing['s_default'] * 1000:.1f} ms default vs {timing['s_fast'] * 1000:.1f} ms fast = "
              f"{timing['speedup']:.2f}x -> {'MET' if timing['speedup'] >= 2.5 else 'NOT MET'}")]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ditfuse.pipeline import load_module
    from ditfuse.sampling.sampler import FAST_PRESET, SamplerSettings

    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(train_demo(args.train_steps, Path(tempfile.mkdtemp(prefix="nfe_quality_"))))
    module = load_module(checkpoint=ckpt, warn=lambda m: print("warning:", m))
    sets = {name: repeat_seeds(d, args.seeds) for name, d in held_out(args.demo_dir, args.fusion_per_task).items()}
    print(f"checkpoint {ckpt}; held out: " + ", ".join(f"{n} {len(d['prompt'])} rows" for n, d in sets.items())
          + f" ({args.seeds} seeds each); guidance {GUIDANCE[0]} / {GUIDANCE[1]}; threads {args.threads}",
          flush=True)
    base = SamplerSettings(guidance_scale=GUIDANCE[0], img_guidance_scale=GUIDANCE[1])
    fine_kw = {"solver": "heun", "steps": args.fine_steps}
    fine, fine_outs = run_setting(module, sets, replace(base, **fine_kw), "fine", f"heun {args.fine_steps} (fine)",
                                  fine_kw)
    ref, ref_outs = run_setting(module, sets, base, "euler", "euler 50 (reference)", {"steps": 50})
    for row, outs in ((fine, fine_outs), (ref, ref_outs)):
        add_diffs(row, outs, ref_outs, "ref")
        add_diffs(row, outs, fine_outs, "fine")
    print(HEADER)
    rows = [fine, ref]
    for r in rows:
        print(fmt_row(r), flush=True)
    fast_kw = dict(FAST_PRESET)
    for family, label, kw in [*([] if args.no_grid else grid()), ("fast", "fast (preset)", fast_kw)]:
        row, outs = run_setting(module, sets, replace(base, **kw), family, label, kw)
        add_diffs(row, outs, ref_outs, "ref")
        add_diffs(row, outs, fine_outs, "fine")
        rows.append(row)
        print(fmt_row(row), flush=True)
    fast_settings = SamplerSettings(preset="fast", guidance_scale=GUIDANCE[0], img_guidance_scale=GUIDANCE[1])
    timing = side_by_side(module, sets["fusion"], args.timing_pairs, args.timing_size, base, fast_settings)
    for line in goals(rows[1:], ref, "fast (preset)", timing):
        print(line)
    wide = None
    if args.wide_layers:
        wide = side_by_side(wide_model(args.wide_layers), sets["fusion"], args.wide_pairs, args.timing_size, base,
                            fast_settings)
        print(f"OmniGen-v1 width, {args.wide_layers} layer(s), random weights, {wide['pairs']} pairs at "
              f"{wide['size']} px: {wide['s_default']:.2f} s default vs {wide['s_fast']:.2f} s fast = "
              f"{wide['speedup']:.2f}x")
    if args.plot:
        plot(rows[1:], ref, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": ckpt, "rows": rows, "timing": timing, "wide": wide}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
