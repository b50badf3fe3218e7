"""LoRA training-step time and peak memory for an OmniGen-v1-sized backbone, plus mask memory.

    python benchmarks/train_step.py [--layers N] [--batch B] [--steps S] [--no-checkpointing]

Random init (no weights needed) of the `omnigen-v1` preset: hidden 3072, 32 heads, 8192 MLP;
512x512 output with two 512x512 input images (SDXL-VAE latents 64x64x4 -> 1024 tokens each), the
DiTFuse M3 prompt, LoRA r=8 on to_q/to_k/to_v/to_out.0, AdamW on the adapter only. On a GPU: the
full 32 layers, frozen base in bf16, bf16 autocast, gradient checkpointing. On a CPU the depth is
reduced (default 1 layer, 1 warm-up + 1 timed step; said in the output): a few minutes on 2 cores.

Mask memory compares this framework's conditioning (O(L) integers on the host, a boolean
(B, 1, L, L) mask built on the device) with diffusers' OmniGenCollator, which builds a dense
float32 (B, L, L) mask on the host, for one training row and for the three guidance rows of
sampling, at 512 and 1024 px. The last line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from ditfuse import prompts as P
from ditfuse.backbone import Backbone, build_transformer
from ditfuse.conditioning import build_conditioning, image_only_prompt
from ditfuse.config import ModelConfig
from ditfuse.flow import interpolate, per_sample_mse, sample_t
from ditfuse.lora import LoraSettings, add_lora, count_parameters
from ditfuse.tokenizer import BuiltinTokenizer


def mask_memory(px: int, tok) -> dict[str, float]:
    n = (px // 16) ** 2  # OmniGen: H*W // 16 // 16 tokens per image
    prompts = [P.default_prompt("m3"), image_only_prompt(2), ""]
    cond = build_conditioning(tok, prompts, [2, 2, 0], tokens_per_image=n, num_output_tokens=n)
    L = cond.seq_len
    compact = sum(t.numel() * t.element_size() for t in
                  (cond.input_ids, cond.pad, cond.segment, cond.span_row, cond.span_start, cond.span_image))
    mib = 2 ** 20
    return {"px": px, "seq_len": L,
            "ours_host_MiB_3rows": compact / mib,
            "ours_device_bool_MiB_1row": L * L / mib,
            "diffusers_host_float32_MiB_1row": 4 * L * L / mib,
            "diffusers_host_float32_MiB_3rows": 3 * 4 * L * L / mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="depth (default: 32 on GPU, 1 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on GPU, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on GPU, 1 on CPU)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-checkpointing", action="store_true")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    layers = a.layers or (32 if cuda else 1)
    a.steps = a.steps or (5 if cuda else 1)
    a.warmup = (2 if cuda else 1) if a.warmup is None else a.warmup
    cfg = ModelConfig.from_name("omnigen-v1", num_layers=layers)
    note = "full depth" if layers == 32 else f"REDUCED DEPTH: {layers} of 32 layers (CPU)"
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; {note}")

    # 1. Model: random omnigen-v1 shape, frozen base in bf16 on GPU, LoRA r=8 in fp32
    tr = build_transformer(cfg, seed=0)
    if cuda:
        tr = tr.to(torch.bfloat16)
    add_lora(tr, LoraSettings(r=8, alpha=8))
    tr.to(dev)
    bb = Backbone(tr, gradient_checkpointing=not a.no_checkpointing)
    trainable, total = count_parameters(tr)
    opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4)

    # 2. Inputs: SDXL latents of two input images and a target, M3 prompt
    B, h = a.batch, a.size // 8
    n = (h // 2) ** 2
    tok = BuiltinTokenizer()  # token ids only need to be < vocab; Phi-3 prompts are ~3x longer
    cond = build_conditioning(tok, [P.default_prompt("m3")] * B, 2, n, n, device=dev)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(B, 2, 4, h, h, generator=g).to(dev)
    x1 = torch.randn(B, 4, h, h, generator=g).to(dev)

    def step() -> float:
        t = sample_t(B).to(dev)
        x0 = torch.randn_like(x1)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            v = bb(interpolate(x0, x1, t), t, cond, lat)
        loss = per_sample_mse(v, x1 - x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    result = {"device": dev.type, "layers": layers, "batch": B, "size": a.size, "seq_len": cond.seq_len,
              "gradient_checkpointing": not a.no_checkpointing, "params_total": total, "params_trainable": trainable,
              "step_s_median": statistics.median(times), "peak_mem_GiB": peak / 2 ** 30,
              "peak_mem_kind": "torch.cuda.max_memory_allocated" if cuda else "process max RSS",
              "mask_memory": [mask_memory(px, tok) for px in (512, 1024)]}
    print(f"LoRA train step ({a.size}px, 2 inputs, batch {B}, L={cond.seq_len}): "
          f"{result['step_s_median']:.3f} s median of {a.steps}, peak memory {result['peak_mem_GiB']:.2f} GiB "
          f"({result['peak_mem_kind']}); trainable {trainable / 1e6:.2f}M of {total / 1e6:.0f}M params")
    for m in result["mask_memory"]:
        print(f"mask @{m['px']}px (L={m['seq_len']}): ours {m['ours_host_MiB_3rows']:.3f} MiB host (3 rows) + "
              f"{m['ours_device_bool_MiB_1row']:.0f} MiB bool/row on device; diffusers dense float32 on host "
              f"{m['diffusers_host_float32_MiB_1row']:.0f} MiB/row, {m['diffusers_host_float32_MiB_3rows']:.0f} MiB for 3 CFG rows")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
