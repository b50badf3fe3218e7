"""Training targets: control photometric ops, the segmentation overlay, the IVIF fallback.

Pure torch on images in [0, 1] of shape (..., 3, H, W), so callbacks and inference can reuse them.
Values from docs/PROMPTS.md (as published with DiTFuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ditfuse.core.prompts import CONTROL_SUBTASKS

# PROMPTS.md: brightness by gamma, contrast by scaling around the image mean.
DEFAULT_GAMMA = {"LIGHT++": 0.5, "LIGHT+": 0.75, "LIGHT-": 1.35, "LIGHT--": 1.8}
DEFAULT_CONTRAST = {"CONTRAST+": 1.4, "CONTRAST-": 0.7}
SEG_COLOR = (0.0, 0.0, 1.0)  # translucent blue
SEG_ALPHA = 0.5
IVIF_FALLBACKS = ("mean_y", "max_y", "image1")


@dataclass
class ControlConfig:
    """Which control subtasks are drawn (weights) and how strong each op is."""

    subtasks: dict[str, float] = field(default_factory=lambda: {s: 1.0 for s in CONTROL_SUBTASKS})
    gamma: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_GAMMA))
    contrast: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_CONTRAST))

    def __post_init__(self) -> None:
        unknown = set(self.subtasks) - set(CONTROL_SUBTASKS)
        if unknown:
            raise ValueError(f"control_subtasks: unknown {sorted(unknown)}; use {', '.join(CONTROL_SUBTASKS)}")
        if any(w < 0 for w in self.subtasks.values()) or sum(self.subtasks.values()) <= 0:
            raise ValueError(f"control_subtasks: weights must be >= 0 with a positive sum, got {self.subtasks}")
        self.gamma = {**DEFAULT_GAMMA, **self.gamma}
        self.contrast = {**DEFAULT_CONTRAST, **self.contrast}
        if any(v <= 0 for v in [*self.gamma.values(), *self.contrast.values()]):
            raise ValueError("control_gamma / control_contrast values must be > 0")


def control_op(x: Tensor, subtask: str, cfg: ControlConfig | None = None) -> Tensor:
    """Apply a control subtask's photometric op to x (..., 3, H, W) in [0, 1]; result clamped."""
    cfg = cfg or ControlConfig()
    x = x.clamp(0.0, 1.0)
    if subtask in cfg.gamma:
        return x.pow(cfg.gamma[subtask])
    if subtask in cfg.contrast:
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        return ((x - mean) * cfg.contrast[subtask] + mean).clamp(0.0, 1.0)
    raise ValueError(f"unknown control subtask {subtask!r}; use one of {', '.join(CONTROL_SUBTASKS)}")


def seg_overlay(base: Tensor, mask: Tensor, alpha: float = SEG_ALPHA,
                color: tuple[float, float, float] = SEG_COLOR) -> Tensor:
    """out = (1-a)*base + a*color on the mask; base (..., 3, H, W) in [0, 1], mask (..., H, W) bool."""
    c = torch.tensor(color, dtype=base.dtype, device=base.device).view(3, 1, 1)
    painted = (1 - alpha) * base + alpha * c
    return torch.where(mask.unsqueeze(-3), painted, base)


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """BT.601 full range, (..., 3, H, W) in [0, 1] -> Y, Cb, Cr in [0, 1]."""
    r, g, b = x.unbind(-3)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = (b - y) * 0.564 + 0.5
    cr = (r - y) * 0.713 + 0.5
    return torch.stack((y, cb, cr), -3)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    y, cb, cr = x.unbind(-3)
    r = y + 1.403 * (cr - 0.5)
    b = y + 1.773 * (cb - 0.5)
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack((r, g, b), -3).clamp(0.0, 1.0)


def ivif_fallback(visible: Tensor, infrared: Tensor, mode: str = "mean_y") -> Tensor:
    """Target for IVIF pairs without a ground truth (PROMPTS.md): fused luminance, visible chroma.

    visible, infrared: (..., 3, H, W) in [0, 1] (a grey infrared image is replicated to 3 channels).
    """
    if mode == "image1":
        return visible
    if mode not in IVIF_FALLBACKS:
        raise ValueError(f"ivif_fallback must be one of {', '.join(IVIF_FALLBACKS)}, got {mode!r}")
    vis = rgb_to_ycbcr(visible)
    ir_y = rgb_to_ycbcr(infrared)[..., 0, :, :]
    vis_y = vis[..., 0, :, :]
    y = (vis_y + ir_y) / 2 if mode == "mean_y" else torch.maximum(vis_y, ir_y)
    return ycbcr_to_rgb(torch.stack((y, vis[..., 1, :, :], vis[..., 2, :, :]), -3))
