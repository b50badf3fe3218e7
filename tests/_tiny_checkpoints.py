"""Tiny synthetic OmniGen checkpoints for the interop tests, and an independent reference forward.

The reference re-implements OmniGen/model.py's `OmniGen.forward` (github.com/VectorSpaceLab/OmniGen)
on top of transformers' own Phi3 decoder layers (fused `qkv_proj`, longrope RoPE, eager
attention), so it shares no code with diffusers' OmniGenTransformer2DModel.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HIDDEN, HEADS, KV_HEADS, LAYERS = 32, 4, 4, 2  # diffusers' OmniGen attention has no GQA: kv == heads
HEAD_DIM = HIDDEN // HEADS
FREQ_DIM = 256  # TimestepEmbedder.frequency_embedding_size in OmniGen/model.py
POS_MAX = 192  # OmniGen pos_embed_max_size

TINY_PHI3 = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "hidden_size": HIDDEN,
    "intermediate_size": 48,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": 64,
    "pad_token_id": 3,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "original_max_position_embeddings": 32,  # short sequences use short_factor, long ones long_factor
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "su",
        "short_factor": [1.0, 1.1, 1.3, 1.7],
        "long_factor": [1.5, 2.0, 3.0, 5.0],
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


def phi3_config(cfg: dict | None = None):
    from transformers import Phi3Config

    cfg = json.loads(json.dumps(cfg or TINY_PHI3))
    # transformers v5 reads longrope settings from rope_parameters (OmniGen-v1's file predates it)
    rope = cfg.pop("rope_scaling")
    rope = {"rope_type": "longrope", "rope_theta": cfg.pop("rope_theta"), "short_factor": rope["short_factor"],
            "long_factor": rope["long_factor"],
            "original_max_position_embeddings": cfg["original_max_position_embeddings"],
            "factor": cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]}
    config = Phi3Config(**cfg, rope_parameters=rope)
    config._attn_implementation = "eager"
    return config


def random_original_state_dict(seed: int = 0, cfg: dict | None = None) -> dict[str, Tensor]:
    """Original OmniGen keys (`llm.*`, `x_embedder`, ...) with random, non-trivial values."""
    from transformers import Phi3Model

    torch.manual_seed(seed)
    llm = Phi3Model(phi3_config(cfg))
    sd = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    h = llm.config.hidden_size
    shapes = {
        "x_embedder.proj.weight": (h, 4, 2, 2), "x_embedder.proj.bias": (h,),
        "input_x_embedder.proj.weight": (h, 4, 2, 2), "input_x_embedder.proj.bias": (h,),
        "time_token.mlp.0.weight": (h, FREQ_DIM), "time_token.mlp.0.bias": (h,),
        "time_token.mlp.2.weight": (h, h), "time_token.mlp.2.bias": (h,),
        "t_embedder.mlp.0.weight": (h, FREQ_DIM), "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,),
        "final_layer.linear.weight": (16, h), "final_layer.linear.bias": (16,),
        "pos_embed": (1, POS_MAX * POS_MAX, h),
    }
    sd.update({k: torch.empty(s) for k, s in shapes.items()})
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sd.items():
        noise = torch.randn(v.shape, generator=g)
        if k.endswith("layernorm.weight") or k == "llm.norm.weight":
            sd[k] = 1 + 0.1 * noise
        else:  # outputs of order 1 keep float32 rounding well under the 1e-5 tolerance
            sd[k] = (0.05 if k.startswith("final_layer.linear") else 0.2) * noise
    return sd


def write_original_checkpoint(folder: Path, seed: int = 0, cfg: dict | None = None) -> dict[str, Tensor]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = random_original_state_dict(seed, cfg)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg or TINY_PHI3))
    return sd


# ----------------------------------------------------------------------------- reference forward
def _timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as OmniGen


def _mlp(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    x = F.linear(x, sd[f"{prefix}.mlp.0.weight"], sd[f"{prefix}.mlp.0.bias"])
    return F.linear(F.silu(x), sd[f"{prefix}.mlp.2.weight"], sd[f"{prefix}.mlp.2.bias"])


def _patch(sd: dict[str, Tensor], prefix: str, latent: Tensor) -> Tensor:
    x = F.conv2d(latent, sd[f"{prefix}.proj.weight"], sd[f"{prefix}.proj.bias"], stride=2)
    x = x.flatten(2).transpose(1, 2)
    h, w = latent.shape[-2] // 2, latent.shape[-1] // 2
    top, left = (POS_MAX - h) // 2, (POS_MAX - w) // 2
    pos = sd["pos_embed"].reshape(1, POS_MAX, POS_MAX, -1)[:, top:top + h, left:left + w]
    return x + pos.reshape(1, h * w, -1)


def original_forward(sd: dict[str, Tensor], cfg: dict, x: Tensor, t: Tensor, input_ids: Tensor,
                     input_latents: list[Tensor], image_spans: dict[int, list[tuple[int, int]]],
                     mask: Tensor, position_ids: Tensor) -> Tensor:
    """OmniGen.forward (non-list branch) with transformers' Phi3 layers; mask (B, L, L) of 0/1."""
    from transformers import Phi3Model

    llm = Phi3Model(phi3_config(cfg))
    llm.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("llm.")})
    llm.eval()
    with torch.no_grad():
        out_tokens = _patch(sd, "x_embedder", x)
        time_token = _mlp(sd, "time_token", _timestep_embedding(t)).unsqueeze(1)
        cond = llm.embed_tokens(input_ids).clone()
        latents = [_patch(sd, "input_x_embedder", lat) for lat in input_latents]
        i = 0
        for b, spans in image_spans.items():
            for start, end in spans:
                cond[b, start:end] = latents[i]
                i += 1
        h = torch.cat([cond, time_token, out_tokens], dim=1)
        additive = ((1 - mask) * torch.finfo(h.dtype).min).unsqueeze(1)
        rope = llm.rotary_emb(h, position_ids=position_ids)
        for layer in llm.layers:
            h = layer(h, attention_mask=additive, position_ids=position_ids, position_embeddings=rope)
        h = llm.norm(h)[:, -out_tokens.shape[1]:]
        c = _mlp(sd, "t_embedder", _timestep_embedding(t))
        mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
        shift, scale = mod.chunk(2, dim=1)
        h = F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
        n, hh, ww = x.shape[0], x.shape[-2] // 2, x.shape[-1] // 2
        h = h.reshape(n, hh, ww, 2, 2, 4)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(n, 4, hh * 2, ww * 2)


