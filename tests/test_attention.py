"""Structured attention (`Conditioning.attention` + `backbone.attend`) equals the dense-mask path.

Dense = OmniGen's (B, 1, Lq, L) boolean mask handed to sdpa (`Backbone.dense_mask = True`); the
structured path never builds it. fp32, tolerance 1e-5 (the issue's bar).
"""

from __future__ import annotations

import pytest
import torch

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, attend, build_transformer
from ditfuse.model.conditioning import AttentionMask, build_conditioning, image_only_prompt
from ditfuse.model.config import ModelConfig
from ditfuse.model.tokenizer import BuiltinTokenizer

TOL = 1e-5
N = 16  # output tokens (8x8 latents, patch 2); 16 tokens per input image


@pytest.fixture(scope="module")
def tr():
    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=2), seed=0)
    with torch.no_grad():  # un-zero the output layers so outputs depend on every token
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return tr


def _cond(prompts, counts, **kw):
    return build_conditioning(BuiltinTokenizer(), prompts, counts, N, N, **kw)


# rows of different lengths (left pad), text-only rows, equal unpadded rows
CASES = {
    "padded_mixed": ([P.default_prompt("ivif"), image_only_prompt(2), ""], [2, 2, 0]),
    "unpadded_images": ([P.default_prompt("m3")] * 2, [2, 2]),
    "unpadded_text_only": (["", ""], [0, 0]),
    "single_row": ([P.default_prompt("mef")], [2]),
}


def _inputs(cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = cond.batch_size
    return (torch.randn(B, 12, 8, 8, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 2, 12, 8, 8, generator=g))


def _both(tr, fn):
    out = []
    for dense in (True, False):
        bb = Backbone(tr)
        bb.dense_mask = dense
        out.append(fn(bb))
    return out


@pytest.mark.parametrize("case", CASES)
def test_structured_mask_matches_dense_rows(case):
    """Every real row of OmniGen's rule, rebuilt from the structured pieces, equals the dense mask."""
    cond = _cond(*CASES[case])
    C, L = cond.num_condition_tokens, cond.seq_len
    dense = cond.mask()
    m = cond.attention()
    assert m.prefix_rows == m.prefix_keys == C + 1
    pre = torch.ones(1, 1, C + 1, C + 1, dtype=torch.bool).tril() if m.causal else m.prefix
    pre = torch.ones(1, 1, C + 1, C + 1, dtype=torch.bool) if pre is None else pre
    real = torch.arange(L)[None, :] >= cond.pad[:, None]  # (B, L) real query rows
    for b in range(cond.batch_size):
        rows = real[b, :C + 1]
        assert torch.equal(pre.expand(cond.batch_size, -1, -1, -1)[b, 0][rows], dense[b, 0, :C + 1, :C + 1][rows])
        assert not dense[b, 0, :C + 1, C + 1:][rows].any()  # condition/time rows never see output keys
        keys = torch.ones(L, dtype=torch.bool) if m.keys is None else m.keys[b, 0, 0]
        assert torch.equal(dense[b, 0, C + 1:], keys.expand(N, -1))
    assert (m.keys is None) == bool(cond.pad.max() == 0)


@pytest.mark.parametrize("case", CASES)
def test_full_forward_equals_dense(tr, case):
    cond = _cond(*CASES[case])
    x, t, lat = _inputs(cond)
    with torch.no_grad():
        dense, ours = _both(tr, lambda bb: bb(x, t, cond, lat))
    assert (dense - ours).abs().max() < TOL


@pytest.mark.parametrize("case", CASES)
def test_prefill_and_steps_equal_dense(tr, case):
    cond = _cond(*CASES[case])
    x, t, lat = _inputs(cond, seed=1)
    with torch.no_grad():
        caches = _both(tr, lambda bb: (bb, bb.prefill(cond, lat)))
        for (bb_d, c_d), (bb_s, c_s) in [caches]:
            real = torch.arange(cond.num_condition_tokens)[None, :] >= cond.pad[:, None]
            for kd, ks in zip(c_d.keys, c_s.keys):
                kd, ks = kd[..., :cond.num_condition_tokens, :], ks[..., :cond.num_condition_tokens, :]
                assert (kd - ks).abs().amax(dim=(1, 3))[real].max() < TOL  # real condition rows' K
            for seed in (2, 3):  # one cache serves several steps
                x, t, _ = _inputs(cond, seed)
                step_d, step_s = bb_d.step(x, t, c_d), bb_s.step(x, t, c_s)
                assert (step_d - step_s).abs().max() < TOL
                assert (step_s - bb_s(x, t, cond, lat)).abs().max() < TOL  # the cache stays exact


def test_rows_on_both_sides_of_the_rope_switch(tr):
    """Per-row RoPE factors (issue 11): a long row takes the long factors, short ones the short."""
    rope = tr.rope
    cond = _cond([P.default_prompt("ivif"), image_only_prompt(2), ""], [2, 2, 0])
    row_len = cond.seq_len - cond.pad
    switch = int((row_len.max() + row_len.min()) // 2)
    old = rope.original_max_position_embeddings
    rope.original_max_position_embeddings = switch
    try:
        assert (row_len > switch).any() and (row_len <= switch).any()
        x, t, lat = _inputs(cond, seed=4)
        with torch.no_grad():
            dense, ours = _both(tr, lambda bb: bb(x, t, cond, lat))
            cached = _both(tr, lambda bb: bb.step(x, t, bb.prefill(cond, lat)))
    finally:
        rope.original_max_position_embeddings = old
    assert (dense - ours).abs().max() < TOL
    assert (cached[0] - cached[1]).abs().max() < TOL and (cached[1] - ours).abs().max() < TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_dense(tr, checkpointing):
    cond = _cond([P.default_prompt("m3"), image_only_prompt(2)], [2, 2])  # padded, image spans
    x, t, lat = _inputs(cond, seed=5)
    lat.requires_grad_(True)
    grads = []
    for dense in (True, False):
        bb = Backbone(tr, gradient_checkpointing=checkpointing)
        bb.dense_mask = dense
        tr.zero_grad()
        lat.grad = None
        bb(x, t, cond, lat).square().mean().backward()
        grads.append(torch.cat([lat.grad.flatten()] + [p.grad.flatten() for p in tr.parameters()
                                                       if p.grad is not None]))
    tr.zero_grad()
    assert (grads[0] - grads[1]).abs().max() < TOL


def test_attend_unmasked_calls_when_nothing_needs_masking():
    """Unpadded text-only rows: plain causal prefix and no key mask (sdpa gets no mask at all)."""
    cond = _cond(["", ""], [0, 0])
    m = cond.attention()
    assert m.causal and m.prefix is None and m.keys is None
    step = cond.attention(q_start=cond.num_condition_tokens)
    assert step.prefix_rows == 1 and step.prefix is None and not step.causal and step.keys is None
    q, k = torch.randn(2, 4, cond.seq_len, 8), torch.randn(2, 4, cond.seq_len, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=cond.mask())
    assert (attend(q, k, k, m) - ref).abs().max() < TOL
    assert isinstance(m, AttentionMask)
