"""Per-GPU memory of a training recipe at full OmniGen-v1 depth, computed, not run.

One training step (forward under bf16 autocast, loss, backward, AdamW step) of the real
`Backbone` is traced on fake tensors (torch._subclasses.FakeTensorMode: shapes and dtypes, no
data, no compute) under torch's own memory tracker (torch.distributed._tools.mem_tracker
.MemTracker), which attributes every live storage to parameters, buffers, gradients,
optimizer state, activations or temporaries, and keeps the peak.

Depth: a 32-layer trace at 12k tokens is cheap on fake tensors, but building 32 peft-wrapped
blocks is not (seconds each), so two shallow models are traced, 2 and 3 layers, and every
category is extrapolated linearly: peak(32) = peak(2) + 30 * (peak(3) - peak(2)). Blocks are
identical, so the increment per block is exact for parameters and checkpointed inputs; 1 layer is
no base (its only block is the un-checkpointed last one, and the first checkpointed block costs
more than the later ones).

FSDP (FULL_SHARD over `world` GPUs, bf16-mixed): fp32 parameter, gradient and AdamW shards are
16 bytes per parameter / `world`, from the traced model's parameter count; two units (the one
being computed and the prefetched one) are gathered whole in bf16, with their bf16 gradients
before the reduce-scatter; activations and temporaries are the trace's, on bf16 compute copies
as Lightning's FSDPPrecision (param_dtype bf16) runs them, with every block checkpointed as the
policy does.

Not counted (the 10% headroom the budget test keeps is for them): the CUDA context and the
caching allocator's fragmentation, NCCL buffers, the VAE encode (no_grad, before the DiT forward,
freed before it) and the data loader's pinned batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditfuse.model.backbone import Backbone, build_transformer
from ditfuse.model.conditioning import build_conditioning
from ditfuse.model.config import ModelConfig
from ditfuse.model.lora import LoraSettings, add_lora
from ditfuse.model.tokenizer import BuiltinTokenizer

GB = 1e9
CATEGORIES = ("param", "buffer", "grad", "optstate", "act", "temp")
# MemTracker's category names (torch.distributed._tools.mem_tracker._MemRefType values)
_TRACKER_NAMES = {"Parameter": "param", "Buffer": "buffer", "Gradient": "grad", "Optstate": "optstate",
                  "Activation": "act", "Temp": "temp"}
PROMPT = ("Combine the key features of <img><|image_1|></img> and <img><|image_2|></img> into one "
          "image: keep the thermal targets of the infrared image and the texture of the visible one.")


@dataclass
class Recipe:
    name: str
    batch_size: int  # per GPU
    bucket: tuple[int, int]  # (h, w) pixels of the largest configured bucket
    lora_r: int | None  # None: full fine-tune
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    base_dtype: torch.dtype | None = torch.bfloat16  # frozen base (LoRA); None: fp32
    checkpointing: bool = True
    strategy: str = "ddp"  # "ddp" | "fsdp"
    world: int = 1
    num_layers: int = 32

    @property
    def tokens_per_sample(self) -> int:
        """Image tokens of 2 inputs + the output (16 px per token side); text comes on top."""
        return 3 * (self.bucket[0] // 16) * (self.bucket[1] // 16)


def _fakeify(model: nn.Module, mode, frozen_dtype: torch.dtype | None,
             trainable_dtype: torch.dtype | None = None) -> None:
    """Meta parameters and buffers -> fake CPU tensors. Frozen weights become buffers: MemTracker
    hooks the gradient of every parameter and refuses ones that need none; a buffer costs the
    same bytes."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            dtype = (trainable_dtype or p.dtype) if p.requires_grad else (frozen_dtype or p.dtype)
            with mode:
                fake = torch.empty(p.shape, dtype=dtype)
            if p.requires_grad:
                mod._parameters[name] = nn.Parameter(fake)
            else:
                del mod._parameters[name]
                mod._buffers[name] = fake
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                # as module.to(base_dtype) does: float buffers (pos_embed) follow the frozen dtype;
                # left fp32, pos_embed would promote the whole residual stream to fp32
                cast = frozen_dtype or trainable_dtype
                dtype = cast if cast is not None and b.is_floating_point() else b.dtype
                with mode:
                    mod._buffers[name] = torch.empty(b.shape, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _conditioning(batch: int, tokens_per_image: int):
    """Conditioning of `batch` 2-image prompts; its data-dependent parts (small int tensors)
    are computed for real here, so the fake trace needs no values."""
    cond = build_conditioning(BuiltinTokenizer(), [PROMPT] * batch, 2, tokens_per_image=tokens_per_image,
                              num_output_tokens=tokens_per_image)
    for name in ("attention", "position_ids", "image_token_index"):
        value = getattr(cond, name)()
        object.__setattr__(cond, name, lambda v=value: v)
    return cond


@dataclass
class Step:
    """A built model, optimizer and inputs of one recipe's training step (fake or real)."""

    backbone: nn.Module
    opt: torch.optim.Optimizer
    inputs: tuple
    mode: Any  # the FakeTensorMode, or None for real tensors

    def run(self, steps: int = 1) -> None:
        x0, t, cond, cond_lat = self.inputs
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):  # as precision bf16-mixed
                v = self.backbone(x0, t, cond, cond_lat)
            (v.float() - x0).pow(2).mean().backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def build_step(recipe: Recipe, num_layers: int, fake: bool = True) -> Step:
    """`recipe`'s model at `num_layers` layers with its optimizer and a batch at its bucket;
    fake=False builds it for real (the 1-2 layer validation against a measured peak)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = ModelConfig.from_name("omnigen-v1", num_layers=num_layers)
    h, w = recipe.bucket[0] // 8, recipe.bucket[1] // 8  # SDXL VAE latents
    cond = _conditioning(recipe.batch_size, (h // 2) * (w // 2))
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with torch.device("meta" if fake else "cpu"):
        tr = build_transformer(cfg, seed=None if fake else 0)
    lora = recipe.lora_r is not None
    if lora and not fake and recipe.base_dtype is not None:
        tr = tr.to(recipe.base_dtype)
    if lora:
        add_lora(tr, LoraSettings(r=recipe.lora_r, alpha=float(recipe.lora_r), targets=recipe.lora_targets))
    if fake:  # FSDP bf16-mixed computes on bf16 gathered copies (Lightning's FSDPPrecision param_dtype)
        _fakeify(tr, mode, recipe.base_dtype if lora else None,
                 torch.bfloat16 if recipe.strategy == "fsdp" else None)
    backbone = Backbone(tr, gradient_checkpointing=recipe.checkpointing)
    with mode if fake else torch.device("cpu"):
        inputs = (torch.randn(recipe.batch_size, 4, h, w), torch.rand(recipe.batch_size), cond,
                  torch.randn(recipe.batch_size, 2, 4, h, w))
        opt = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad])
    return Step(backbone, opt, inputs, mode)


def _categories(snap: dict) -> dict[str, int]:
    """MemTracker's {ref type: bytes} of one device -> {category: bytes}."""
    out = dict.fromkeys(CATEGORIES, 0)
    for ref, nbytes in snap.items():
        key = _TRACKER_NAMES.get(getattr(ref, "value", str(ref)))
        if key:
            out[key] += nbytes
    return out