def omnigen_inputs(batch: int, text: int, in_hw: int | None, out_hw: int, seed: int = 0):
    """Token ids with one input-image span after `text` tokens, the OmniGen mask and positions.

    Mask (OmniGen): causal over condition + time token; bidirectional inside the input image;
    output-image tokens see everything and each other.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = (in_hw // 2) ** 2 if in_hw else 0
    n_cond = text + n_img + 3
    n_out = (out_hw // 2) ** 2
    length = n_cond + 1 + n_out
    input_ids = torch.randint(4, 64, (batch, n_cond), generator=g)
    latents = [torch.randn(1, 4, in_hw, in_hw, generator=g) for _ in range(batch)] if in_hw else []
    spans = {b: [(text, text + n_img)] for b in range(batch)} if in_hw else {}
    mask = torch.tril(torch.ones(length, length))
    if in_hw:
        mask[text:text + n_img, text:text + n_img] = 1
    mask[-n_out:, :] = 1
    mask = mask.expand(batch, -1, -1).clone()
    position_ids = torch.arange(length).expand(batch, -1).clone()
    x = torch.randn(batch, 4, out_hw, out_hw, generator=g)
    t = torch.rand(batch, generator=g)
    return {"x": x, "t": t, "input_ids": input_ids, "input_latents": latents, "image_spans": spans,
            "mask": mask, "position_ids": position_ids}


def diffusers_forward(model, inputs: dict) -> Tensor:
    with torch.no_grad():
        return model(hidden_states=inputs["x"], timestep=inputs["t"], input_ids=inputs["input_ids"],
                     input_img_latents=inputs["input_latents"], input_image_sizes=inputs["image_spans"],
                     attention_mask=inputs["mask"], position_ids=inputs["position_ids"]).sample


# ----------------------------------------------------------------------------- LoRA adapters
OFFICIAL_PREFIX = "base_model.model.llm."  # OmniGen train.py: get_peft_model(OmniGen) + save_pretrained


def official_adapter(r: int = 3, seed: int = 7, std: float = 0.1) -> dict[str, Tensor]:
    """Random official adapter on every layer's fused qkv_proj and o_proj (keys as saved by peft)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in range(LAYERS):
        for module, rows in (("qkv_proj", 3 * HIDDEN), ("o_proj", HIDDEN)):
            key = f"{OFFICIAL_PREFIX}layers.{n}.self_attn.{module}"
            sd[f"{key}.lora_A.weight"] = std * torch.randn(r, HIDDEN, generator=g)
            sd[f"{key}.lora_B.weight"] = std * torch.randn(rows, r, generator=g)
    return sd


def ours_adapter(r: int = 3, seed: int = 11, std: float = 0.1, modules=("to_q", "to_k", "to_v", "to_out.0")
                 ) -> dict[str, Tensor]:
    """Random adapter in this framework's naming with a different A for each of q, k, v."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in range(LAYERS):
        for module in modules:
            key = f"layers.{n}.self_attn.{module}"
            sd[f"{key}.lora_A.weight"] = std * torch.randn(r, HIDDEN, generator=g)
            sd[f"{key}.lora_B.weight"] = std * torch.randn(HIDDEN, r, generator=g)
    return sd


def hand_merge_official(sd: dict[str, Tensor], adapter: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Original state dict with W <- W + scale * B @ A on the fused modules, by hand."""
    merged = dict(sd)
    for key, a in adapter.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            merged[f"{module}.weight"] = sd[f"{module}.weight"] + scale * b @ a
    return merged


def write_adapter(folder: Path, sd: dict[str, Tensor], config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
