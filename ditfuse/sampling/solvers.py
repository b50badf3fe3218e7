"""ODE solvers and time grids for the flow dx/dt = v(x, t), t = 0 noise -> t = 1 data (pure torch).

Convention (ditfuse/sampling/flow.py): x_t = t * x1 + (1 - t) * x0, v = x1 - x0, so the data prediction
is x1_hat = x + (1 - t) * v. Every solver takes a velocity function v(x, t) with t of shape (B,)
and an ascending grid ts (N + 1,) from 0 to 1, so the exact KV cache (`Backbone.step`) and the
guidance interval / step caching of ditfuse.sampling.sampler work under each of them unchanged.

  euler     1 evaluation / step, order 1 (OmniGen's scheduler)
  heun      2 / step, order 2 (explicit trapezoid)
  midpoint  2 / step, order 2
  dpm++2m   1 / step, order 2: DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, alg. 2) on
            alpha_t = t, sigma_t = 1 - t, lambda = log(t / (1 - t)) with data prediction x1_hat
  unipc     1 / step, UniPC-bh2 (Zhao et al. 2023, arXiv 2302.04867) = diffusers'
            UniPCMultistepScheduler in its flow-matching form, driven by our grid

Why some are written here: diffusers' DPMSolverMultistepScheduler.set_timesteps takes only
integer training timesteps (no custom sigmas), so it cannot run our grid (uniform = OmniGen's,
or shifted) and an equal-grid comparison with Euler would be lost; FlowMatchHeunDiscreteScheduler
builds its own grid too, and diffusers has no midpoint flow scheduler. UniPCMultistepScheduler
does take sigmas, so unipc is diffusers' (sigma = 1 - t, model output = noise - data = -v).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Schedule = Literal["uniform", "shifted"]
SOLVERS: tuple[str, ...] = ("euler", "heun", "midpoint", "dpm++2m", "unipc")
SCHEDULES: tuple[str, ...] = ("uniform", "shifted")
# evaluations of v per step: a step count -> NFE per branch
EVALS_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2, "dpm++2m": 1, "unipc": 1}


def time_grid(steps: int, schedule: Schedule = "uniform", shift: float = 1.0) -> Tensor:
    """Ascending grid (steps + 1,) from 0 to 1, float32.

    uniform: linspace(0, 1, N + 1), OmniGen's scheduler (OmniGenScheduler, time_shifting_factor 1);
    shifted: t' = t / (t + shift * (1 - t)), OmniGen's time_shifting_factor / SD3's shift in this
             t = 1-is-data convention (ditfuse.sampling.flow.sample_t): shift > 1 puts steps near the noise.
    """
    if steps < 1:
        raise ValueError(f"sampler steps must be >= 1, got {steps}")
    t = torch.linspace(0.0, 1.0, steps + 1)
    if schedule == "uniform":
        return t
    if schedule == "shifted":
        if shift <= 0:
            raise ValueError(f"sampler shift must be > 0, got {shift}")
        return t / (t + shift * (1 - t))
    raise ValueError(f"unknown sampler schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)


def euler(velocity: VelocityFn, x0: Tensor, ts: Tensor) -> Tensor:
    """x <- x + (t_next - t) v(x, t) in float32 (also the float32 path of ditfuse.sampling.sampler.euler)."""
    ts_list = ts.tolist()
    x = x0
    for t_cur, t_next in pairwise(ts_list):
        x = x + (t_next - t_cur) * velocity(x, _full(x, t_cur)).float()
    return x


def heun(velocity: VelocityFn, x0: Tensor, ts: Tensor) -> Tensor:
    ts_list = ts.tolist()
    x = x0
    for t_cur, t_next in pairwise(ts_list):
        h = t_next - t_cur
        d1 = velocity(x, _full(x, t_cur)).float()
        d2 = velocity(x + h * d1, _full(x, t_next)).float()
        x = x + 0.5 * h * (d1 + d2)
    return x


def midpoint(velocity: VelocityFn, x0: Tensor, ts: Tensor) -> Tensor:
    ts_list = ts.tolist()
    x = x0
    for t_cur, t_next in pairwise(ts_list):
        h = t_next - t_cur
        d1 = velocity(x, _full(x, t_cur)).float()
        x = x + h * velocity(x + 0.5 * h * d1, _full(x, t_cur + 0.5 * h)).float()
    return x


def _lam(t: float) -> float:
    """log-SNR lambda = log(alpha / sigma) = log(t / (1 - t)); -inf at noise, +inf at data."""
    return -math.inf if t <= 0 else math.inf if t >= 1 else math.log(t / (1 - t))


def dpmpp_2m(velocity: VelocityFn, x0: Tensor, ts: Tensor) -> Tensor:
    """DPM-Solver++(2M), data prediction D = x + (1 - t) v:
    x' = (sigma'/sigma) x - alpha' (e^-h - 1) D_h,  h = lambda' - lambda,
    D_h = (1 + 1/(2r)) D - 1/(2r) D_prev, r = h_prev / h (first-order D_h = D on the first step and
    on the last, whose h is infinite: there the update is x + (t' - t) v, Euler's)."""
    ts_list = ts.tolist()
    x, d_prev, h_prev = x0, None, None
    n = len(ts_list) - 1
    for i, (t_cur, t_next) in enumerate(pairwise(ts_list)):
        d = x + (1 - t_cur) * velocity(x, _full(x, t_cur)).float()
        h = _lam(t_next) - _lam(t_cur)
        d_h = d
        if d_prev is not None and i < n - 1:
            r = h_prev / h
            d_h = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        # (sigma'/sigma) and -alpha'(e^-h - 1) = alpha'(1 - sigma' alpha / (sigma alpha')), finite forms
        ratio = (1 - t_next) / (1 - t_cur)
        x = ratio * x + (t_next - ratio * t_cur) * d_h
        d_prev, h_prev = d, h
    return x


def unipc(velocity: VelocityFn, x0: Tensor, ts: Tensor) -> Tensor:
    """diffusers' UniPCMultistepScheduler (bh2, order 2, flow_prediction) on sigma = 1 - ts[:-1].
    The scheduler nudges sigma 1 to 1 - 1e-6 (its log(alpha) at t = 0) and appends sigma 0."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    sched.set_timesteps(sigmas=np.asarray(1.0 - ts[:-1].numpy(), dtype=np.float64), device=x0.device)
    x = x0
    for i, step_t in enumerate(sched.timesteps):
        t = 1.0 - float(sched.sigmas[i])
        v = velocity(x, _full(x, t)).float()
        x = sched.step(-v, step_t, x).prev_sample  # flow_prediction: noise - data = -v
    return x


_SOLVE = {"euler": euler, "heun": heun, "midpoint": midpoint, "dpm++2m": dpmpp_2m, "unipc": unipc}


def solve(velocity: VelocityFn, x0: Tensor, ts: Tensor, solver: str = "euler") -> Tensor:
    """Integrate from ts[0] = 0 to ts[-1] = 1 with `solver` (float32 state)."""
    if solver not in _SOLVE:
        raise ValueError(f"unknown sampler solver {solver!r}: use one of {', '.join(SOLVERS)}")
    return _SOLVE[solver](velocity, x0.float(), ts)


__all__ = ["EVALS_PER_STEP", "SCHEDULES", "SOLVERS", "dpmpp_2m", "euler", "heun", "midpoint", "solve", "time_grid",
           "unipc"]
