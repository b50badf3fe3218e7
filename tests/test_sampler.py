"""Sampler: Euler with an exact velocity oracle reaches the target; seeded; dual-CFG algebra;
the KV cache (batched and sequential branches) equals the uncached sampler to 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, build_transformer
from ditfuse.model.conditioning import build_conditioning, image_only_prompt
from ditfuse.model.config import ModelConfig
from ditfuse.sampling.sampler import SamplerSettings, branch_weights, euler, initial_noise, sample_latents
from ditfuse.model.tokenizer import BuiltinTokenizer


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


# ---------------------------------------------------------------------------------------------
# RoPE factors per row (issue 11): batched branches == sequential ones, rows independent
# ---------------------------------------------------------------------------------------------
SWITCH = 68  # lowered original_max_position_embeddings: the rows of these tests fall on both sides


@pytest.fixture(scope="module")
def switched_backbone():
    """Tiny backbone with non-unit short/long factors and the switch inside the rows' lengths."""
    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=2), seed=1)
    with torch.no_grad():
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    half = tr.rope.dim // 2
    tr.rope.short_factor = [1.0 + 0.5 * i for i in range(half)]
    tr.rope.long_factor = [2.0 + 3.0 * i for i in range(half)]
    tr.rope.original_max_position_embeddings = SWITCH
    tr.rope.max_position_embeddings = 4 * SWITCH
    return Backbone(tr.eval())


def _row_lengths(cond) -> list[int]:
    return (cond.position_ids().amax(dim=1) + 1).tolist()


def test_guidance_branches_straddle_the_switch_and_batched_equals_sequential(switched_backbone):
    from ditfuse.sampling.sampler import GuidedVelocity

    tok = BuiltinTokenizer()
    prompts = [P.default_prompt("mef"), P.default_prompt("m3")]
    lat = torch.randn(2, 2, 12, 6, 6, generator=torch.Generator().manual_seed(0))  # 9 tokens per image
    out_hw = (12, 12)  # 36 output tokens
    g = {}
    for batched in (True, False):
        g[batched] = GuidedVelocity(switched_backbone, tok, prompts, lat, out_hw, 2.0, 1.6, kv_cache=False,
                                    batch_branches=batched)
    lengths = {name: _row_lengths(c) for name, c in g[False].conds.items()}
    # the conditional rows pass the switch, the image-only and negative-prompt rows do not
    assert min(lengths["c"]) > SWITCH >= max(lengths["img"] + lengths["u"]), lengths
    x = torch.randn(2, 12, 12, 12, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3, 0.7])
    v_batched, v_seq = g[True](x, t), g[False](x, t)
    assert (v_batched - v_seq).abs().max() < 1e-5
    # and the choice matters: every row on the long factors gives another velocity
    rope = switched_backbone.transformer.rope
    short = rope.short_factor
    rope.short_factor = rope.long_factor
    try:
        v_long = g[False](x, t)
    finally:
        rope.short_factor = short
    assert (v_long - v_seq).abs().max() > 1e-4  # 10x the tolerance above


@pytest.mark.parametrize("kv_cache", [False, True], ids=["full", "kv_cached"])
def test_a_rows_output_does_not_depend_on_its_batch_mates(switched_backbone, kv_cache):
    tok = BuiltinTokenizer()
    long_prompt, short_prompt = P.default_prompt("mff"), image_only_prompt(2)
    lat = torch.randn(2, 2, 12, 6, 6, generator=torch.Generator().manual_seed(2))
    s = SamplerSettings(steps=2, guidance_scale=1.0, img_guidance_scale=1.0, kv_cache=kv_cache, seed=5)
    both = sample_latents(switched_backbone, tok, [long_prompt, short_prompt], lat, (12, 12, 12), s)
    alone = [sample_latents(switched_backbone, tok, [p], lat[i:i + 1], (12, 12, 12), s)
             for i, p in enumerate((long_prompt, short_prompt))]
    cond = build_conditioning(tok, [long_prompt, short_prompt], 2, tokens_per_image=9, num_output_tokens=36)
    lengths = _row_lengths(cond)
    assert lengths[0] > SWITCH >= lengths[1], lengths  # one row on each side of the switch
    for i in range(2):
        assert (both[i] - alone[i][0]).abs().max() < 1e-5, i
