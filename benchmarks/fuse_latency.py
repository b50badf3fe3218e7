"""Per-pair fusion latency and peak memory of a random-init OmniGen-v1-sized model.

    python benchmarks/fuse_latency.py                      # GPU if present: 640x480 and 1024x768, 50 steps
    python benchmarks/fuse_latency.py --compare-no-cache   # also time the sampler without the KV cache
    python benchmarks/fuse_latency.py --device cpu         # CPU: reduced depth/steps/size (printed)

The model is the `omnigen-v1` preset shape (32 layers, hidden 3072, 3.8B parameters; random
weights, which cost the same time as trained ones) in bf16 on CUDA, plus a random-init SDXL-shaped
VAE in fp32 (encode both inputs + decode the output are included in the latency). Sampling is what
`ditfuse fuse` runs: dual CFG (s_txt 2.5, s_img 1.6, three branches batched), Euler, exact KV
cache. The prompt goes through the built-in tokenizer (~20 tokens; the Phi-3 tokenizer gives
~100, against 2.4k-9.2k image tokens: negligible). Issue 4 goal on one H100/H200: < 5 s per
640x480 pair at 50 steps (the DiTFuse paper: 53 s).

Prints one line per size and, last, a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from ditfuse.model.backbone import Backbone
from ditfuse.model.codec import VaeCodec
from ditfuse.model.config import ModelConfig
from ditfuse.core.prompts import default_prompt
from ditfuse.sampling.sampler import SamplerSettings, sample_latents
from ditfuse.model.tokenizer import BuiltinTokenizer

# SDXL VAE shape (stabilityai/sdxl-vae config.json)
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "sample_size": 1024, "block_out_channels": (128, 256, 512, 512), "scaling_factor": 0.13025,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def build(device: torch.device, dtype: torch.dtype, layers: int | None) -> tuple[Backbone, VaeCodec, ModelConfig]:
    from diffusers import AutoencoderKL, OmniGenTransformer2DModel

    cfg = ModelConfig.from_name("omnigen-v1", **({"num_layers": layers} if layers else {}))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a 3.8B CPU init takes minutes
        transformer = OmniGenTransformer2DModel(**cfg.transformer_kwargs()).to(dtype).eval()
        vae = AutoencoderKL(**SDXL_VAE).eval()
    return Backbone(transformer).requires_grad_(False), VaeCodec(vae), cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def fuse_once(backbone: Backbone, codec: VaeCodec, tokenizer, images: torch.Tensor, settings: SamplerSettings
              ) -> torch.Tensor:
    """One pair, as `ditfuse fuse` runs it: encode both inputs, sample, decode."""
    B, K, _, H, W = images.shape
    cond = codec.encode(images.flatten(0, 1)).float().unflatten(0, (B, K))  # (1, 2, 4, H/8, W/8)
    lat = sample_latents(backbone, tokenizer, [default_prompt("ivif")], cond, (4, H // 8, W // 8), settings)
    return codec.decode(lat).float()


def measure(backbone, codec, tokenizer, device, hw: tuple[int, int], steps: int, repeats: int, kv_cache: bool) -> dict:
    images = torch.rand(1, 2, 3, *hw, device=device) * 2 - 1
    settings = SamplerSettings(steps=steps, kv_cache=kv_cache)
    fuse_once(backbone, codec, tokenizer, images, SamplerSettings(steps=1, kv_cache=kv_cache))  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fuse_once(backbone, codec, tokenizer, images, settings)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    tokens = (hw[0] // 16) * (hw[1] // 16)
    return {"size": f"{hw[1]}x{hw[0]}", "steps": steps, "kv_cache": kv_cache, "tokens_per_image": tokens,
            "seconds_per_pair": round(statistics.median(times), 3), "all_s": [round(t, 3) for t in times],
            "peak_memory_gib": round(peak / 2**30, 2),
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None, help="default: 50 on GPU, 2 on CPU")
    p.add_argument("--layers", type=int, default=None, help="transformer depth (default: 32 on GPU, 1 on CPU)")
    p.add_argument("--sizes", default=None, help="WxH list (default: 640x480,1024x768 on GPU; 192x128 on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare-no-cache", action="store_true", help="also time the sampler without the KV cache")
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 2)
    layers = args.layers or (None if gpu else 1)
    sizes = args.sizes or ("640x480,1024x768" if gpu else "192x128")
    if not gpu:
        print(f"CPU run: REDUCED to {layers or 32} layer(s), {steps} step(s), sizes {sizes}; figures are not "
              "comparable with the GPU goal")
    backbone, codec, cfg = build(device, torch.bfloat16 if gpu else torch.float32, layers)
    n_params = sum(p.numel() for p in backbone.parameters())
    tokenizer = BuiltinTokenizer()
    results = []
    for size in sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        if w % 16 or h % 16:
            raise SystemExit(f"--sizes {size}: width and height must be multiples of 16 (VAE 8 x patch 2)")
        for kv in (True, False) if args.compare_no_cache else (True,):
            r = measure(backbone, codec, tokenizer, device, (h, w), steps, args.repeats, kv)
            results.append(r)
            print(f"{r['size']} kv_cache={kv}: {r['seconds_per_pair']:.2f} s/pair, peak {r['peak_memory_gib']} GiB "
                  f"({r['tokens_per_image']} tokens per image, {steps} steps)", flush=True)
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    print(json.dumps({"device": name, "dtype": "bf16" if gpu else "fp32", "layers": cfg.num_layers,
                      "parameters_b": round(n_params / 1e9, 3), "guidance": [2.5, 1.6], "results": results}))


if __name__ == "__main__":
    main()
