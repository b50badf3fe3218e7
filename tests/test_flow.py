"""Flow matching: interpolation endpoints, perfect predictor -> zero loss, loss shape [B],
t samplers in (0, 1), condition dropout rates."""

from __future__ import annotations

import pytest
import torch

from ditfuse.sampling import flow


def test_interpolation_endpoints_and_target():
    x0, x1 = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert torch.equal(flow.interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.rand(3)
    xt = flow.interpolate(x0, x1, t)
    # moving along the target velocity for the remaining time lands on the data
    assert torch.allclose(xt + (1 - t).view(-1, 1, 1, 1) * flow.velocity_target(x0, x1), x1, atol=1e-6)


def test_perfect_predictor_zero_loss_and_shape():
    x1 = torch.randn(4, 3, 6, 6)
    x0 = torch.randn_like(x1)
    loss = flow.flow_loss(lambda xt, t: x1 - x0, x1, torch.rand(4), noise=x0)
    assert loss.shape == (4,) and torch.all(loss == 0)
    assert flow.flow_loss(lambda xt, t: torch.zeros_like(xt), x1, torch.rand(4)).shape == (4,)


@pytest.mark.parametrize("kind", flow.TIME_SAMPLERS)
def test_t_samplers(kind):
    t = flow.sample_t(4096, kind, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and (t > 0).all() and (t < 1).all()
    if kind == "logit_normal":
        assert abs(t.mean() - 0.5) < 0.02
    if kind == "shifted":  # shift > 1 moves mass towards noise (t = 0)
        assert t.mean() < 0.4
    with pytest.raises(ValueError, match="t sampler"):
        flow.sample_t(2, "cosine")


def test_condition_dropout_rates():
    drop_text, drop_all = flow.condition_dropout(20000, 0.1, 0.05, generator=torch.Generator().manual_seed(0))
    assert not (drop_text & drop_all).any()
    assert abs(drop_text.float().mean() - 0.1) < 0.01 and abs(drop_all.float().mean() - 0.05) < 0.01
    with pytest.raises(ValueError, match="p_text"):
        flow.condition_dropout(2, 0.7, 0.5)


def test_timesteps_grid():
    assert torch.allclose(flow.timesteps(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
