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

Side by side with the original training path (issue 13):

    PYTHONPATH=$PWD python benchmarks/train_step.py --original-python /tmp/venv45/bin/python \
        --original-src /path/to/DiTFuse [--layers 1] [--rounds 1]

builds the OmniGen-v1-width model of benchmarks/vs_original.py (original layout, same weights for
both), and runs, each in a fresh process, interleaved: the original's step as its train.py takes
it (OmniGen.from_pretrained, llm.gradient_checkpointing_enable(), peft LoRA r=8 on qkv_proj /
o_proj, AdamW, TrainDataCollator's dense mask and positions, flow-matching MSE as
train_helper/loss.py) and this project's (LoRA r=8 on to_q/to_k/to_v/to_out.0, checkpointing, the
structured attention), on the same token ids (2 inputs + output at 512 px: 3,089 tokens), the same
latents. It prints CPU seconds per step, tokens/s, peak RSS and its growth over the loaded model; `--flops`
adds each step's GFLOP (as in benchmarks/vs_original.py) and the largest speed-up any exact fp32
implementation could show at this machine's matmul peak. Ours never recomputes the last block (its
backward follows at once), the original checkpoints every decoder layer: one block forward per
step, which is a third of the work at 1 layer and 1/(3 x depth) of it at depth, so compare
`--layers 1` with `--layers 2` before reading a 1-layer ratio as the full model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from _child import FLOP_COUNT, MEMORY_PROBES, gemm_peak

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, build_transformer
from ditfuse.model.conditioning import build_conditioning, image_only_prompt
from ditfuse.model.config import ModelConfig
from ditfuse.sampling.flow import interpolate, per_sample_mse, sample_t
from ditfuse.model.lora import LoraSettings, add_lora, count_parameters
from ditfuse.model.tokenizer import BuiltinTokenizer


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


CHILD = r"""
import json, resource, sys, time
import torch
cfg = json.loads(sys.argv[-1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(0)
""" + MEMORY_PROBES + FLOP_COUNT + r"""
ids, spans, n, h = cfg["ids"], cfg["spans"], cfg["n"], cfg["h"]
g = torch.Generator().manual_seed(0)
lat = torch.randn(2, 4, h, h, generator=g)
x1 = torch.randn(1, 4, h, h, generator=g)
"""

ORIGINAL_STEP = CHILD + r"""
sys.path.insert(0, cfg["src"])
from peft import LoraConfig, get_peft_model
from OmniGen import OmniGen
from OmniGen.processor import OmniGenCollator
model = OmniGen.from_pretrained(cfg["model"])
model.llm.config.use_cache = False
# train.py calls gradient_checkpointing_enable(); its reentrant default gives a LoRA-only model no
# gradients (frozen inputs: "element 0 of tensors does not require grad"), so use transformers'
# own non-reentrant option, the same recompute
model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                         target_modules=["qkv_proj", "o_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
mllm = [{"input_ids": ids, "pixel_values": [lat[0], lat[1]], "image_sizes": spans}]
col = OmniGenCollator(pad_token_id=cfg["pad"], hidden_size=cfg["hidden"])
input_ids, pos, mask, padding, _, sizes = col.process_mllm_input(mllm, [[8 * h, 8 * h]])
model.train()
def step():  # train.py's step: training_losses (flow matching, sigmoid-normal t) + AdamW
    x0 = torch.randn_like(x1)
    t = torch.sigmoid(torch.randn(1))
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    out = model(xt, t, input_ids=input_ids, input_img_latents=lat, input_image_sizes=sizes, attention_mask=mask,
                position_ids=pos, padding_latent=padding, past_key_values=None, return_past_key_values=False)
    loss = ((out - (x1 - x0)) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
"""

OURS_STEP = CHILD + r"""
from ditfuse.model.backbone import Backbone, load_transformer
from ditfuse.model.conditioning import Conditioning
from ditfuse.sampling.flow import interpolate, per_sample_mse, sample_t
from ditfuse.model.lora import LoraSettings, add_lora
tr = load_transformer(cfg["model"])
add_lora(tr, LoraSettings(r=8, alpha=8))
bb = Backbone(tr, gradient_checkpointing=True)
opt = torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-4)
L = torch.tensor
seg = torch.zeros(1, len(ids), dtype=torch.long)
for s, (a, b) in enumerate(spans):
    seg[0, a:b] = s + 1
cond = Conditioning(input_ids=L([ids]), pad=L([0]), segment=seg, span_row=L([0, 0]),
                    span_start=L([a for a, _ in spans]), span_image=L([0, 1]), tokens_per_image=n,
                    num_output_tokens=n)
lat5 = lat[None]
bb.train()
def step():
    t = sample_t(1)
    x0 = torch.randn_like(x1)
    loss = per_sample_mse(bb(interpolate(x0, x1, t), t, cond, lat5), x1 - x0).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
"""

TIMING = r"""
loaded = rss_mib()
for _ in range(cfg["warmup"]):
    step()
if cfg.get("flops"):  # the counting pass: one untimed step
    print("RESULT " + json.dumps(count_flops(step)[1]))
    sys.exit(0)
cpu, wall = [], []
for _ in range(cfg["steps"]):
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
print("RESULT " + json.dumps({"cpu_s": sorted(cpu)[len(cpu) // 2], "wall_s": sorted(wall)[len(wall) // 2],
                              "loaded_MiB": loaded,
                              "peak_MiB": status_mib("VmHWM")}))
"""


