"""`FusionPipeline`: load a model once, fuse batches of image pairs, get uint8 arrays back.

The library side of `ditfuse fuse` (ditfuse/commands/fuse.py parses, builds jobs and writes files
around it), for notebooks and other code:

    from ditfuse.core.images import read_image
    from ditfuse.interop.pairs import make_prompt
    from ditfuse.pipeline import FusionPipeline

    pipe = FusionPipeline.load(model="OmniGen-v1", lora="ditfuse-lora")  # or checkpoint="last.ckpt"
    fused = pipe.fuse_batch([(read_image("vis.png"), read_image("ir.png"))], [make_prompt("ivif")])

A model is OmniGen weights in either layout, a LoRA adapter of either format, or a Lightning
checkpoint with its EMA weights. Pre/post-processing (resize image 2, scale to `max_side`, pad to
the token grid, crop and resize back to image 1's size; test.py's rule with `official`) lives in
ditfuse/interop/pairs.py, shared with `ditfuse predict`. Each pair's initial noise comes from its
seed alone, not from its position in a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ditfuse.interop.convert import (
    _model_config,
    check_adapter,
    detect_adapter_format,
    load_adapter_state,
    merge_lora,
)

# FuseError, DTYPES: defined with the pair handling so that `ditfuse fuse` parses without the model stack
from ditfuse.interop.pairs import (
    DEFAULT_MAX_SIDE,
    DTYPES,
    FuseError,
    PreparedPair,
    _stderr_warning,
    batch_pairs,
    prepare_official,
    prepare_pair,
    restore,
)
from ditfuse.model.lora import has_lora, merge_and_unload
from ditfuse.module import DiTFuseModule, load_checkpoint_dict
from ditfuse.sampling.sampler import SamplerSettings


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------
def _default_vae(model: str | None, preset: str) -> str | None:
    """The VAE folder of an OmniGen model folder; an original-layout folder may lack one."""
    if model is None or preset == "tiny":
        return None
    if (Path(model) / "vae" / "config.json").is_file():
        return str(Path(model) / "vae")
    raise FuseError(f"{model} has no vae/ folder (the original OmniGen-v1 release downloads the SDXL VAE "
                    "at run time); pass --vae DIR with a local SDXL VAE (diffusers AutoencoderKL layout)")


def apply_lora(module, folder: str | Path) -> str:
    """Merge a LoRA adapter of either format into the module's transformer; returns the format."""
    transformer = module.backbone.transformer
    fmt = detect_adapter_format(folder)
    state, config = load_adapter_state(folder, dict(transformer.config))  # official -> ours, exact
    merge_lora(transformer, state, config)
    return fmt


def apply_ema(module, checkpoint: dict) -> int:
    """Copy the checkpoint's EMA weights (callbacks/ema.py) over the trained ones; returns the count."""
    ema = checkpoint.get("ema_state_dict") or {}
    params = dict(module.named_parameters())
    unknown = [k for k in ema if k not in params]
    if unknown:
        raise FuseError(f"the checkpoint's EMA weights name {len(unknown)} tensors this model lacks "
                        f"(e.g. {unknown[0]}); pass --no-ema to use the raw weights")
    with torch.no_grad():
        for k, v in ema.items():
            params[k].copy_(v.to(params[k].dtype))
    return len(ema)


def _module_from_checkpoint(path: str, model: str | None, preset: str | None, vae: str | None,
                            tokenizer: str | None, use_ema: bool, warn: Callable[[str], None]):
    if not Path(path).exists():  # a .ckpt file, or the folder of a sharded FSDP checkpoint
        raise FuseError(f"checkpoint {path} does not exist")
    given = {"pretrained": model, "preset": preset, "vae_path": vae, "tokenizer": tokenizer}
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        with warnings.catch_warnings():  # a LoRA checkpoint holds the adapter only: base keys are "missing"
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict")
            module = DiTFuseModule.from_checkpoint(path, map_location="cpu", **overrides)
    except FileNotFoundError as e:
        raise FuseError(f"{e} (the checkpoint's base model path is not here: pass --model DIR)") from None
    if use_ema:
        ckpt = load_checkpoint_dict(path)
        n = apply_ema(module, ckpt)
        if n:
            print(f"using the EMA weights of {path} ({n} tensors; --no-ema for the raw ones)")
    if has_lora(module.backbone.transformer):
        merge_and_unload(module.backbone.transformer)  # W + scale * B @ A: same output, faster
    return module


