"""Per-kind pipelines: raw shard sample -> training sample (batch-contract fields, one row).

decode (8/16-bit, grey/RGB) -> aligned resize/crop/flip -> M3 / control op / seg overlay ->
prompt. Everything random comes from one per-sample seed, so (seed, key) reproduces a sample.
Output images are in [-1, 1] as docs/CONTRACTS.md requires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.io import decode_image, float01, to_raw_tensor
from datamodules.m3 import M3Config, m3_views, seed_for
from datamodules.schema import FUSION_FALLBACKS, NOT_A_CLASS, SchemaError, check_sample, image_field
from datamodules.targets import (
    IVIF_FALLBACKS,
    SEG_ALPHA,
    SEG_COLOR,
    ControlConfig,
    control_op,
    ivif_fallback,
    seg_overlay,
)
from ditfuse.core.prompts import (
    CONTROL_SUBTASKS,
    FUSION_TASKS,
    build_prompt,
    instruction_for,
)


class MissingTargetError(Exception):
    """An mff/mef pair without a target and no fallback chosen. Not a bad sample: the run stops."""


@dataclass
class PipelineConfig:
    image_size: int = 512
    m3: M3Config = field(default_factory=M3Config)
    control: ControlConfig = field(default_factory=ControlConfig)
    tags: bool = True  # False: the ablation without task/subtask tags (PROMPTS.md)
    random_instructions: bool = True  # False: always the published instruction
    instructions: dict[str, list[str]] | None = None  # per task or control subtask: own pool
    ivif_fallback: str = "mean_y"
    target_fallback: dict[str, str] = field(default_factory=dict)  # mff/mef -> FUSION_FALLBACKS
    size: tuple[int, int] | None = None  # this sample's bucket (h, w); None: image_size squares
    max_upscale: float = 2.0  # a bucket never upscales an image more than this
    seg_alpha: float = SEG_ALPHA
    seg_color: tuple[float, float, float] = SEG_COLOR

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.ivif_fallback not in IVIF_FALLBACKS:
            raise ValueError(f"ivif_fallback must be one of {', '.join(IVIF_FALLBACKS)}, got {self.ivif_fallback!r}")
        for task, mode in self.target_fallback.items():
            if task not in ("mff", "mef") or mode not in FUSION_FALLBACKS:
                raise ValueError(f"target_fallback: {task}={mode!r}; keys mff/mef, values {', '.join(FUSION_FALLBACKS)}")
        known = {*FUSION_TASKS, "m3", "seg", *CONTROL_SUBTASKS}
        bad = set(self.instructions or {}) - known
        if bad:
            raise ValueError(f"instructions: unknown keys {sorted(bad)}; use tasks or control subtasks {sorted(known)}")


@dataclass
class _Draw:
    """The per-sample random sources."""

    g: torch.Generator
    rng: random.Random

    @classmethod
    def for_key(cls, seed: int, key: str) -> _Draw:
        s = seed_for(seed, key)
        return cls(torch.Generator().manual_seed(s), random.Random(s))


# ---------------------------------------------------------------------------------------------
# decode and geometry
# ---------------------------------------------------------------------------------------------
def _image(sample: dict, stem: str, meta: dict) -> Tensor:
    """Raw (C, H, W) plane (uint8, or float in [0, 1] for 16-bit images, stretched over the range
    the writer recorded in json `ranges`)."""
    name = image_field(sample, stem)
    arr = decode_image(sample[name], f"{sample['__key__']}.{name}")  # type: ignore[index]
    vr = (meta.get("ranges") or {}).get(stem)
    return to_raw_tensor(arr, tuple(vr) if vr else None)


def _planes(sample: dict, stems: tuple[str, ...], meta: dict, cfg: PipelineConfig, d: _Draw | None) -> list[Tensor]:
    """Decode, crop/flip together, then convert only the crops: (3, S, S) floats in [0, 1]."""
    return [float01(p) for p in _geometry([_image(sample, s, meta) for s in stems], cfg, d)]


def _label_map(sample: dict) -> Tensor:
    arr = decode_image(sample[image_field(sample, "mask")], f"{sample['__key__']}.mask")  # type: ignore[index]
    if arr.ndim == 3:
        arr = arr[:, :, 0]
    return torch.from_numpy(arr.astype("int64"))


def _geometry(planes: list[Tensor], cfg: PipelineConfig, d: _Draw | None) -> list[Tensor]:
    """Aligned resize, crop and flip of same-size planes (C, H, W).

    Square `image_size` (no bucket): short-side upscale only if needed, then a crop (a large photo
    gives a full-resolution patch). Bucket (h, w): resize to cover the bucket (never more than
    `max_upscale`), then crop. d=None: deterministic centre crop, no flip (validation). Label maps
    travel as int planes and are resized with nearest neighbour.
    """
    h, w = planes[0].shape[-2:]
    if any(p.shape[-2:] != (h, w) for p in planes):
        raise SchemaError(f"images of one sample differ in size: {[tuple(p.shape[-2:]) for p in planes]}")
    if cfg.size is None:
        bh = bw = cfg.image_size
        s = max(bh / min(h, w), 1.0)
    else:
        bh, bw = cfg.size
        s = max(bh / h, bw / w)
        if s > cfg.max_upscale + 1e-9:
            raise SchemaError(f"a {h}x{w} image needs {s:.2f}x upscaling for bucket {bh}x{bw} > "
                              f"data.max_upscale={cfg.max_upscale}")
    if s != 1.0:
        h, w = max(bh, round(h * s)), max(bw, round(w * s))
        planes = [_resize(p, h, w) for p in planes]
    if d is None:
        top, left, flip = (h - bh) // 2, (w - bw) // 2, False
    else:
        top = int(torch.randint(h - bh + 1, (1,), generator=d.g))
        left = int(torch.randint(w - bw + 1, (1,), generator=d.g))
        flip = bool(torch.rand(1, generator=d.g) < 0.5)
    out = [p[..., top:top + bh, left:left + bw] for p in planes]
    return [p.flip(-1) if flip else p for p in out]


def _resize(p: Tensor, h: int, w: int) -> Tensor:
    if p.dtype == torch.int64:  # label map (H, W)
        return F.interpolate(p[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    p = p.float() / 255 if p.dtype == torch.uint8 else p
    return F.interpolate(p[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# instructions
# ---------------------------------------------------------------------------------------------
def _instruction(cfg: PipelineConfig, task: str, d: _Draw | None, *, subtask: str | None = None,
                 cls: str | None = None, base_task: str = "m3") -> str:
    rng = d.rng if (d is not None and cfg.random_instructions) else None
    own = cfg.instructions or {}
    pick = (lambda pool: pool[0]) if rng is None else (lambda pool: rng.choice(pool))
    if task == "control" and subtask in own:
        base = _instruction(cfg, base_task, d, cls=cls) if base_task in own else instruction_for(
            base_task if base_task != "seg" else "m3", rng=rng)
        return f"{base.rstrip('.')}. {pick(own[subtask])}"
    if task in own:
        return pick(own[task]).format(cls=cls)
    return instruction_for(task, subtask=subtask, cls=cls, rng=rng, base_task=base_task)


# ---------------------------------------------------------------------------------------------
# kinds
# ---------------------------------------------------------------------------------------------
def _fusion_images(sample: dict, meta: dict, cfg: PipelineConfig, d: _Draw | None) -> tuple[Tensor, Tensor, Tensor, dict]:
    """img1, img2, target (each (3, S, S) in [0, 1]) of a fusion-style sample, + meta additions."""
    has_target = image_field(sample, "target") is not None
    planes = _planes(sample, ("img1", "img2", "target") if has_target else ("img1", "img2"), meta, cfg, d)
    task = meta.get("task", "m3")
    if has_target:
        return planes[0], planes[1], planes[2], {"target_source": "shard"}
    if task == "ivif":
        return planes[0], planes[1], ivif_fallback(planes[0], planes[1], cfg.ivif_fallback), \
            {"target_source": f"fallback:{cfg.ivif_fallback}"}
    mode = _target_fallback(sample, meta, cfg, task)
    target = {"mean": lambda: (planes[0] + planes[1]) / 2, "image1": lambda: planes[0],
              "image2": lambda: planes[1]}[mode]()
    return planes[0], planes[1], target, {"target_source": f"fallback:{mode}"}


def _target_fallback(sample: dict, meta: dict, cfg: PipelineConfig, task: str) -> str:
    """The explicit choice for an mff/mef pair without a target: the config's, else the one the
    shard writer recorded (`target_fallback` in the json); never a silent default (a mean of the
    two sources trains a multi-focus model to blur)."""
    mode = cfg.target_fallback.get(task) or meta.get("target_fallback")
    if mode is None:
        raise MissingTargetError(
            f"{task} sample {sample.get('__key__')} in {sample.get('__shard__')} has no target.png; set "
            f"data.target_fallback.{task} to one of {', '.join(FUSION_FALLBACKS)} (or write targets)")
    if mode not in FUSION_FALLBACKS:
        raise MissingTargetError(f"{sample.get('__shard__')}: sample {sample.get('__key__')} records "
                                 f"target_fallback={mode!r}; use one of {', '.join(FUSION_FALLBACKS)}")
    return mode


def _m3_images(sample: dict, meta: dict, cfg: PipelineConfig, d: _Draw | None, seed_key: tuple[int, str]) -> tuple[Tensor, Tensor, Tensor, dict]:
    if image_field(sample, "img") is None:  # pre-made views
        a, b, t, extra = _fusion_images(sample, meta, cfg, d)
        return a, b, t, {**extra, "m3": "shard"}
    (clean,) = _planes(sample, ("img",), meta, cfg, d)
    # the M3 draw has its own generator so a (seed, key) reproduces the pair on its own
    res = m3_views(clean, cfg.m3, torch.Generator().manual_seed(seed_for(*seed_key)))
    return res.view1, res.view2, clean, {"target_source": "clean", "m3_block": res.block_size}


def _row(kind: str, task: str, prompt: str, a: Tensor, b: Tensor, target: Tensor, sample: dict,
         meta: dict, *, subtask: str | None = None, mask: Tensor | None = None,
         base: Tensor | None = None) -> dict:
    """One sample; images still in [0, 1] (collate writes the batch in [-1, 1] with one copy)."""
    return {
        "kind": kind, "task": task, "prompt": prompt, "subtask": subtask,
        "key": sample["__key__"], "meta": {**meta, "shard": sample.get("__shard__")},
        "image1": a, "image2": b, "target": target,  # (3, S, S) each
        "mask": mask, "control_base": base,  # (S, S) bool / (3, S, S), or None
    }


def process(kind: str, sample: dict, cfg: PipelineConfig, *, seed: int, draw_key: str | None = None,
            train: bool = True, size: tuple[int, int] | None = None) -> dict:
    """Turn one raw shard sample of `kind` into a batch row, `size` (h, w) when buckets are on.

    `draw_key` keys the randomness (defaults to the sample key: the same sample always gets the same
    crop/M3/prompt); a training stream passes a key that includes the pass it is drawn in.
    """
    if size is not None:
        cfg = replace(cfg, size=tuple(size))
    meta = check_sample(kind, sample)
    dkey = draw_key or sample["__key__"]
    d = _Draw.for_key(seed, dkey) if train else None
    rng_d = d or _Draw.for_key(seed, dkey)  # validation still draws M3/subtask/class, deterministically
    m3_key = (seed, f"m3/{dkey}")
    if kind == "fusion":
        a, b, t, extra = _fusion_images(sample, meta, cfg, d)
        task = meta["task"]
        instr = meta.get("instruction") or _instruction(cfg, task, d)
        return _row(kind, task, build_prompt(task, instr, tags=cfg.tags), a, b, t, sample, {**meta, **extra})
    if kind == "m3":
        a, b, t, extra = _m3_images(sample, meta, cfg, d, m3_key)
        return _row(kind, "m3", build_prompt("m3", _instruction(cfg, "m3", d), tags=cfg.tags), a, b, t,
                    sample, {**meta, **extra})
    if kind == "seg":
        return _seg(sample, meta, cfg, d, rng_d)
    return _control(sample, meta, cfg, d, rng_d, m3_key)


def _seg(sample: dict, meta: dict, cfg: PipelineConfig, d: _Draw | None, rng_d: _Draw) -> dict:
    a, b, labels = _geometry([_image(sample, "img1", meta), _image(sample, "img2", meta), _label_map(sample)],
                             cfg, d)
    a, b = float01(a), float01(b)
    classes = {int(k): str(v) for k, v in meta["classes"].items()}
    named = [k for k, v in classes.items() if v.lower() not in NOT_A_CLASS] or list(classes)
    present = [k for k in named if bool((labels == k).any())]
    label = rng_d.rng.choice(sorted(present or named))  # prefer a class visible in the crop
    mask = labels == label
    base = b if meta.get("overlay_base", "img1") == "img2" else a
    target = seg_overlay(base, mask, cfg.seg_alpha, cfg.seg_color)
    instr = _instruction(cfg, "seg", d, cls=classes[label])
    extra = {"seg_label": label, "seg_class": classes[label], "target_source": "seg_overlay"}
    return _row("seg", "seg", build_prompt("seg", instr, tags=cfg.tags), a, b, target, sample,
                {**meta, **extra}, mask=mask)


def _control(sample: dict, meta: dict, cfg: PipelineConfig, d: _Draw | None, rng_d: _Draw,
             m3_key: tuple[int, str]) -> dict:
    """Pre-made triple (json subtask, target already adjusted) or derived: op on the base target."""
    premade = meta.get("subtask") is not None and not meta.get("derive", False)
    if image_field(sample, "img") is not None or (image_field(sample, "target") is None and "task" not in meta):
        a, b, base, extra = _m3_images(sample, meta, cfg, d, m3_key)
        base_task = "m3"
    else:
        a, b, base, extra = _fusion_images(sample, meta, cfg, d)
        base_task = meta.get("task", "m3")
    subtask = meta.get("subtask") or _draw_subtask(cfg.control, rng_d)
    target = base if premade else control_op(base, subtask, cfg.control)
    instr = _instruction(cfg, "control", d, subtask=subtask, base_task=base_task)
    extra = {**extra, "control_source": "shard" if premade else "derived", "base_task": base_task}
    return _row("control", "control", build_prompt("control", instr, subtask=subtask, tags=cfg.tags),
                a, b, target, sample, {**meta, **extra}, subtask=subtask, base=None if premade else base)


def _draw_subtask(cfg: ControlConfig, d: _Draw) -> str:
    names = [s for s in CONTROL_SUBTASKS if cfg.subtasks.get(s, 0) > 0]
    return d.rng.choices(names, weights=[cfg.subtasks[s] for s in names])[0]


def collate(rows: list[dict]) -> dict:
    """Rows -> the batch dict of docs/CONTRACTS.md.

    images (B, 2, 3, S, S) and target / control_base (B, 3, S, S) in [-1, 1]; mask (B, S, S) bool
    (all False outside seg rows); control_base is the target outside control rows.
    """
    n, (c, h, w) = len(rows), rows[0]["target"].shape
    images = torch.empty(n, 2, c, h, w)
    target = torch.empty(n, c, h, w)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i, r in enumerate(rows):
        images[i, 0], images[i, 1], target[i] = r["image1"], r["image2"], r["target"]
        if r["mask"] is not None:
            mask[i] = r["mask"]
    images.mul_(2).sub_(1)
    target.mul_(2).sub_(1)
    base = target.clone()
    for i, r in enumerate(rows):
        if r["control_base"] is not None:
            base[i] = r["control_base"] * 2 - 1
    out = {k: [r[k] for r in rows] for k in ("kind", "task", "prompt", "subtask", "key", "meta")}
    return {**out, "images": images, "target": target, "mask": mask, "control_base": base}