def side_by_side(a: argparse.Namespace) -> None:
    """The original training step vs ours on the same weights and tokens, fresh processes (CPU)."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from vs_original import HIDDEN, ROOT, write_model

    work = Path(a.work or tempfile.mkdtemp(prefix="train_step_"))
    model = write_model(work / "OmniGen-v1-width", a.layers or 1)
    tok = BuiltinTokenizer()  # ids < the model's 1024-entry vocabulary
    h = a.size // 8
    n = (h // 2) ** 2
    cond = build_conditioning(tok, [P.default_prompt("m3")], 2, n, n)
    spans = [[int(s), int(s) + n] for s in cond.span_start]
    cfg = {"src": a.original_src, "model": str(model), "ids": cond.input_ids[0].tolist(), "spans": spans, "n": n,
           "h": h, "pad": tok.pad_token_id, "hidden": HIDDEN, "threads": a.threads,
           "warmup": 1 if a.warmup is None else a.warmup, "steps": a.steps or 1}
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "OMP_NUM_THREADS": str(a.threads)}
    codes = {"original": ([a.original_python, "-c", ORIGINAL_STEP + TIMING], env),
             "ours": ([sys.executable, "-c", OURS_STEP + TIMING], {**env, "PYTHONPATH": str(ROOT)})}
    def run(name: str, flops: bool = False) -> dict:
        cmd, e = codes[name]
        out = subprocess.run([*cmd, json.dumps({**cfg, "flops": flops})], env=e, capture_output=True, text=True,
                             check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise SystemExit(f"{name} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    runs: dict[str, list[dict]] = {k: [] for k in codes}
    for r in range(a.rounds):
        for name in codes:
            runs[name].append(run(name))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    counted = {name: run(name, flops=True) for name in codes} if a.flops else {}
    for name, c in counted.items():
        print(f"FLOPs {name}: {c['gflop']:.0f} GFLOP {c['gflop_by_op']}", flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("cpu_s", "wall_s", "peak_MiB", "loaded_MiB")}
           for k, v in runs.items()}
    L = cond.seq_len
    print(f"LoRA train step, {a.size}px, 2 inputs, L={L}, {a.layers or 1} layer(s) at hidden {HIDDEN}, fp32, "
          f"{a.threads} threads, gradient checkpointing, median of {a.rounds} round(s), process CPU time")
    for k, m in med.items():
        print(f"  {k:9s} {m['cpu_s']:7.1f} s CPU/step  {L / m['cpu_s']:6.1f} tokens/s  peak {m['peak_MiB']:7.0f} MiB "
              f"(+{m['peak_MiB'] - m['loaded_MiB']:.0f} over loaded)")
    o, u = med["original"], med["ours"]
    grow = lambda m: m["peak_MiB"] - m["loaded_MiB"]  # noqa: E731
    summary = {"seq_len": L, "layers": a.layers or 1, "size": a.size, "threads": a.threads, "rounds": a.rounds,
               "median": med, "speedup_cpu": o["cpu_s"] / u["cpu_s"], "peak_ratio": u["peak_MiB"] / o["peak_MiB"],
               "peak_growth_ratio": grow(u) / grow(o), "runs": runs}
    print(f"  speed-up {summary['speedup_cpu']:.2f}x; peak RSS ours/original {summary['peak_ratio']:.2f} "
          f"(growth over loaded {summary['peak_growth_ratio']:.2f})")
    if counted:
        peak = gemm_peak(a.threads, rows=(L,), hidden=HIDDEN)
        g = {k: c["gflop"] for k, c in counted.items()}
        summary["flops"] = {"gflop": g, "gflop_by_op": {k: c["gflop_by_op"] for k, c in counted.items()},
                            "gemm_peak_gflop_per_cpu_s": peak, "flop_ratio": g["original"] / g["ours"],
                            "max_speedup_at_gemm_peak": o["cpu_s"] / (g["ours"] / peak)}
        f = summary["flops"]
        print("  FLOPs per step (torch FlopCounterMode: matmuls, convolutions, attention, checkpoint recomputes; "
              "elementwise ops not counted):")
        for k, gk in g.items():
            print(f"    {k:9s} {gk:7.0f} GFLOP  {gk / med[k]['cpu_s']:6.1f} GFLOP per CPU-s")
        print(f"    this machine's fp32 matmul peak: {peak:.1f} GFLOP per CPU-s; FLOP ratio {f['flop_ratio']:.2f}x; "
              f"at most {f['max_speedup_at_gemm_peak']:.2f}x if ours ran every FLOP at that peak")
    print(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="depth (default: 32 on GPU, 1 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on GPU, 1 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on GPU, 1 on CPU)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--original-python", default=None, help="side by side with the original (see above)")
    ap.add_argument("--original-src", default=None, help="DiTFuse sources: its OmniGen/ folder")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (side by side)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (side by side)")
    ap.add_argument("--work", default=None, help="folder for the side-by-side model (kept; reused)")
    ap.add_argument("--flops", action="store_true", help="side by side: also one untimed step per code under "
                    "torch's FlopCounterMode, and the largest speed-up possible at this machine's matmul peak")
    a = ap.parse_args()
    if a.original_python:
        if not a.original_src:
            ap.error("--original-python needs --original-src (the DiTFuse checkout with OmniGen/)")
        return side_by_side(a)

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
