"""Backbone: our forward equals diffusers' OmniGenTransformer2DModel.forward; the KV-cached
prefill/step equals the full forward; checkpointing keeps gradients; loading rules."""

from __future__ import annotations

import pytest
import torch

from ditfuse.core import prompts as P
from ditfuse.model.backbone import Backbone, build_transformer, detect_layout, load_transformer
from ditfuse.model.conditioning import build_conditioning, image_only_prompt
from ditfuse.model.config import ModelConfig
from ditfuse.model.tokenizer import BuiltinTokenizer

TOL = 1e-5  # DESIGN.md: sdpa vs eager < 2e-6 in float32


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny", num_layers=2)
    tr = build_transformer(cfg, seed=0)
    # non-trivial output layer (diffusers inits some layers to zero only in OmniGen's own code)
    with torch.no_grad():
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return cfg, tr


def _rows():
    # the longest prompt first: diffusers applies row 0's position ids to every row
    return [(P.default_prompt("ivif"), 2), (P.default_prompt("m3"), 2), (image_only_prompt(2), 2)]


def test_forward_matches_diffusers(tiny):
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator, OmniGenMultiModalProcessor
    from PIL import Image

    cfg, tr = tiny
    tok = BuiltinTokenizer()
    size = 64  # diffusers counts H*W//16//16 = 16 tokens: our 8x8 latents / patch 2 give the same 16
    n = (size // 16) ** 2
    rows = _rows()
    B = len(rows)
    proc = OmniGenMultiModalProcessor(tok, max_image_size=size)
    img = proc.process_image(Image.new("RGB", (size, size)))
    mllm = [proc.process_multi_modal_prompt(p, [img] * k) for p, k in rows]
    ids, pos, mask, _, _, sizes = OmniGenCollator(pad_token_id=tok.pad_token_id).process_mllm_input(
        mllm, [[size, size]] * B)

    g = torch.Generator().manual_seed(1)
    lat = torch.randn(B, 2, 12, 8, 8, generator=g)  # (B, K, c, h, w): 16x16 latents / patch 2 = 16 tokens
    x = torch.randn(B, 12, 8, 8, generator=g)
    t = torch.rand(B, generator=g)
    with torch.no_grad():
        ref = tr(hidden_states=x, timestep=t, input_ids=ids, input_img_latents=[lat[b, k:k + 1] for b in sizes
                 for k in range(2)], input_image_sizes=sizes, attention_mask=mask.float(), position_ids=pos,
                 return_dict=False)[0]
        cond = build_conditioning(tok, [p for p, _ in rows], [k for _, k in rows], n, n)
        ours = Backbone(tr)(x, t, cond, lat)
    assert torch.allclose(ours, ref, atol=TOL), (ours - ref).abs().max()


def test_kv_cache_step_equals_full_forward(tiny):
    cfg, tr = tiny
    tok = BuiltinTokenizer()
    bb = Backbone(tr)
    prompts = [P.default_prompt("mef"), image_only_prompt(2), ""]
    cond = build_conditioning(tok, prompts, [2, 2, 0], 16, 16)
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(3, 2, 12, 8, 8, generator=g)
    with torch.no_grad():
        cache = bb.prefill(cond, lat)
        for _ in range(2):  # the same cache serves several steps
            x, t = torch.randn(3, 12, 8, 8, generator=g), torch.rand(3, generator=g)
            assert torch.allclose(bb.step(x, t, cache), bb(x, t, cond, lat), atol=1e-5)


def test_gradient_checkpointing_same_grads(tiny):
    cfg, tr = tiny
    tok = BuiltinTokenizer()
    cond = build_conditioning(tok, [P.default_prompt("m3")] * 2, 2, 16, 16)
    g = torch.Generator().manual_seed(3)
    lat, x, t = torch.randn(2, 2, 12, 8, 8, generator=g), torch.randn(2, 12, 8, 8, generator=g), torch.rand(2, generator=g)
    grads = []
    for ckpt in (False, True):
        tr.zero_grad()
        Backbone(tr, gradient_checkpointing=ckpt)(x, t, cond, lat).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.parameters() if p.grad is not None]))
    tr.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_load_diffusers_layout_and_missing_path(tiny, tmp_path):
    cfg, tr = tiny
    tr.save_pretrained(tmp_path / "m" / "transformer")
    assert detect_layout(tmp_path / "m")[0] == "diffusers"
    loaded = load_transformer(tmp_path / "m")
    for (k, a), b in zip(tr.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_transformer(tmp_path / "empty")


def test_preset_checks_name_the_setting():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig.from_name("tiny", num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("huge")
    big = ModelConfig.from_name("omnigen-v1")
    assert big.pixels_per_token == 16 and big.in_channels == 4


def test_blocks_are_called_as_modules_and_diffusers_forward_still_works(tiny):
    """FSDP units / checkpoint wrappers sit around the blocks: our forward must call them, and the
    adopted transformer keeps diffusers' own forward."""
    from ditfuse.model.backbone import DiTFuseBlock

    cfg, tr = tiny
    bb = Backbone(tr)
    assert all(isinstance(b, DiTFuseBlock) for b in tr.layers)
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o: calls.append(m)) for b in tr.layers]
    cond = build_conditioning(BuiltinTokenizer(), [P.default_prompt("mef")], [2], 16, 16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bb(torch.randn(1, 12, 8, 8, generator=g), torch.rand(1, generator=g), cond, torch.randn(1, 2, 12, 8, 8))
    for h in hooks:
        h.remove()
    assert calls == list(tr.layers)
    test_forward_matches_diffusers(tiny)  # diffusers' forward through the adopted blocks, still equal
