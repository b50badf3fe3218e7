"""`ditfuse fuse --official` against the original DiTFuse/OmniGen pipeline on a tiny model.

Builds stand-ins of the released folders (tests/_release.py: original OmniGen-v1 layout with its
tokenizer files and vae/, an official peft LoRA on qkv_proj/o_proj; RoPE switch lowered to 256 so
the conditional branch takes the long factors and the other two the short ones, as in issue 11),
runs the original `OmniGenPipeline` the way DiTFuse's test.py calls it (its resize rule,
separate_cfg_infer=True, guidance 2.0 / 1.6, seed 0), with the KV cache off (the original's cache
is not exact, issue 11), in fp32 and bf16, and compares with `ditfuse fuse --official` and with
the default mode.

The original needs transformers 4.45-era APIs: give a Python that has them and the original
sources (github.com/Henry-Lee-real/DiTFuse, its OmniGen/ folder and test.py), e.g.

    python -m venv --system-site-packages /tmp/venv45
    /tmp/venv45/bin/pip install --no-deps transformers==4.45.2 peft==0.13.2 "tokenizers<0.21" \
        huggingface-hub==0.25.2 diffusers==0.30.3
    PYTHONPATH=$PWD python benchmarks/official_parity.py --original-python /tmp/venv45/bin/python \
        --original-src /path/to/DiTFuse --image1 vi.jpg --image2 ir.jpg
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

ORIGINAL = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from PIL import Image
from OmniGen import OmniGenPipeline
from test import prepare_image_for_model, image_to_bytesio
cfg = json.loads(sys.argv[2])
pipe = OmniGenPipeline.from_pretrained(cfg["model"])
pipe.merge_lora(cfg["lora"])
a = prepare_image_for_model(Image.open(cfg["image1"]).convert("RGB"), max_side=cfg["max_side"])
b = prepare_image_for_model(Image.open(cfg["image2"]).convert("RGB"), max_side=cfg["max_side"])
# (its KV cache, OmniGenCache, refuses to run without a GPU)
for name, dtype, cache in (("orig_fp32", torch.float32, False), ("orig_bf16", torch.bfloat16, False)):
    img = pipe(prompt=cfg["prompt"], input_images=[image_to_bytesio(a), image_to_bytesio(b)], height=a.size[1],
               width=a.size[0], num_inference_steps=cfg["steps"], guidance_scale=2.0, img_guidance_scale=1.6,
               separate_cfg_infer=True, use_kv_cache=cache, offload_kv_cache=False, seed=0, dtype=dtype)[0]
    img.save(f"{cfg['out']}/{name}.png")
"""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def compare(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(int) - b.astype(int))
    return f"max {d.max()}/255, mean {d.mean():.3f}, PSNR {psnr(a, b):.1f} dB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original-python", required=True)
    p.add_argument("--original-src", required=True, help="DiTFuse checkout (OmniGen/ and test.py)")
    p.add_argument("--image1", required=True)
    p.add_argument("--image2", required=True)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from _release import write_release
    from PIL import Image

    from ditfuse.core import prompts as P
    from ditfuse.commands.fuse import main as fuse

    work = Path(args.work or tempfile.mkdtemp(prefix="official_parity_"))
    model, lora = write_release(work, cfg={"original_max_position_embeddings": 256})
    prompt = P.default_prompt("ivif")
    cfg = {"model": str(model), "lora": str(lora), "image1": args.image1, "image2": args.image2, "prompt": prompt,
           "max_side": args.max_side, "steps": args.steps, "out": str(work)}
    subprocess.run([args.original_python, "-c", ORIGINAL, args.original_src, json.dumps(cfg)], check=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    base = ["--model", str(model), "--lora", str(lora), "--image1", args.image1, "--image2", args.image2,
            "--task", "ivif", "--steps", str(args.steps), "--max-side", str(args.max_side), "--device", "cpu",
            "--overwrite"]
    runs = {"ours_official_fp32": ["--official", "--dtype", "fp32"], "ours_official_bf16": ["--official"],
            "ours_default_fp32": ["--dtype", "fp32"],
            "ours_official_fp32_empty_negative": ["--official", "--dtype", "fp32", "--negative-prompt", ""]}
    for name, extra in runs.items():
        assert fuse([*base, *extra, "--output", str(work / f"{name}.png")]) == 0, name
    img = {f.stem: np.asarray(Image.open(f).convert("RGB")) for f in work.glob("*.png")}
    h, w = img["orig_fp32"].shape[:2]
    default_at = np.asarray(Image.fromarray(img["ours_default_fp32"]).resize((w, h), Image.LANCZOS))
    print(f"work folder: {work}; output {w}x{h}, {args.steps} steps, guidance 2.0 / 1.6, seed 0")
    print("official fp32 vs original fp32 (no cache):   ", compare(img["ours_official_fp32"], img["orig_fp32"]))
    print("official bf16 vs original bf16 (no cache):   ", compare(img["ours_official_bf16"], img["orig_bf16"]))
    print("official fp32 vs official bf16 (ours):        ", compare(img["ours_official_fp32"],
                                                                    img["ours_official_bf16"]))
    print("original fp32 vs original bf16:               ", compare(img["orig_fp32"], img["orig_bf16"]))
    print("official, empty negative prompt vs original:  ", compare(img["ours_official_fp32_empty_negative"],
                                                                    img["orig_fp32"]))
    print(f"default mode (source size {img['ours_default_fp32'].shape[1]}x{img['ours_default_fp32'].shape[0]}, "
          f"resized to {w}x{h}) vs original:", compare(default_at, img["orig_fp32"]))


if __name__ == "__main__":
    main()
