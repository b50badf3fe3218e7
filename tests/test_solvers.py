"""Issue 18: flow solvers reach their order on a known field; the default sampler is today's Euler
loop bit for bit; guidance interval and step caching reduce to full CFG / no caching exactly at
their neutral settings; KV-cached and uncached sampling agree for every solver."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from ditfuse.core import prompts as P
from ditfuse.sampling.sampler import (
    FAST_PRESET,
    GuidedVelocity,
    SamplerSettings,
    initial_noise,
    sample_latents,
)
from ditfuse.sampling.solvers import EVALS_PER_STEP, SOLVERS, solve, time_grid
from ditfuse.model.tokenizer import BuiltinTokenizer

# Gaussian data x1 ~ N(M, S^2) per coordinate: the marginal flow velocity is linear in x,
# v(x, t) = M + (t S^2 - (1 - t)) / V(t) * (x - t M), V = t^2 S^2 + (1 - t)^2, and the ODE maps
# x0 exactly to M + S x0 (x_t = t M + sqrt(V(t)) x0).
M, S = 0.3, 0.5


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *[1] * (x.dim() - 1)).double()
    var = t * t * S * S + (1 - t) ** 2
    return M + (t * S * S - (1 - t)) / var * (x.double() - t * M)


# steps N where the error at N and 2N is above float32 round-off and in the asymptotic range
# (DPM-Solver++'s first and last steps are first order and large in lambda: it gets there later)
ORDER_STEPS = {"euler": 32, "heun": 32, "midpoint": 8, "dpm++2m": 128, "unipc": 32}
ORDER = {"euler": 1, "heun": 2, "midpoint": 2, "dpm++2m": 2, "unipc": 2}


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_reaches_its_order_on_a_linear_field(solver):
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    exact = M + S * x0.double()
    n = ORDER_STEPS[solver]
    err = [(solve(gaussian_velocity, x0, time_grid(k), solver).double() - exact).abs().max().item()
           for k in (n, 2 * n)]
    observed = math.log2(err[0] / err[1])
    assert observed > ORDER[solver] - 0.3, (solver, err)
    if ORDER[solver] == 1:
        assert observed < 1.2, err


def test_solver_counts_its_evaluations_and_unknown_names_fail():
    calls = []
    for solver in SOLVERS:
        calls.clear()
        solve(lambda x, t: calls.append(1) or -x, torch.ones(1, 2), time_grid(5), solver)
        assert len(calls) == 5 * EVALS_PER_STEP[solver], solver
    with pytest.raises(ValueError, match="unknown sampler solver 'rk9': use one of euler, heun"):
        SamplerSettings(solver="rk9")


def test_time_grids():
    assert torch.equal(time_grid(4), torch.linspace(0, 1, 5))
    g = time_grid(4, "shifted", 3.0)
    assert g[0] == 0 and g[-1] == 1 and bool((g.diff() > 0).all())
    assert g[2] == pytest.approx(0.25)  # 0.5 / (0.5 + 3 * 0.5): shift > 1 spends steps near the noise
    with pytest.raises(ValueError, match="unknown sampler schedule 'karras'"):
        SamplerSettings(schedule="karras")


# ---------------------------------------------------------------------------------------------
# On the tiny backbone: exactness of the neutral settings, KV cache under every solver
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_backbone):
    lat = torch.randn(2, 2, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    return tiny_backbone, BuiltinTokenizer(), [P.default_prompt("ivif"), P.default_prompt("m3")], lat


def _sample(setup, **kw):
    bb, tok, prompts, lat = setup
    stats = {}
    kw = {"steps": 4, "guidance_scale": 2.0, "img_guidance_scale": 1.5, "seed": 3, **kw}
    out = sample_latents(bb, tok, prompts, lat, (12, 8, 8), SamplerSettings(**kw), stats=stats)
    return out, stats["evaluations"]


def test_default_sampler_is_the_plain_euler_loop(setup):
    bb, tok, prompts, lat = setup
    v = GuidedVelocity(bb, tok, prompts, lat, (8, 8), 2.0, 1.5)
    x = initial_noise((2, 12, 8, 8), 3, "cpu")
    ts = torch.linspace(0, 1, 5).tolist()
    for a, b in pairwise(ts):
        x = x + (b - a) * v(x, torch.full((2,), a))
    out, nfe = _sample(setup)
    assert torch.equal(out, x) and nfe == 4 * 3


def test_guidance_interval(setup):
    full, nfe = _sample(setup, solver="heun")
    same, nfe_same = _sample(setup, solver="heun", guidance_interval=[0.0, 1.0])
    assert torch.equal(same, full) and nfe_same == nfe == 4 * 2 * 3
    # [0.5, 1]: Euler at t = 0, 0.25 runs the conditional branch alone, t = 0.5, 0.75 all three
    part, nfe_part = _sample(setup, guidance_interval=[0.5, 1.0])
    assert nfe_part == 2 * 1 + 2 * 3
    bb, tok, prompts, lat = setup
    guided = GuidedVelocity(bb, tok, prompts, lat, (8, 8), 2.0, 1.5)
    cond = GuidedVelocity(bb, tok, prompts, lat, (8, 8), 1.0, 1.0)
    x = initial_noise((2, 12, 8, 8), 3, "cpu")
    for i, t in enumerate((0.0, 0.25, 0.5, 0.75)):
        x = x + 0.25 * (cond if i < 2 else guided)(x, torch.full((2,), t))
    assert (part - x).abs().max() < 1e-5


def test_step_cache_threshold_zero_is_no_caching(setup):
    for solver in ("euler", "dpm++2m"):
        ref, nfe = _sample(setup, solver=solver)
        got, nfe0 = _sample(setup, solver=solver, cache_threshold=0.0)
        assert torch.equal(got, ref) and nfe0 == nfe
    # an infinite threshold reuses the first evaluation's residual at every later step
    _, nfe_inf = _sample(setup, cache_threshold=math.inf)
    assert nfe_inf == 3
    with pytest.raises(ValueError, match="cache_threshold needs kv_cache: true"):
        SamplerSettings(cache_threshold=0.1, kv_cache=False)


@pytest.mark.parametrize("solver", SOLVERS)
def test_kv_cache_and_uncached_agree_for_every_solver(setup, solver):
    kw = {"steps": 3, "solver": solver, "guidance_interval": [0.2, 0.8]}
    ref, nfe = _sample(setup, kv_cache=False, batch_branches=False, **kw)
    for cache, batched in ((True, True), (True, False), (False, True)):
        got, n = _sample(setup, kv_cache=cache, batch_branches=batched, **kw)
        assert (got - ref).abs().max() < 1e-4 and n == nfe, (cache, batched)


def test_fast_preset_expands_and_keeps_the_guidance():
    s = SamplerSettings(preset="fast", guidance_scale=3.0)
    assert s.preset is None and s.guidance_scale == 3.0
    assert {k: getattr(s, k) for k in FAST_PRESET} == FAST_PRESET
    with pytest.raises(ValueError, match="unknown sampler preset 'faster': use one of fast"):
        SamplerSettings(preset="faster")
    with pytest.raises(ValueError, match="state 'model' .* use solver euler"):
        SamplerSettings(state="model", solver="heun")