def _tracker():
    """A MemTracker that keeps every snapshot it takes (per op), by category."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class AllSnapshots(MemTracker):
        moments: list[dict[str, int]]

        def _update_peak_stats(self, peak_state) -> None:
            super()._update_peak_stats(peak_state)
            self.moments.extend(_categories(snap) for snap in self._curr_mem_snap.values())

    tracker = AllSnapshots()
    tracker.moments = []
    return tracker


def trace_step(recipe: Recipe, num_layers: int, fake: bool = True) -> dict[str, int]:
    """Bytes per category at the per-GPU peak of a steady-state training step of `recipe` at
    `num_layers` layers (for FSDP the moment where activations, temporaries and buffers peak).

    AdamW's state is allocated before the trace (`_init_adamw_state`: what its first `step()`
    allocates, without tracing a whole warm-up step), so the traced step is a steady-state one.
    MemTracker files everything allocated inside `opt.step()` under "Optstate"; beyond the
    resident state that is the step's temporaries (AdamW's sqrt(exp_avg_sq) and its quotient,
    twice the largest parameter: 0.79 GB for the fp32 token embedding of a full fine-tune), with
    all gradients still alive: the peak of a full fine-tune's step. They are moved to "temp"."""
    step = build_step(recipe, num_layers, fake)
    fsdp = recipe.strategy == "fsdp"
    # FSDP: parameters, gradients and optimizer state are added from the parameter count
    # (estimate); the peak moment is the activations' own (its AdamW step runs on the shards,
    # after the backward freed the activations)
    weights = dict.fromkeys(("param", "grad", "optstate"), 0.0 if fsdp else 1.0)
    with step.mode if fake else torch.device("cpu"):
        _init_adamw_state(step.opt)
        tracker = _tracker()
        tracker.track_external(step.backbone, step.opt)
        with tracker:
            step.run()
    state = min(m["optstate"] for m in tracker.moments)  # the resident state (outside opt.step())
    steady = [{**m, "optstate": state, "temp": m["temp"] + (0 if fsdp else m["optstate"] - state)}
              for m in tracker.moments]
    return max(steady, key=lambda m: sum(weights.get(k, 1.0) * v for k, v in m.items()))


