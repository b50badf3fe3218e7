"""Flow matching, OmniGen convention (pure torch, no Lightning).

t in (0, 1) with t = 1 the data: x_t = t * x1 + (1 - t) * x0, x0 ~ N(0, I); the network predicts
the velocity u = x1 - x0 (OmniGen, arXiv 2409.11340 sec. 2.2). The loss is per sample (shape
[B]) so per-task losses are a mask away.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

TimeSampler = Literal["logit_normal", "uniform", "shifted"]
TIME_SAMPLERS: tuple[str, ...] = ("logit_normal", "uniform", "shifted")


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t * x1 + (1 - t) * x0, t of shape (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    return x1 - x0


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: (B, ...) -> (B,), computed in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def sample_t(batch_size: int, kind: TimeSampler = "logit_normal", *, mean: float = 0.0, std: float = 1.0,
             shift: float = 1.0, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Training times in (0, 1), shape (B,).

    logit_normal: t = sigmoid(n), n ~ N(mean, std) (OmniGen / SD3 default);
    uniform:      t ~ U(0, 1);
    shifted:      uniform t mapped towards noise by `shift` (SD3's resolution shift written in
                  this t=1-is-data convention): t' = t / (t + shift * (1 - t)); shift > 1 puts
                  more steps near the noise end, as higher resolutions need.
    """
    if kind == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=device) * std + mean
        t = torch.sigmoid(n)
    elif kind == "uniform":
        t = torch.rand(batch_size, generator=generator, device=device)
    elif kind == "shifted":
        if shift <= 0:
            raise ValueError(f"flow time shift must be > 0, got {shift}")
        u = torch.rand(batch_size, generator=generator, device=device)
        t = u / (u + shift * (1 - u))
    else:
        raise ValueError(f"unknown t sampler {kind!r}: use one of {', '.join(TIME_SAMPLERS)}")
    eps = 1e-5  # keep t strictly inside (0, 1)
    return t.clamp(eps, 1 - eps)


def condition_dropout(batch_size: int, p_text: float, p_all: float,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Which rows lose their text (keeping images) and which lose everything, for dual CFG.

    Returns boolean (B,) masks `drop_text`, `drop_all` (disjoint). One uniform draw u per row:
    u < p_all -> drop all; p_all <= u < p_all + p_text -> drop text.
    """
    if not (0 <= p_text and 0 <= p_all and p_text + p_all <= 1):
        raise ValueError(f"condition dropout needs p_text, p_all >= 0 and p_text + p_all <= 1, "
                         f"got p_text={p_text}, p_all={p_all}")
    u = torch.rand(batch_size, generator=generator)
    drop_all = u < p_all
    drop_text = (u >= p_all) & (u < p_all + p_text)
    return drop_text, drop_all


def flow_loss(model_fn, x1: Tensor, t: Tensor, *, noise: Tensor | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """Per-sample flow-matching loss (B,) of `model_fn(x_t, t) -> velocity`."""
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype) if noise is None else noise
    pred = model_fn(interpolate(x0, x1, t), t)
    return per_sample_mse(pred, velocity_target(x0, x1))


def timesteps(num_steps: int) -> Tensor:
    """Euler grid linspace(0, 1, N + 1) (noise -> data)."""
    if num_steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1)


__all__ = ["interpolate", "velocity_target", "per_sample_mse", "sample_t", "condition_dropout", "flow_loss",
           "timesteps", "TIME_SAMPLERS"]
