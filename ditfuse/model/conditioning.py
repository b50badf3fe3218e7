"""OmniGen conditioning: prompt wrapper, `<|image_k|>` spans, left padding, positions, mask.

One batch row is `[condition tokens (C, left padded) | time token | output-image tokens (N)]`.
Condition tokens are the wrapped prompt's text tokens with each `<|image_k|>` placeholder
replaced by the k-th input image's latent tokens. The attention rule (OmniGen, arXiv 2409.11340,
sec. 2.1; diffusers' `OmniGenCollator.create_mask`):

- text + time token: causal;
- inside one input-image span: bidirectional;
- condition tokens never see output-image tokens (so their K/V do not depend on t: the exact
  KV cache of `ditfuse.sampling.sampler` rests on this);
- output-image tokens see every real token;
- left-pad columns are hidden from real rows; pad rows see everything (as OmniGen does; their
  values never reach a real token).

Memory: OmniGen's collator materialises a dense float32 (B, L, L) mask on the host (with three
CFG branches and two 1024 px inputs, L ~ 12.4k: ~1.8 GB per pair). Here a batch keeps O(B*L)
integers (pad lengths, span ids). The model never builds the dense mask: `Conditioning.attention()`
gives the structured form (`AttentionMask`: the condition/time rows' own (C+1)^2 mask, a (B, 1, 1, L)
key-pad row for the output rows, nothing when unpadded); `Conditioning.mask()` expands the dense
boolean (B, 1, Lq, L) mask on the compute device, the reference the structured path is tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ditfuse.core.prompts import DROP_ALL_PROMPT, NEGATIVE_PROMPT

# OmniGen's instruction wrapper (OmniGenMultiModalProcessor.add_prefix_instruction).
PREFIX = "<|user|>\nGenerate an image according to the following instructions\n"
SUFFIX = "<|end|>\n<|assistant|>\n<|diffusion|>"
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")

# Guidance-branch prompts (PROMPTS.md). The images-only prompt is OmniGen's image-CFG prompt
# (`" ".join("<img><|image_k|></img>")`). The unconditional branch is OmniGen's default negative
# prompt without images (OmniGenProcessor.__call__, argument `negative_prompt`), wrapped like any
# prompt; official training drops all conditions to the instruction `<cfg>` without images
# (OmniGen/train_helper/data.py), so `<cfg>` is the default text of a training drop-all row.
UNCOND_PROMPT = DROP_ALL_PROMPT  # the training drop-all row's default text (older name)


def image_only_prompt(num_images: int) -> str:
    return " ".join(f"<img><|image_{k + 1}|></img>" for k in range(num_images))


def wrap_prompt(prompt: str) -> str:
    return f"{PREFIX}{prompt}{SUFFIX}"


def tokenize_multimodal(tokenizer, prompt: str, num_images: int, tokens_per_image: int
                        ) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """Token ids of the wrapped prompt with image placeholders expanded.

    Returns (ids, spans, image_ids): `spans[j] = (start, end)` is the j-th placeholder's token
    range (filled with 0 ids, as OmniGen does) and `image_ids[j]` the 0-based input image it
    shows. A prompt without placeholders must come with `num_images == 0`.
    """
    text = wrap_prompt(prompt)
    tags = IMAGE_TAG.findall(text)
    image_ids = [int(t[len("<|image_"):-2]) - 1 for t in tags]
    if sorted(set(image_ids)) != list(range(num_images)):
        raise ValueError(f"prompt references images {sorted({i + 1 for i in image_ids})} but {num_images} "
                         f"image(s) were given (placeholders must be <|image_1|>..<|image_{num_images}|>): "
                         f"{prompt[:120]!r}")
    chunks = IMAGE_TAG.split(text)
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for i, chunk in enumerate(chunks):
        chunk_ids = list(tokenizer(chunk).input_ids)
        # every chunk is tokenized on its own; only the first keeps its BOS (as OmniGen)
        if i > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
            chunk_ids = chunk_ids[1:]
        ids.extend(chunk_ids)
        if i < len(chunks) - 1:
            spans.append((len(ids), len(ids) + tokens_per_image))
            ids.extend([0] * tokens_per_image)
    return ids, spans, image_ids


@dataclass
class Conditioning:
    """A batch's conditioning in compact form (O(B*L) integers; see module docstring).

    input_ids:     (B, C) long, left padded with `pad_token_id`
    pad:           (B,) long, left-pad length per row
    segment:       (B, C) long, 0 for text/pad, s+1 for the s-th image span of the row
    span_row, span_start, span_image: (S,) long, one entry per image span in the batch:
                   its row, first token index (in the padded row) and index into the batch's
                   flattened input images (row * K + image_k)
    tokens_per_image: n (latent tokens per input image), num_output_tokens: N
    """

    input_ids: Tensor
    pad: Tensor
    segment: Tensor
    span_row: Tensor
    span_start: Tensor
    span_image: Tensor
    tokens_per_image: int
    num_output_tokens: int
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_condition_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def seq_len(self) -> int:
        return self.num_condition_tokens + 1 + self.num_output_tokens

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> "Conditioning":
        moved = {k: getattr(self, k).to(device) for k in
                 ("input_ids", "pad", "segment", "span_row", "span_start", "span_image")}
        return Conditioning(**moved, tokens_per_image=self.tokens_per_image,
                            num_output_tokens=self.num_output_tokens, extras=self.extras)

    def position_ids(self) -> Tensor:
        """(B, L): 0 on the left pad, then 0, 1, ... over text, time token and output tokens."""
        idx = torch.arange(self.seq_len, device=self.device)
        return (idx[None, :] - self.pad[:, None]).clamp_min(0)

    def image_token_index(self) -> tuple[Tensor, Tensor]:
        """(rows, cols) of every image token, span by span: each (S * n,)."""
        n = self.tokens_per_image
        offs = torch.arange(n, device=self.device)
        rows = self.span_row[:, None].expand(-1, n).reshape(-1)
        cols = (self.span_start[:, None] + offs[None, :]).reshape(-1)
        return rows, cols

    def mask(self, q_start: int = 0, q_end: int | None = None, k_end: int | None = None) -> Tensor:
        """Dense boolean attention mask (B, 1, q_end - q_start, k_end); True = may attend.

        Defaults give every row and key (B, 1, L, L); `q_start = C` gives only the rows of the
        time token and the output tokens (what one KV-cached sampling step needs). The model runs
        on `attention()` instead; this dense form is the reference it is tested against.
        """
        B, C, L = self.batch_size, self.num_condition_tokens, self.seq_len
        q_end, k_end = L if q_end is None else q_end, L if k_end is None else k_end
        dev = self.device
        q = torch.arange(q_start, q_end, device=dev)[None, :, None]  # (1, Lq, 1)
        k = torch.arange(k_end, device=dev)[None, None, :]  # (1, 1, Lk)
        pad = self.pad[:, None, None]  # (B, 1, 1)
        seg = torch.cat([self.segment, self.segment.new_zeros(B, 1 + self.num_output_tokens)], dim=1)
        seg_q = seg[:, q_start:q_end, None]  # (B, Lq, 1)
        seg_k = seg[:, None, :k_end]  # (B, 1, Lk)
        allowed = (k <= q) | (q > C) | ((seg_q == seg_k) & (seg_q > 0))
        allowed = (allowed & (k >= pad)) | (q < pad)
        return allowed[:, None]  # (B, 1, Lq, Lk)

    def unpadded_row(self, b: int) -> Conditioning:
        """Row b alone without its left pad (same positions and RoPE factors as in the batch; its
        spans still index the batch's input images)."""
        p, sel = int(self.pad[b]), self.span_row == b
        return Conditioning(input_ids=self.input_ids[b:b + 1, p:], pad=self.pad.new_zeros(1),
                            segment=self.segment[b:b + 1, p:], span_row=torch.zeros_like(self.span_row[sel]),
                            span_start=self.span_start[sel] - p, span_image=self.span_image[sel],
                            tokens_per_image=self.tokens_per_image, num_output_tokens=self.num_output_tokens)

    def attention(self, q_start: int = 0, q_end: int | None = None) -> AttentionMask:
        """OmniGen's mask in the structured form the backbone's attention takes (see
        `AttentionMask`), for query rows [q_start, q_end) against keys [0, L) (or [0, q_end) when
        the rows stop inside the condition tokens, as in `prefill`)."""
        C, L = self.num_condition_tokens, self.seq_len
        q_end = L if q_end is None else q_end
        split = min(C + 1, q_end)  # condition rows + the time token: causal text, image spans
        padded = bool(self.pad.max() > 0) if self.batch_size else False
        n_pre = max(split - q_start, 0)
        prefix, causal = None, False
        if n_pre:
            if self.span_row.numel() == 0 and not padded:
                causal = q_start == 0  # plain causal; a single last row (the step's time token) sees all
                if not causal and n_pre > 1:
                    prefix = self.mask(q_start, split, split)
            else:
                prefix = self.mask(q_start, split, split)
        keys = None
        if padded and q_end > split:  # output rows see every real key: only left-pad columns hidden
            keys = (torch.arange(L, device=self.device)[None, :] >= self.pad[:, None])[:, None, None]
        return AttentionMask(prefix_rows=n_pre, prefix_keys=split, prefix=prefix, causal=causal, keys=keys)


@dataclass(frozen=True)
class AttentionMask:
    """OmniGen's attention rule without a dense (B, 1, Lq, L) mask.

    The first `prefix_rows` query rows (condition tokens and the time token, the part with causal
    text and bidirectional image spans) only ever see keys [0, prefix_keys): they attend to those
    under `prefix` (B, 1, prefix_rows, prefix_keys) bool, or plainly causal (`causal`), or to all
    of them (both unset). The remaining rows (output-image tokens) see every real key: only the
    left-pad columns are hidden, by `keys` (B, 1, 1, L) bool, None when no row is padded.

    Exact for every real row; pad rows see only the prefix keys here (the dense mask lets them see
    everything), which changes nothing a real row reads: pad columns are hidden from real rows.
    """

    prefix_rows: int
    prefix_keys: int
    prefix: Tensor | None
    causal: bool
    keys: Tensor | None


def build_conditioning(tokenizer, prompts: list[str], num_images: list[int] | int, tokens_per_image: int,
                       num_output_tokens: int, pad_token_id: int | None = None,
                       image_rows: list[int] | None = None,
                       device: torch.device | str | None = None) -> Conditioning:
    """Tokenize and collate a batch.

    `num_images[b]` input images are referenced by row b's prompt (0 for a text-only or
    unconditional row). Images come from a (B_img, K, c, h, w) latent tensor: row b shows the
    images of row `image_rows[b]` (default b), so guidance branches can share one image tensor.
    `K` is `max(num_images)`.
    """
    B = len(prompts)
    counts = [num_images] * B if isinstance(num_images, int) else list(num_images)
    if len(counts) != B:
        raise ValueError(f"num_images has {len(counts)} entries for {B} prompts")
    K = max(counts, default=0)
    pad_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    src = list(range(B)) if image_rows is None else list(image_rows)
    rows = [tokenize_multimodal(tokenizer, p, c, tokens_per_image) for p, c in zip(prompts, counts)]
    C = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((B, C), pad_id, dtype=torch.long)
    segment = torch.zeros((B, C), dtype=torch.long)
    pad = torch.empty(B, dtype=torch.long)
    span_row, span_start, span_image = [], [], []
    for b, (ids, spans, image_ids) in enumerate(rows):
        p = C - len(ids)
        pad[b] = p
        input_ids[b, p:] = torch.tensor(ids, dtype=torch.long)
        for s, ((start, end), img) in enumerate(zip(spans, image_ids)):
            segment[b, p + start:p + end] = s + 1
            span_row.append(b)
            span_start.append(p + start)
            span_image.append(src[b] * K + img)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    cond = Conditioning(input_ids=input_ids, pad=pad, segment=segment, span_row=as_long(span_row),
                        span_start=as_long(span_start), span_image=as_long(span_image),
                        tokens_per_image=tokens_per_image, num_output_tokens=num_output_tokens)
    return cond if device is None else cond.to(device)