def _init_adamw_state(opt: torch.optim.Optimizer) -> None:
    """AdamW's state as its first `step()` leaves it (zero moments, a step count), allocated by
    that step itself on zero gradients, which are freed again."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def estimate(recipe: Recipe) -> dict[str, Any]:
    """Per-GPU peak bytes of `recipe` at its full depth, by category, and the total."""
    a, b = trace_step(recipe, 2), trace_step(recipe, 3)
    depth = recipe.num_layers - 2
    full = {k: a[k] + depth * (b[k] - a[k]) for k in CATEGORIES}
    if recipe.strategy == "fsdp":
        # traced parameters are the bf16 compute copies: 2 bytes each
        numel, block = full["param"] // 2, (b["param"] - a["param"]) // 2
        full["param"] = 4 * numel // recipe.world  # fp32 shards
        full["grad"] = 4 * numel // recipe.world  # fp32 gradient shards (after reduce-scatter)
        full["optstate"] = 8 * numel // recipe.world  # AdamW exp_avg + exp_avg_sq, fp32 shards
        # two units gathered at once (current + backward prefetch): bf16 weights and their bf16
        # unsharded gradients before the reduce-scatter
        full["gathered"] = 2 * (2 * block + 2 * block)
    full["total"] = sum(v for k, v in full.items() if k != "total")
    full["tokens"] = recipe.batch_size * recipe.tokens_per_sample
    return full


def recipe_from_configs(name: str, *configs: str | Path) -> Recipe:
    """The Recipe a `ditfuse fit --config A --config B` composition trains (later files win)."""
    import yaml

    merged: dict[str, Any] = {}
    for path in configs:
        _merge(merged, yaml.safe_load(Path(path).read_text()))
    model, data, trainer = merged.get("model", {}), merged.get("data", {}), merged.get("trainer", {})
    buckets = data.get("buckets") or [[data.get("image_size", 512)] * 2]
    bucket = max((tuple(b) for b in buckets), key=lambda b: b[0] * b[1])
    strategy = trainer.get("strategy")
    kind = "fsdp" if isinstance(strategy, dict) and "FSDP" in strategy.get("class_path", "") else "ddp"
    lora = model.get("lora")
    fsdp_ckpt = kind == "fsdp" and bool((strategy.get("init_args") or {}).get("activation_checkpointing_policy"))
    return Recipe(name=name, batch_size=int(data.get("batch_size", 1)), bucket=bucket,
                  lora_r=lora["r"] if lora else None,
                  lora_targets=list(lora.get("targets", ["to_q", "to_k", "to_v", "to_out.0"])) if lora else [],
                  base_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(model.get("base_dtype")),
                  checkpointing=bool(model.get("gradient_checkpointing")) or fsdp_ckpt, strategy=kind,
                  world=_count(trainer.get("devices", 1)) * _count(trainer.get("num_nodes", 1)))


def _count(value: Any) -> int:
    """trainer.devices / num_nodes as a count; 'auto' (the base config's) counts as 1."""
    return int(value) if str(value).isdigit() else 1


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in (new or {}).items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and "class_path" not in v:
            _merge(into[k], v)
        else:
            into[k] = v
