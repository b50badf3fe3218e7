"""M3 properties (SHARDS.md) and the control / seg / IVIF target ops."""

from __future__ import annotations

import pytest
import torch

from datamodules.m3 import BOTH, OPS, VIEW1, VIEW2, M3Config, m3_pair
from datamodules.targets import ControlConfig, control_op, ivif_fallback, seg_overlay


def _clean(h: int = 96, w: int = 80) -> torch.Tensor:
    # a smooth image: blur or noise visibly changes it, masking certainly does
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack((yy, xx, (yy + xx) / 2)) * 0.8 + 0.1


@pytest.mark.parametrize("blocks", [(8,), (16,), (4, 8, 32)])
def test_every_block_degraded_in_at_least_one_view(blocks):
    r = m3_pair(_clean(), M3Config(block_sizes=blocks), seed=3, key="a")
    gh, gw = r.who.shape
    assert (gh, gw) == (-(-96 // r.block_size), -(-80 // r.block_size))
    assert set(r.who.unique().tolist()) <= {VIEW1, VIEW2, BOTH}
    assert (r.degraded1 | r.degraded2).all()  # no pixel is clean in both views


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 1.0])
def test_configured_fraction_degraded_in_both(frac):
    r = m3_pair(_clean(128, 128), M3Config(block_sizes=(8,), both_fraction=frac), seed=0, key="k")
    nb = r.who.numel()
    assert int((r.who == BOTH).sum()) == round(frac * nb)
    one = r.who[r.who != BOTH]
    if len(one) > 40:  # the single-view choice is 50/50
        assert 0.3 < float((one == VIEW1).float().mean()) < 0.7


def test_undegraded_view_reconstructs_clean_exactly():
    clean = _clean()
    r = m3_pair(clean, M3Config(block_sizes=(8,)), seed=1, key="x")
    # per block take the view that is not degraded there
    rec = torch.where(r.degraded1, r.view2, r.view1)
    keep = ~(r.degraded1 & r.degraded2)
    assert torch.equal(rec[:, keep], clean[:, keep])
    # and the degradations do change the image where applied
    assert (r.view1 != clean)[:, r.degraded1].float().mean() > 0.5


def test_seed_and_key_reproduce_a_pair():
    clean = _clean()
    a = m3_pair(clean, seed=5, key="img_001")
    b = m3_pair(clean, seed=5, key="img_001")
    c = m3_pair(clean, seed=5, key="img_002")
    d = m3_pair(clean, seed=6, key="img_001")
    assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2) and torch.equal(a.who, b.who)
    assert not torch.equal(a.view1, c.view1) and not torch.equal(a.view1, d.view1)


def test_ops_mix_and_range():
    r = m3_pair(_clean(128, 128), M3Config(block_sizes=(8,), ops={"blur": 1.0}), seed=2, key="b")
    assert (r.op == OPS.index("blur")).all()
    r = m3_pair(_clean(128, 128), M3Config(block_sizes=(8,)), seed=2, key="b")
    assert set(r.op.unique().tolist()) == {0, 1, 2}
    for v in (r.view1, r.view2):
        assert v.shape == (3, 128, 128) and v.min() >= 0 and v.max() <= 1


def test_m3_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="ops"):
        M3Config(ops={"sharpen": 1.0})
    with pytest.raises(ValueError, match="both_fraction"):
        M3Config(both_fraction=1.5)
    with pytest.raises(ValueError, match="blur_kernels"):
        M3Config(blur_kernels=(4,))


def test_control_ops_follow_prompts_md():
    x = torch.full((3, 4, 4), 0.5)
    assert torch.allclose(control_op(x, "LIGHT++"), x ** 0.5)
    assert torch.allclose(control_op(x, "LIGHT--"), x ** 1.8)
    assert control_op(x, "LIGHT+").mean() > x.mean() > control_op(x, "LIGHT-").mean()
    y = torch.rand(3, 8, 8) * 0.5 + 0.25
    assert control_op(y, "CONTRAST+").std() > y.std() > control_op(y, "CONTRAST-").std()
    assert torch.allclose(control_op(x, "LIGHT+", ControlConfig(gamma={"LIGHT+": 0.6})), x ** 0.6)
    with pytest.raises(ValueError, match="subtask"):
        control_op(x, "SHARP+")


def test_seg_overlay_paints_translucent_blue_only_on_mask():
    base = torch.full((3, 4, 4), 0.4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True
    out = seg_overlay(base, mask)
    assert torch.allclose(out[:, 1, 2], torch.tensor([0.2, 0.2, 0.7]))
    assert torch.equal(out[:, ~mask], base[:, ~mask])


def test_ivif_fallback_keeps_visible_chroma():
    vis = torch.rand(3, 8, 8)
    ir = torch.rand(3, 8, 8).mean(0, keepdim=True).expand(3, -1, -1)
    out = ivif_fallback(vis, ir)
    assert out.shape == vis.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(ivif_fallback(vis, ir, "image1"), vis)


def test_median_blur_matches_a_per_size_separable_median():
    # every kernel size shares one min/max network (sentinel taps); check it against torch.median
    from datamodules.m3 import _median_filter

    tiles = torch.randint(0, 256, (5, 3, 18, 18)).float() / 255  # 8-bit levels, 8 px blocks, halo 5
    kernel = torch.tensor([3, 5, 7, 9, 11])
    out = _median_filter(tiles, kernel, 8, 5)
    for i, k in enumerate(kernel.tolist()):
        o = 5 - k // 2
        sub = tiles[i, :, o:o + 8 + k - 1, o:o + 8 + k - 1]
        ref = sub.unfold(2, k, 1).median(-1).values.unfold(1, k, 1).median(-1).values
        assert torch.allclose(out[i], ref, atol=1e-6), k
