"""Scores for the non-fusion tasks: instruction segmentation and brightness/contrast control.

Pure torch, no project imports. Images are (N, 3, H, W) floats in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

# docs/PROMPTS.md: the SEG target paints the mask translucent blue, out = (1-a)*base + a*(0,0,1).
SEG_ALPHA = 0.5
SEG_COLOR = (0.0, 0.0, 1.0)


def recover_overlay_mask(output: Tensor, base: Tensor, alpha: float = SEG_ALPHA) -> Tensor:
    """(N, H, W) bool: pixels where `output` is closer to the blue overlay of `base` than to `base`."""
    color = torch.tensor(SEG_COLOR, dtype=output.dtype, device=output.device).view(1, 3, 1, 1)
    painted = (1 - alpha) * base + alpha * color
    d_painted = (output - painted).abs().sum(dim=1)  # (N, H, W)
    d_plain = (output - base).abs().sum(dim=1)
    return d_painted < d_plain


def binary_miou(pred: Tensor, true: Tensor) -> Tensor:
    """(N,) mean of foreground and background IoU per sample (bool masks (N, H, W)).

    A class absent from both prediction and truth counts as IoU 1 (nothing to get wrong).
    """
    def iou(p: Tensor, t: Tensor) -> Tensor:
        inter = (p & t).flatten(1).sum(1).float()
        union = (p | t).flatten(1).sum(1).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))

    return (iou(pred, true) + iou(~pred, ~true)) / 2


def control_accuracy(output: Tensor, base: Tensor, target: Tensor, subtask: list[str],
                     tolerance: float = 0.5) -> Tensor:
    """(N,) 1.0 where the output moves brightness (LIGHT*) or contrast (CONTRAST*) like the target.

    The statistic is mean luminance for LIGHT and luminance standard deviation for CONTRAST,
    measured relative to `base` (the fusion target before the control op). Correct means the
    change has the requested sign and lies within `tolerance` (relative) of the target's change.
    """
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=output.dtype, device=output.device)
    luma = lambda x: torch.einsum("nchw,c->nhw", x, weights).flatten(1)  # noqa: E731  (N, HW)
    is_light = torch.tensor([s.startswith("LIGHT") for s in subtask], device=output.device)
    stat = lambda x: torch.where(is_light, luma(x).mean(1), luma(x).std(1))  # noqa: E731
    got, want = stat(output) - stat(base), stat(target) - stat(base)
    same_sign = torch.sign(got) == torch.sign(want)
    close = (got - want).abs() <= tolerance * want.abs()
    return (same_sign & close).float()
