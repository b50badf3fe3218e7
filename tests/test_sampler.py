"""Sampler: Euler with an exact velocity oracle reaches the target; seeded; dual-CFG algebra;
the KV cache (batched and sequential branches) equals the uncached sampler to 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch

from ditfuse import prompts as P
from ditfuse.backbone import Backbone, build_transformer
from ditfuse.config import ModelConfig
from ditfuse.sampler import SamplerSettings, branch_weights, euler, initial_noise, sample_latents
from ditfuse.tokenizer import BuiltinTokenizer


def test_euler_with_oracle_reaches_target():
    x1 = torch.randn(2, 3, 4, 4)
    x0 = torch.randn_like(x1)
    # exact velocity of the straight path through (x, t) to x1
    out = euler(lambda x, t: (x1 - x) / (1 - t.view(-1, 1, 1, 1)), x0, steps=7)
    assert torch.allclose(out, x1, atol=1e-5)
    # a constant velocity field integrates exactly too
    assert torch.allclose(euler(lambda x, t: x1 - x0, x0, steps=3), x1, atol=1e-5)


def test_seeded_noise():
    assert torch.equal(initial_noise((2, 3), 5, "cpu"), initial_noise((2, 3), 5, "cpu"))
    assert not torch.equal(initial_noise((2, 3), 5, "cpu"), initial_noise((2, 3), 6, "cpu"))


def test_branch_weights_match_dual_cfg():
    vc, vi, vu = torch.randn(3), torch.randn(3), torch.randn(3)
    s_txt, s_img = 2.5, 1.6
    w = branch_weights(s_txt, s_img)
    got = w["c"] * vc + w["img"] * vi + w["u"] * vu
    assert torch.allclose(got, vu + s_img * (vi - vu) + s_txt * (vc - vi))
    assert branch_weights(1.0, 1.0) == {"c": 1.0}


@pytest.fixture(scope="module")
def tiny_backbone():
    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=2), seed=0)
    with torch.no_grad():  # zero-init layers would hide differences
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return Backbone(tr.eval())


def test_kv_cache_equals_no_cache_and_seeded(tiny_backbone):
    tok = BuiltinTokenizer()
    prompts = [P.default_prompt("ivif"), P.default_prompt("m3")]
    lat = torch.randn(2, 2, 12, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = {}
    for cache in (False, True):
        for batched in (False, True):
            s = SamplerSettings(steps=4, guidance_scale=2.0, img_guidance_scale=1.5, kv_cache=cache,
                                batch_branches=batched, seed=3)
            outs[cache, batched] = sample_latents(tiny_backbone, tok, prompts, lat, (12, 8, 8), s)
    ref = outs[False, False]
    for k, v in outs.items():
        assert (v - ref).abs().max() < 1e-4, k
    again = sample_latents(tiny_backbone, tok, prompts, lat, (12, 8, 8), SamplerSettings(steps=4, seed=3))
    assert torch.equal(again, sample_latents(tiny_backbone, tok, prompts, lat, (12, 8, 8),
                                             SamplerSettings(steps=4, seed=3)))
