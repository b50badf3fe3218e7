"""Conditioning equals diffusers' OmniGenMultiModalProcessor + OmniGenCollator (ids, positions,
image spans, attention mask) for the same inputs, while staying boolean and compact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from ditfuse.core import prompts as P
from ditfuse.model.conditioning import build_conditioning, image_only_prompt, tokenize_multimodal
from ditfuse.model.tokenizer import BuiltinTokenizer

processor_omnigen = pytest.importorskip("diffusers.pipelines.omnigen.processor_omnigen")


def _reference(tok, rows, size):
    """rows: list of (prompt, num_images); all images and the output are size x size pixels."""
    proc = processor_omnigen.OmniGenMultiModalProcessor(tok, max_image_size=size)
    img = Image.new("RGB", (size, size))
    mllm = [proc.process_multi_modal_prompt(p, [proc.process_image(img)] * k if k else None) for p, k in rows]
    collator = processor_omnigen.OmniGenCollator(pad_token_id=tok.pad_token_id)
    ids, pos, mask, _, _, sizes = collator.process_mllm_input(mllm, [[size, size]] * len(rows))
    return ids, pos, mask, sizes


@pytest.mark.parametrize("size", [32, 48])
def test_matches_diffusers_collator(size):
    tok = BuiltinTokenizer()
    m3 = P.default_prompt("m3")
    ivif = P.default_prompt("ivif")
    rows = [(m3, 2), (ivif, 2), (image_only_prompt(2), 2), ("", 0),
            # image 2 referenced first: spans follow the prompt order
            ("Compare <img><|image_2|></img> with <img><|image_1|></img>.", 2)]
    n = (size // 16) ** 2  # OmniGen: H*W // 16 // 16 tokens per image
    ref_ids, ref_pos, ref_mask, ref_sizes = _reference(tok, rows, size)

    cond = build_conditioning(tok, [p for p, _ in rows], [k for _, k in rows], tokens_per_image=n,
                              num_output_tokens=n)
    assert torch.equal(cond.input_ids, ref_ids)
    assert torch.equal(cond.position_ids(), ref_pos)
    mask = cond.mask()
    assert mask.dtype == torch.bool and mask.shape == (len(rows), 1, cond.seq_len, cond.seq_len)
    assert torch.equal(mask[:, 0], ref_mask.bool())
    # spans: same starts per row, in prompt order
    for b in range(len(rows)):
        mine = [[int(s), int(s) + n] for r, s in zip(cond.span_row, cond.span_start) if int(r) == b]
        assert mine == ref_sizes.get(b, [])
    # the last row shows image 2 first
    last = [int(i) for r, i in zip(cond.span_row, cond.span_image) if int(r) == 4]
    assert last == [4 * 2 + 1, 4 * 2 + 0]


def test_kv_rows_are_a_slice_of_the_mask():
    tok = BuiltinTokenizer()
    cond = build_conditioning(tok, [P.default_prompt("m3"), ""], [2, 0], tokens_per_image=4, num_output_tokens=4)
    C = cond.num_condition_tokens
    assert torch.equal(cond.mask(q_start=C), cond.mask()[:, :, C:])
    # conditions never see the time token or the output tokens (real rows)
    full = cond.mask()[:, 0]
    for b in range(2):
        p = int(cond.pad[b])
        assert not full[b, p:C, C:].any()


def test_wrong_image_count_names_the_problem():
    tok = BuiltinTokenizer()
    with pytest.raises(ValueError, match="image"):
        tokenize_multimodal(tok, P.default_prompt("m3"), 1, 4)


def test_builtin_prompt_is_short():
    tok = BuiltinTokenizer()
    ids = tok.encode(P.default_prompt("ivif"))
    assert len(ids) < 30  # phrases and tags are single tokens
    assert tok.decode(tok.encode("Segment the zebra.")).startswith("Segment the zebra")
