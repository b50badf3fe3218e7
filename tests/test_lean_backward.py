"""Lean backward state of the block: SwiGLU as one autograd node keeping only the gate_up output,
RoPE keeping no activation, and no recompute of the last checkpointed block. Each is checked
against plain autograd on the same formula (values and gradients) and for what it keeps for
backward (saved-tensor bytes), so a regression to a heavier graph fails here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, apply_rope, build_transformer, swiglu
from ditfuse.model.conditioning import build_conditioning
from ditfuse.model.config import ModelConfig
from ditfuse.model.tokenizer import BuiltinTokenizer


def _saved_bytes(fn):
    """(fn(), bytes of the distinct storages autograd keeps for backward while fn runs)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_rope_keeps_no_activation_for_backward():
    """RoPE's products save x only when cos/sin need gradients: the rotation of every recomputed
    query and key adds no saved activation."""
    L, hd = 24, 16
    ang = torch.arange(L)[:, None] * torch.rand(hd // 2, generator=torch.Generator().manual_seed(1))
    emb = torch.cat([ang, ang], -1)[None, None]
    cos, sin = emb.cos(), emb.sin()
    x = (torch.randn(2, 4, L, hd).requires_grad_(True) * 1.0)
    _, saved = _saved_bytes(lambda: apply_rope(x, cos, sin))
    assert saved == cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()


def test_swiglu_node_equals_autograd_and_drops_silu_output():
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(3, 10, 64, generator=g) * 3
    up = torch.randn(3, 10, 32, generator=g)

    def plain(t):
        a, b = t.chunk(2, dim=-1)
        return b * F.silu(a)

    res = []
    for fn in (swiglu, plain):
        leaf = gu.clone().requires_grad_(True)
        base = leaf * 1.0
        out, saved = _saved_bytes(lambda fn=fn, base=base: fn(base))
        (out * up).sum().backward()
        res.append((out.detach(), leaf.grad, saved))
    (o1, g1, s1), (o2, g2, s2) = res
    assert torch.equal(o1, o2)
    assert (g1 - g2).abs().max().item() < 1e-6
    assert s1 == gu.numel() * 4  # only the gate_up projection's output
    assert s2 >= s1 + gu.numel() * 4 // 2  # plain autograd also keeps silu(gate)
    with torch.no_grad():  # inference path: in place, same values
        assert torch.equal(swiglu(gu), plain(gu))


@pytest.fixture(scope="module")
def tr3():
    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=3), seed=0)
    with torch.no_grad():
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return tr


def test_checkpointing_skips_the_last_blocks_recompute_with_the_same_gradients(tr3):
    cond = build_conditioning(BuiltinTokenizer(), [P.default_prompt("ivif")], 2, 16, 16)
    g = torch.Generator().manual_seed(0)
    x, t, lat = torch.randn(1, 12, 8, 8, generator=g), torch.rand(1, generator=g), torch.randn(1, 2, 12, 8, 8, generator=g)
    calls = [0] * len(tr3.layers)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(tr3.layers)]
    try:
        grads = {}
        for ckpt in (False, True):
            calls[:] = [0] * len(calls)
            tr3.zero_grad(set_to_none=True)
            Backbone(tr3, gradient_checkpointing=ckpt)(x, t, cond, lat).square().mean().backward()
            grads[ckpt] = {n: p.grad.clone() for n, p in tr3.named_parameters() if p.grad is not None}
            if ckpt:
                assert calls == [2, 2, 1]  # blocks 0, 1 recomputed in backward; the last block not
            else:
                assert calls == [1, 1, 1]
    finally:
        for h in hooks:
            h.remove()
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n in grads[True]:
        assert torch.allclose(grads[True][n], grads[False][n], atol=1e-6, rtol=1e-5), n
