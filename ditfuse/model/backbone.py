"""OmniGen transformer: build/load, and this framework's forward over diffusers' submodules.

The weights live in a `diffusers.OmniGenTransformer2DModel` (so peft, diffusers save/load and
conversions see the standard module names). The forward is our own because diffusers' takes a
dense float mask built on the host and recomputes the condition tokens at every step. Ours:

- takes a `Conditioning` (compact) and attends by OmniGen's mask structure (`attend`): no dense
  (B, 1, Lq, L) mask, only the condition part's own small mask and a key-pad row;
- applies RoPE per batch row, positions and short/long factors alike (diffusers reads only row
  0's position ids and picks one factor set per batch; DESIGN.md interop);
- checkpoints blocks when `gradient_checkpointing` is on (all but the last, whose recompute
  would free nothing), and keeps only the gate_up projection for the SwiGLU MLP's backward;
- calls each block as a module (`DiTFuseBlock`), so FSDP units and checkpoint wrappers around the
  blocks run (docs/scaling.md, what is exact under DDP/FSDP);
- splits into `prefill` (condition tokens once -> per-layer K/V) and `step` (time token + output
  tokens against the cached K/V): exact, since condition tokens never attend to t-dependent
  tokens (OmniGen's attention rule, see ditfuse.model.conditioning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_omnigen import OmniGenBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditfuse.interop.convert import load_original_transformer
from ditfuse.interop.weights import read_header
from ditfuse.model.conditioning import AttentionMask, Conditioning
from ditfuse.model.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Build / load
# ---------------------------------------------------------------------------------------------
def build_transformer(cfg: ModelConfig, seed: int | None = 0):
    """Random-init transformer of a preset's shape (tests, demo, benchmarks), OmniGen's init."""
    from diffusers import OmniGenTransformer2DModel

    if seed is None:
        return omnigen_init(OmniGenTransformer2DModel(**cfg.transformer_kwargs()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return omnigen_init(OmniGenTransformer2DModel(**cfg.transformer_kwargs()))


@torch.no_grad()
def omnigen_init(model: nn.Module, std: float = 0.02) -> nn.Module:
    """OmniGen's initialisation for training from scratch: the Phi-3 LLM's normal(0, 0.02)
    (initializer_range) for projections and token embeddings, patch embeddings like nn.Linear
    (xavier), timestep MLPs normal(0, 0.02), and DiT's zeroed output layers (adaLN modulation and
    final projection), so a fresh model predicts zero velocity and trains stably from step one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
    nn.init.zeros_(model.norm_out.linear.weight)
    nn.init.zeros_(model.norm_out.linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """('diffusers', transformer_dir) or ('original', folder) for a local model folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; set --model.pretrained to a local OmniGen folder "
                                "(diffusers layout with transformer/, or the original OmniGen-v1 layout); "
                                "nothing is downloaded")
    for cand in (path / "transformer", path):
        cfg = cand / "config.json"
        if cfg.is_file() and any(cand.glob("diffusion_pytorch_model*")):
            return "diffusers", cand
    if (path / "model.safetensors").is_file() or any(path.glob("model*.safetensors")) or (path / "model.pt").is_file():
        return "original", path
    raise FileNotFoundError(f"{path} is neither a diffusers-layout OmniGen folder (transformer/config.json + "
                            "diffusion_pytorch_model.safetensors) nor an original OmniGen-v1 folder (model.safetensors)")


def load_transformer(path: str | Path, dtype: torch.dtype | None = None):
    """Transformer weights from a local folder, either layout (original keys converted on load)."""
    layout, folder = detect_layout(path)
    if layout == "diffusers":
        from diffusers import OmniGenTransformer2DModel

        for f in sorted(folder.glob("*.safetensors")):
            read_header(f)  # a truncated file is named here, not deep inside from_pretrained
        model = OmniGenTransformer2DModel.from_pretrained(str(folder), local_files_only=True)
    else:
        model = load_original_transformer(folder, dtype)  # zero copy when stored as dtype
    return model if dtype is None else model.to(dtype)


def transformer_config(model) -> dict:
    return dict(model.config)


# ---------------------------------------------------------------------------------------------
# RoPE (Phi-3 "su"/longrope scaled, as diffusers' OmniGenSuScaledRotaryEmbedding, per row)
# ---------------------------------------------------------------------------------------------
def rope_cos_sin(rope: nn.Module, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, 1, L, head_dim) in float32 for position ids (B, L).

    Each row picks short or long factors from its own length (its largest position + 1), as the
    official pipeline does by running every guidance branch on its own (`separate_cfg_infer`):
    one choice per batch would make a row's output depend on its batch mates (DESIGN.md interop).
    """
    dev = position_ids.device
    row_len = position_ids.amax(dim=1) + 1  # (B,)
    use_long = (row_len > rope.original_max_position_embeddings)[:, None]  # (B, 1)
    short = torch.tensor(rope.short_factor, dtype=torch.float32, device=dev)
    long = torch.tensor(rope.long_factor, dtype=torch.float32, device=dev)
    ext = torch.where(use_long, long, short)  # (B, hd/2)
    exps = torch.arange(0, rope.dim, 2, dtype=torch.int64, device=dev).float() / rope.dim
    inv_freq = 1.0 / (ext * rope.base ** exps)  # (B, hd/2)
    freqs = position_ids.float()[..., None] * inv_freq[:, None, :]  # (B, L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, hd)
    scale = rope.max_position_embeddings / rope.original_max_position_embeddings
    factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(rope.original_max_position_embeddings))
    return (emb.cos() * factor)[:, None], (emb.sin() * factor)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, hd); halves rotation (diffusers `use_real_unbind_dim=-2`), in float32.
    (Autograd keeps only cos/sin here: the products save x only when cos/sin need gradients.)"""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of the fused gate_up projection, keeping only that projection's output for
    backward (plain autograd also keeps silu(gate): half the projection's size per recomputed
    block) and recomputing the sigmoid there, with the formula of torch's silu backward."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        d_up = grad * (gate * sig)
        d_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return torch.cat([d_gate, d_up], dim=-1)


def swiglu(gate_up: Tensor) -> Tensor:
    """OmniGen's (Phi-3's) MLP activation: silu of the first half times the second half."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SwiGLU.apply(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place on silu's fresh output: one allocation fewer


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Per-layer key/value buffers (B, H_kv, C + 1 + N, hd): the first C positions hold the condition
    tokens' K/V (from `prefill`); each `step` writes its time + output tokens' K/V into the tail in
    place (no per-step copy of the whole cache). Plus what a step needs."""

    keys: list[Tensor]
    values: list[Tensor]
    cond: Conditioning
    cos: Tensor  # (B, 1, 1+N, hd) for the time + output tokens
    sin: Tensor
    mask: AttentionMask  # rows of the time + output tokens

    def rows(self, stop: int) -> KVCache:
        """The first `stop` rows (the conditional guidance branch of a batched cache): views, so a
        step on them writes the shared buffers in place as a full step does."""
        m = self.mask
        first = lambda x: None if x is None else x[:stop]  # noqa: E731
        mask = (replace(m, prefix=first(m.prefix), keys=first(m.keys)) if isinstance(m, AttentionMask)
                else first(m))
        return KVCache(keys=[k[:stop] for k in self.keys], values=[v[:stop] for v in self.values],
                       cond=self.cond, cos=self.cos[:stop], sin=self.sin[:stop], mask=mask)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | Tensor | None, gqa: bool = False) -> Tensor:
    """sdpa by OmniGen's mask structure: (B, H, Lq, hd) for queries q against keys/values k, v.

    A Tensor (or None) mask is the dense reference path. An `AttentionMask` runs two calls: the
    leading condition/time rows against the leading keys only (their small mask, or is_causal),
    then the output rows against every key with at most a (B, 1, 1, L) key-pad mask, none when
    unpadded. So no O(L^2) mask is built, the condition rows skip the output keys they may not
    see, and unmasked calls leave sdpa free to pick its fused kernels on GPU.
    """
    if not isinstance(mask, AttentionMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    n, kp = mask.prefix_rows, mask.prefix_keys
    parts = []
    if n:
        parts.append(F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :kp], v[:, :, :kp], attn_mask=mask.prefix,
                                                    is_causal=mask.causal, enable_gqa=gqa))
    if n < q.shape[2]:
        parts.append(F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=mask.keys, enable_gqa=gqa))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class DiTFuseBlock(OmniGenBlock):
    """An OmniGenBlock whose forward is this framework's block computation (boolean mask, per-row
    RoPE, KV-cache tail writes, returns the block's K/V).

    `Backbone` swaps the class of each diffusers block to this subclass in place: parameters, names
    and state-dict keys stay the same, and isinstance-based wrap policies (FSDP's ModuleWrapPolicy,
    Lightning's `auto_wrap_policy` / `activation_checkpointing_policy` naming OmniGenBlock) still
    match every block.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def forward(self, h: Tensor, *args: Any, **kwargs: Any):  # type: ignore[override]
        """`Backbone._run_blocks` calls block(h, cos, sin, mask, past); diffusers' own transformer
        forward calls block(hidden_states, attention_mask, image_rotary_emb) and still gets
        diffusers' block, so a transformer stays usable on its own after `Backbone` adopted it."""
        if len(args) == 4 and not kwargs:
            return self.ditfuse_forward(h, *args)
        return super().forward(h, *args, **kwargs)

    def ditfuse_forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask | Tensor | None,
                        past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        B, Lq, _ = h.shape
        attn = self.self_attn
        x = self.input_layernorm(h)
        q = attn.to_q(x).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Lq, hd)
        k = attn.to_k(x).view(B, Lq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, Lq, hd)
        v = attn.to_v(x).view(B, Lq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = (k, v) if past is None else past
        if past is not None:  # KVCache buffers: conditions, then this step's tokens
            k_all[:, :, -Lq:], v_all[:, :, -Lq:] = k, v
        o = attend(q, k_all, v_all, mask, gqa=self.num_kv_heads != self.num_heads)
        o = attn.to_out[0](o.transpose(1, 2).reshape(B, Lq, -1))
        h = h + o
        mlp = self.mlp
        h = h + mlp.down_proj(swiglu(mlp.gate_up_proj(self.post_attention_layernorm(h))))
        return h, k, v


def as_ditfuse_blocks(transformer: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Give every block of `transformer.layers` the DiTFuseBlock forward (in place, idempotent)."""
    for block in transformer.layers:
        if not isinstance(block, OmniGenBlock):
            raise TypeError(f"transformer.layers holds a {type(block).__name__}, not an OmniGenBlock: "
                            "wrap the model for FSDP/checkpointing after building DiTFuseModule")
        block.__class__ = DiTFuseBlock
        block.num_heads, block.num_kv_heads, block.head_dim = num_heads, num_kv_heads, head_dim


class Backbone(nn.Module):
    """Wraps an OmniGenTransformer2DModel; see module docstring."""

    def __init__(self, transformer: nn.Module, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        c = transformer.config
        self.num_heads = int(c.num_attention_heads)
        self.num_kv_heads = int(c.num_key_value_heads)
        self.head_dim = int(c.hidden_size) // self.num_heads
        self.patch_size = int(c.patch_size)
        self.gradient_checkpointing = gradient_checkpointing
        # True: hand sdpa OmniGen's dense (B, 1, Lq, L) boolean mask (the reference path in tests)
        self.dense_mask = False
        as_ditfuse_blocks(transformer, self.num_heads, self.num_kv_heads, self.head_dim)

    # -- embeddings ----------------------------------------------------------------------------
    def embed_conditions(self, cond: Conditioning, cond_latents: Tensor | None) -> Tensor:
        """Condition tokens (B, C, D): text embeddings with image spans replaced by the input
        images' patch embeddings (+ 2D sincos positions). cond_latents: (B_img, K, c, h, w)."""
        tr = self.transformer
        tokens = tr.embed_tokens(cond.input_ids)  # (B, C, D)
        if cond.span_row.numel() == 0:
            return tokens
        if cond_latents is None:
            raise ValueError("the prompts reference input images but no image latents were given")
        pe = tr.patch_embedding
        flat = cond_latents.flatten(0, 1)[cond.span_image].to(tokens.dtype)  # (S, c, h, w)
        img = pe.input_image_proj(flat).flatten(2).transpose(1, 2)  # (S, n, D)
        img = img + pe._cropped_pos_embed(*flat.shape[-2:]).to(img.dtype)
        if img.shape[1] != cond.tokens_per_image:
            raise ValueError(f"input latents give {img.shape[1]} tokens per image, the conditioning expects "
                             f"{cond.tokens_per_image}")
        rows, cols = cond.image_token_index()
        # under autocast the patch conv gives bf16 while an fp32 embedding table gives fp32
        return tokens.index_put((rows, cols), img.reshape(-1, img.shape[-1]).to(tokens.dtype))

    def embed_time(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """time token (B, 1, D) and adaLN embedding temb (B, D); t in [0, 1], 1 = data."""
        tr = self.transformer
        proj = tr.time_proj(t).to(dtype)  # (B, 256)
        return tr.time_token(proj).unsqueeze(1), tr.t_embedder(proj)

    # -- blocks --------------------------------------------------------------------------------
    def _run_blocks(self, h: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask | Tensor,
                    cache: KVCache | None = None, collect: bool = False):
        keys, values = [], []
        # Each block is called as a module (`block(...)`), never through its submodules, so
        # whatever wraps it (an FSDP unit gathering its shards, fully_shard's hooks, Lightning's
        # activation-checkpoint wrapper) runs around the block computation.
        last = len(self.transformer.layers) - 1
        for i, block in enumerate(self.transformer.layers):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            # The last block is never checkpointed: its backward comes right after the forward, so
            # a recompute would rebuild the very activations it drops (the same live tensors at
            # the backward; docs/performance.md has the measured RSS).
            if self.gradient_checkpointing and torch.is_grad_enabled() and i < last:
                h, k, v = checkpoint(block, h, cos, sin, mask, past, use_reentrant=False)
            else:
                h, k, v = block(h, cos, sin, mask, past)
            if collect:
                keys.append(k)
                values.append(v)
        return h, keys, values

    def _output(self, h: Tensor, temb: Tensor, height: int, width: int) -> Tensor:
        """Final norm + adaLN + projection of the last N tokens, unpatchified to (B, c, h, w)."""
        tr, p = self.transformer, self.patch_size
        N = (height // p) * (width // p)
        h = tr.norm(h[:, -N:])  # per-token norm: only the output rows are read (and kept for backward)
        h = tr.proj_out(tr.norm_out(h, temb=temb))  # (B, N, p*p*c)
        B = h.shape[0]
        h = h.reshape(B, height // p, width // p, p, p, -1)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, height, width)

    # -- public --------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, cond_latents: Tensor | None) -> Tensor:
        """Velocity (B, c, h, w) for noisy latents x_t (B, c, h, w) at times t (B,)."""
        H, W = x_t.shape[-2:]
        tr = self.transformer
        # 1. Patch & timestep & condition embeddings
        out_tok = tr.patch_embedding(x_t.to(tr.dtype), is_input_image=False)  # (B, N, D)
        if out_tok.shape[1] != cond.num_output_tokens:
            raise ValueError(f"x_t gives {out_tok.shape[1]} output tokens, the conditioning expects "
                             f"{cond.num_output_tokens}")
        time_tok, temb = self.embed_time(t, out_tok.dtype)  # (B, 1, D), (B, D)
        cond_tok = self.embed_conditions(cond, cond_latents)  # (B, C, D)
        h = torch.cat([cond_tok, time_tok, out_tok], dim=1)  # (B, L, D)
        # 2. Positions (per row) & boolean mask on the compute device
        cos, sin = rope_cos_sin(tr.rope, cond.position_ids())
        mask = cond.mask() if self.dense_mask else cond.attention()
        # 3. Transformer blocks
        h, _, _ = self._run_blocks(h, cos, sin, mask)
        # 4. Output norm & projection
        return self._output(h, temb, H, W)

    def _condition_kv(self, cond: Conditioning, cond_latents: Tensor | None, cos: Tensor, sin: Tensor
                      ) -> tuple[list[Tensor], list[Tensor]]:
        C = cond.num_condition_tokens
        h = self.embed_conditions(cond, cond_latents)  # (B, C, D)
        mask = cond.mask(0, C, C) if self.dense_mask else cond.attention(0, C)
        _, keys, values = self._run_blocks(h, cos, sin, mask, collect=True)
        return keys, values

    @torch.no_grad()
    def prefill(self, cond: Conditioning, cond_latents: Tensor | None) -> KVCache:
        """Run the condition tokens once; keep each layer's K/V (after RoPE)."""
        B, C = cond.batch_size, cond.num_condition_tokens
        cos, sin = rope_cos_sin(self.transformer.rope, cond.position_ids())  # (B, 1, L, hd)
        tail = cos.shape[2] - C  # time + output tokens, written by each step
        if self.dense_mask or B == 1 or not bool(cond.pad.max() > 0):
            keys, values = self._condition_kv(cond, cond_latents, cos[:, :, :C], sin[:, :, :C])
            keys, values = ([torch.cat([x, x.new_empty(*x.shape[:2], tail, x.shape[3])], 2) for x in xs]
                            for xs in (keys, values))
        else:  # rows of different lengths (guidance branches): each at its own length, so no compute
            keys, values = [], []  # goes to left pad; zeroed pad columns keep the masked scores finite
            for b in range(B):
                p = int(cond.pad[b])
                kb, vb = self._condition_kv(cond.unpadded_row(b), cond_latents, cos[b:b + 1, :, p:C],
                                            sin[b:b + 1, :, p:C])
                if not keys:
                    keys, values = ([x.new_zeros(B, x.shape[1], C + tail, x.shape[3]) for x in xs] for xs in (kb, vb))
                for buf, x in zip(keys + values, kb + vb):
                    buf[b, :, p:C] = x[0]
        return KVCache(keys=keys, values=values, cond=cond, cos=cos[:, :, C:], sin=sin[:, :, C:],
                       mask=cond.mask(q_start=C) if self.dense_mask else cond.attention(q_start=C))

    def step(self, x_t: Tensor, t: Tensor, cache: KVCache) -> Tensor:
        """Velocity from the time token + output tokens only, attending to the cached K/V."""
        h, temb = self.step_input(x_t, t)
        return self.step_output(self.step_blocks(h, cache), temb, *x_t.shape[-2:])

    # `step` in its three parts, for the step caching of ditfuse.sampling.sampler (skip the blocks, reuse
    # their residual): the blocks' input, the blocks, the output head.
    def step_input(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks' input h (B, 1+N, D): time token + output tokens; and temb (B, D)."""
        tr = self.transformer
        out_tok = tr.patch_embedding(x_t.to(tr.dtype), is_input_image=False)  # (B, N, D)
        time_tok, temb = self.embed_time(t, out_tok.dtype)
        return torch.cat([time_tok, out_tok], dim=1), temb

    def step_blocks(self, h: Tensor, cache: KVCache) -> Tensor:
        return self._run_blocks(h, cache.cos, cache.sin, cache.mask, cache=cache)[0]

    def step_output(self, h: Tensor, temb: Tensor, height: int, width: int) -> Tensor:
        return self._output(h, temb, height, width)
