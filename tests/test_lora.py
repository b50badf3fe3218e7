"""LoRA invariants (litgpt style): only adapter weights train, base weights unchanged after steps,
init output == base output, merged weight == W + scale * B @ A, save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, build_transformer
from ditfuse.model.conditioning import build_conditioning
from ditfuse.model.config import ModelConfig
from ditfuse.model.lora import (LoraSettings, add_lora, count_parameters, load_adapter, lora_state_dict,
                          merge_and_unload, save_adapter)
from ditfuse.model.tokenizer import BuiltinTokenizer


def _inputs(seed=0, B=2):
    tok = BuiltinTokenizer()
    cond = build_conditioning(tok, [P.default_prompt("m3")] * B, 2, 16, 16)
    g = torch.Generator().manual_seed(seed)
    return cond, torch.randn(B, 2, 12, 8, 8, generator=g), torch.randn(B, 12, 8, 8, generator=g), torch.rand(B, generator=g)


@pytest.fixture()
def base():
    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=2), seed=0)
    with torch.no_grad():  # OmniGen init zeroes the output layers: give them values so changes show
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return tr


def test_init_equals_base_and_only_adapters_train(base):
    cond, lat, x, t = _inputs()
    with torch.no_grad():
        ref = Backbone(base)(x, t, cond, lat)
    model = add_lora(copy.deepcopy(base), LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        assert torch.equal(Backbone(model)(x, t, cond, lat), ref)
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 4 * 2  # A and B x 4 targets x 2 layers
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        Backbone(model)(x, t, cond, lat).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        assert not torch.allclose(Backbone(model)(x, t, cond, lat), ref)


def test_merged_weight_is_w_plus_scale_ba(base):
    settings = LoraSettings(r=4, alpha=12)
    model = add_lora(copy.deepcopy(base), settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    cond, lat, x, t = _inputs(1)
    with torch.no_grad():
        unmerged = Backbone(model)(x, t, cond, lat)
    q = model.layers[0].self_attn.to_q
    expected = q.base_layer.weight + settings.scale * q.lora_B["default"].weight @ q.lora_A["default"].weight
    merged = merge_and_unload(model)
    assert isinstance(merged.layers[0].self_attn.to_q, torch.nn.Linear)
    assert torch.allclose(merged.layers[0].self_attn.to_q.weight, expected, atol=1e-7)
    with torch.no_grad():
        assert torch.allclose(Backbone(merged)(x, t, cond, lat), unmerged, atol=1e-5)


def test_save_load_roundtrip_and_targets(base, tmp_path):
    settings = LoraSettings(r=2, alpha=2, targets=["to_q", "to_v"])
    model = add_lora(copy.deepcopy(base), settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_()
    save_adapter(model, tmp_path / "a", settings)
    other = copy.deepcopy(base)
    loaded = load_adapter(other, tmp_path / "a")
    assert loaded.r == 2 and set(loaded.targets) == {"to_q", "to_v"}
    a, b = lora_state_dict(model), lora_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("to_k" in k for k in a)
    with pytest.raises(ValueError, match="matched no module"):
        add_lora(copy.deepcopy(base), LoraSettings(targets=["nonexistent"]))