def load_module(model: str | None = None, preset: str | None = None, lora: str | None = None,
                checkpoint: str | None = None, vae: str | None = None, tokenizer: str | None = None,
                use_ema: bool = True, warn: Callable[[str], None] = _stderr_warning):
    """A `DiTFuseModule` in eval mode from the `ditfuse fuse` model options."""
    if lora and checkpoint:
        raise FuseError("give --lora or --checkpoint, not both (a LoRA checkpoint already holds its adapter)")
    if checkpoint:
        module = _module_from_checkpoint(checkpoint, model, preset, vae, tokenizer, use_ema, warn)
    else:
        preset = preset or ("omnigen-v1" if model else None)
        if preset is None:
            raise FuseError("no model: pass --model DIR (OmniGen weights), --checkpoint CKPT, or --preset tiny "
                            "for a random-init demo model")
        if model is None and preset != "tiny":
            raise FuseError(f"--preset {preset} needs --model DIR with its weights (only tiny runs random-init)")
        if model is None:
            warn("--preset tiny without --model/--checkpoint: the weights are RANDOM, outputs are not "
                 "meaningful fusions (use this for tests and demos)")
        if model is not None and not Path(model).is_dir():
            raise FuseError(f"model folder {model} does not exist")
        if lora:  # a wrong adapter fails in a second, before gigabytes of base weights load
            check_adapter(lora, _model_config(Path(model)) if model else None)
        module = DiTFuseModule(preset=preset, pretrained=model, vae_path=vae or _default_vae(model, preset),
                               tokenizer=tokenizer)
        if lora:
            fmt = apply_lora(module, lora)
            print(f"merged LoRA adapter {lora} ({'official DiTFuse format, converted' if fmt == 'official' else fmt})")
    return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FuseError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device, official: bool = False) -> torch.dtype:
    if dtype in (None, "auto"):  # OmniGenPipeline's default dtype is bf16 on every device
        return torch.bfloat16 if device.type == "cuda" or official else torch.float32
    if dtype not in DTYPES:
        raise FuseError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class FusionPipeline:
    """A loaded model plus the pre/post-processing of ditfuse/interop/pairs.py (test.py's with `official`).

    >>> pipe = FusionPipeline.load(model="OmniGen-v1", lora="ditfuse-lora")
    >>> fused = pipe.fuse(read_image("vis.png"), read_image("ir.png"), make_prompt("ivif"))
    >>> many = pipe.fuse_batch([(vis1, ir1), (vis2, ir2)], make_prompt("ivif"))  # a list of arrays
    """

    module: object
    max_side: int
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    warn: Callable[[str], None] = _stderr_warning
    official: bool = False

    @classmethod
    def load(cls, model: str | None = None, preset: str | None = None, lora: str | None = None,
             checkpoint: str | None = None, vae: str | None = None, tokenizer: str | None = None,
             use_ema: bool = True, device: str | None = None, dtype: str | None = None,
             max_side: int | None = None, sampler: SamplerSettings | None = None,
             warn: Callable[[str], None] = _stderr_warning, official: bool = False) -> FusionPipeline:
        dev = resolve_device(device)
        module = load_module(model, preset, lora, checkpoint, vae, tokenizer, use_ema, warn)
        # the official pipeline casts the whole model (buffers too) to bf16 by default
        module.backbone.to(device=dev, dtype=resolve_dtype(dtype, dev, official))
        module.to(dev)  # the codec stays float32 (the SDXL VAE overflows in fp16; the original keeps it too)
        return cls(module, check_max_side(module, max_side, official), sampler or SamplerSettings(), warn,
                   official)

    @property
    def multiple(self) -> int:
        return int(self.module.pixels_per_token)

    def prepare(self, image1: np.ndarray, image2: np.ndarray, name: str = "pair") -> PreparedPair:
        if self.official:
            item = prepare_official(image1, image2, self.max_side)
        else:
            item = prepare_pair(image1, image2, self.max_side, self.multiple)
        if item.image2_resized_from is not None:
            (h2, w2), (h1, w1) = item.image2_resized_from, item.original_hw
            self.warn(f"{name}: image 2 is {w2}x{h2}, image 1 is {w1}x{h1}; resized image 2 to image 1's size")
        return item

    @torch.no_grad()
    def sample(self, items: list[PreparedPair], prompts: list[str], seeds: list[int] | None = None
               ) -> list[np.ndarray]:
        """Fuse prepared pairs of one padded size; returns (H, W, 3) uint8 arrays at the output size
        (image 1's; test.py's processing size when official)."""
        m = self.module
        seeds = seeds or [self.sampler.seed] * len(items)
        m.val_sampler = self.sampler  # as predict_step: the module's sampler settings, a seed per row
        out = m.sample(batch_pairs(items, prompts, seeds), seed=seeds, size=items[0].sample_hw)
        return [restore(o, it.content_hw, it.original_hw, it.truncate) for o, it in zip(out, items)]

    def fuse(self, image1: np.ndarray, image2: np.ndarray, prompt: str, seed: int | None = None) -> np.ndarray:
        item = self.prepare(image1, image2)
        return self.sample([item], [prompt], None if seed is None else [seed])[0]

    def fuse_batch(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]], prompts: Sequence[str] | str,
                   seeds: Sequence[int] | None = None, batch_size: int = 8) -> list[np.ndarray]:
        """Fuse (image 1, image 2) arrays of any sizes under a prompt each (or one for all); returns
        (H, W, 3) uint8 arrays in the order of `pairs`. Pairs of one padded size are sampled
        together, at most `batch_size` at a time; an output does not depend on the grouping."""
        prompts = [prompts] * len(pairs) if isinstance(prompts, str) else list(prompts)
        seeds = [self.sampler.seed] * len(pairs) if seeds is None else list(seeds)
        if not len(prompts) == len(seeds) == len(pairs):
            raise ValueError(f"fuse_batch: {len(pairs)} pairs need as many prompts and seeds, "
                             f"got {len(prompts)} prompts and {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError(f"fuse_batch: batch_size must be >= 1, got {batch_size}")
        items = [self.prepare(a, b, f"pair {i}") for i, (a, b) in enumerate(pairs)]
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.batch_key, []).append(i)
        out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(items)
        for idx in groups.values():
            for k in range(0, len(idx), batch_size):
                chunk = idx[k:k + batch_size]
                fused = self.sample([items[i] for i in chunk], [prompts[i] for i in chunk], [seeds[i] for i in chunk])
                for i, rgb in zip(chunk, fused, strict=True):
                    out[i] = rgb
        return out


def check_max_side(module, max_side: int | None, official: bool = False) -> int:
    """--max-side: a multiple of the token size (any size >= 16 with --official, whose rule floors
    the sides to multiples of 16), within the model's position table."""
    m = int(module.pixels_per_token)
    limit = int(module.backbone.transformer.config.pos_embed_max_size) * module.codec.downsample
    if max_side is None:
        return min(DEFAULT_MAX_SIDE, limit // m * m)
    if official and 16 % m == 0:
        if max_side < 16:
            raise FuseError(f"--max-side {max_side} must be >= 16")
    elif max_side < m or max_side % m:
        raise FuseError(f"--max-side {max_side} must be a positive multiple of {m} (the model's pixels per token)")
    if max_side > limit:
        raise FuseError(f"--max-side {max_side} exceeds this model's position table ({limit} px); use <= {limit}")
    return max_side
