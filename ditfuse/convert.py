"""Weight interop: OmniGen-v1 layouts, official DiTFuse LoRA adapters, merging, `ditfuse convert`.

Two model layouts hold the same network (DESIGN.md "Model", "Interop facts"):
- diffusers: `DIR/transformer/{config.json, diffusion_pytorch_model.safetensors}` for
  `diffusers.OmniGenTransformer2DModel` (what this framework trains and samples);
- original (github.com/VectorSpaceLab/OmniGen, OmniGen/model.py): `DIR/config.json` is a
  Phi3Config, `DIR/model.safetensors` (or `model.pt`) holds `llm.*` (a Phi3Model with a fused
  `qkv_proj`), `x_embedder`, `input_x_embedder`, `time_token`, `t_embedder`, `final_layer`,
  `pos_embed`.

Two LoRA adapter formats (both peft folders: adapter_config.json + adapter_model.safetensors):
- this framework's ("ditfuse"): targets OmniGenTransformer2DModel modules, keys as
  `peft.get_peft_model_state_dict` gives them, `layers.N.self_attn.to_q.lora_A.weight`;
- official ("official"): OmniGen's train.py wraps the whole OmniGen model with
  `get_peft_model(model, LoraConfig(target_modules=["qkv_proj", "o_proj"]))` and saves with
  `PeftModel.save_pretrained`, so keys read
  `base_model.model.llm.layers.N.self_attn.qkv_proj.lora_A.weight` (DiTFuse: "Training follows the
  same procedure as OmniGen"). Variants without `base_model.model.` / `llm.` or with the adapter
  name (`lora_A.default.weight`) are accepted too.

Fused -> split LoRA is exact: qkv = B @ A with B split by rows gives q = B_q @ A, k = B_k @ A,
v = B_v @ A, so A is shared and B splits like the weight. Split -> fused is exact too: when the
three A differ, stack them (rank 3r) under a block-diagonal B. The scale (lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora) is kept in every direction.

Nothing here downloads: every path is a local folder, a missing one is a FileNotFoundError that
names the file and what to pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

Layout = Literal["diffusers", "original"]
AdapterFormat = Literal["ditfuse", "official"]
StateDict = dict[str, Tensor]

# Fixed by the OmniGen class, not stored in its config.json (OmniGen/model.py: OmniGen.__init__
# defaults patch_size=2, in_channels=4, pos_embed_max_size=192; TimestepEmbedder's
# frequency_embedding_size=256).
ORIGINAL_FIXED = {"in_channels": 4, "patch_size": 2, "pos_embed_max_size": 192, "time_step_dim": 256}
PHI3_DEFAULT_PAD_TOKEN_ID = 32000  # transformers.Phi3Config default, used when config.json omits it
ORIGINAL_WEIGHTS = ("model.safetensors", "model.pt")  # OmniGen.from_pretrained reads these two
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json")

# original prefix -> diffusers prefix (DESIGN.md "Model"); `llm.` keys lose the prefix and the
# attention projections are handled apart.
_RENAMES = (
    ("x_embedder.proj.", "patch_embedding.output_image_proj."),
    ("input_x_embedder.proj.", "patch_embedding.input_image_proj."),
    ("time_token.mlp.0.", "time_token.linear_1."),
    ("time_token.mlp.2.", "time_token.linear_2."),
    ("t_embedder.mlp.0.", "t_embedder.linear_1."),
    ("t_embedder.mlp.2.", "t_embedder.linear_2."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("final_layer.linear.", "proj_out."),
    ("pos_embed", "patch_embedding.pos_embed"),
)
_QKV = ("to_q", "to_k", "to_v")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ATTN = re.compile(r"^layers\.(\d+)\.self_attn\.(qkv_proj|o_proj|to_q|to_k|to_v|to_out\.0)\.(.+)$")


# --------------------------------------------------------------------------- small file helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore the file from the checkpoint") from None


def _load_tensors(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def _save_tensors(sd: StateDict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


# --------------------------------------------------------------------------- model layouts
def detect_layout(path: str | Path) -> Layout:
    """"diffusers" (transformer/config.json, or a transformer folder itself) or "original"."""
    p = Path(path)
    hint = ("pass a local folder in diffusers layout (transformer/config.json + weights) or in the "
            "original OmniGen-v1 layout (config.json + model.safetensors)")
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {p} does not exist; {hint}")
    if (p / "transformer" / "config.json").is_file():
        return "diffusers"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p / 'config.json'} not found (nor {p / 'transformer' / 'config.json'}); {hint}")
    if _read_json(p / "config.json").get("_class_name") == "OmniGenTransformer2DModel":
        return "diffusers"
    if _first_existing(p, ORIGINAL_WEIGHTS) is None:
        raise FileNotFoundError(f"{p / ORIGINAL_WEIGHTS[0]} not found next to the original-layout "
                                f"config.json; {hint}")
    return "original"


def _rope_factors(cfg: dict[str, Any], head_dim: int) -> tuple[dict[str, list[float]], int]:
    """(rope_scaling for diffusers, original_max_position_embeddings) from a Phi3 config.

    OmniGen-v1 stores rope_scaling with type "su" (transformers >= 4.4x calls it "longrope", v5
    moves it to rope_parameters); diffusers reads only short_factor and long_factor.
    """
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("type", rope.get("rope_type", "longrope"))
    max_pos = cfg.get("max_position_embeddings", 4096)
    orig_max = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if "short_factor" not in rope or "long_factor" not in rope:
        if kind not in ("default", "longrope", "su"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported by OmniGen's RoPE; "
                             "use 'su'/'longrope' with short_factor and long_factor")
        # Plain RoPE: unit factors, and no long-context switch or attention scaling.
        return {"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)}, max_pos
    if kind not in ("su", "longrope"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported by OmniGen's RoPE; use 'su'/'longrope'")
    for name in ("short_factor", "long_factor"):
        if len(rope[name]) != head_dim // 2:
            raise ValueError(f"rope_scaling.{name} has {len(rope[name])} entries; head_dim {head_dim} "
                             f"needs {head_dim // 2}")
    factors = {"short_factor": [float(x) for x in rope["short_factor"]],
               "long_factor": [float(x) for x in rope["long_factor"]]}
    return factors, orig_max or 4096


def transformer_config_from_original(cfg: dict[str, Any]) -> dict[str, Any]:
    """OmniGenTransformer2DModel kwargs from an original (Phi3Config) config.json dict."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"original config.json lacks {missing}; it must be OmniGen-v1's Phi3Config")
    heads = cfg["num_attention_heads"]
    if (cfg.get("num_key_value_heads") or heads) != heads:
        raise ValueError(f"num_key_value_heads={cfg['num_key_value_heads']} != num_attention_heads={heads}: "
                         "diffusers' OmniGen attention has no grouped-query attention (OmniGen-v1 has 32/32)")
    head_dim = cfg["hidden_size"] // heads
    rope_scaling, orig_max = _rope_factors(cfg, head_dim)
    rope = cfg.get("rope_parameters") or {}
    vocab = cfg["vocab_size"]
    # pad_token_id must be passed: the diffusers default (32000) is out of range for small vocabs.
    pad = cfg.get("pad_token_id", PHI3_DEFAULT_PAD_TOKEN_ID)
    return {
        **ORIGINAL_FIXED,
        "hidden_size": cfg["hidden_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "intermediate_size": cfg["intermediate_size"],
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "vocab_size": vocab,
        "pad_token_id": pad if pad is not None and 0 <= pad < vocab else None,
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "original_max_position_embeddings": orig_max,
        "rope_base": cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "rope_scaling": rope_scaling,
    }


def qkv_sizes(config: dict[str, Any]) -> tuple[int, int, int]:
    """Row counts of q, k, v in a fused qkv_proj: [n_heads*head_dim, n_kv*head_dim, n_kv*head_dim]."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config["hidden_size"] // heads
    return heads * head_dim, kv * head_dim, kv * head_dim


def _rename_original_key(key: str) -> str | None:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("llm."):
        return key[len("llm."):]
    return None


def convert_original_state_dict(sd: StateDict, config: dict[str, Any]) -> StateDict:
    """Original OmniGen keys -> OmniGenTransformer2DModel keys (config: either config dict)."""
    sizes = qkv_sizes(config)
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):  # non-persistent in Phi3, recomputed every call
            continue
        new = _rename_original_key(key)
        if new is None:
            unknown.append(key)
            continue
        m = _ATTN.match(new)
        if m and m.group(2) == "qkv_proj":
            if value.shape[0] != sum(sizes):
                raise ValueError(f"{key} has {value.shape[0]} rows but the config's heads give "
                                 f"{sum(sizes)} (q, k, v = {sizes}); check num_(key_value_)heads")
            for name, part in zip(_QKV, value.split(list(sizes), dim=0)):
                out[f"layers.{m.group(1)}.self_attn.{name}.{m.group(3)}"] = part.clone()
        elif m and m.group(2) == "o_proj":
            out[f"layers.{m.group(1)}.self_attn.to_out.0.{m.group(3)}"] = value
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} keys of the original checkpoint have no diffusers "
                         f"counterpart, e.g. {unknown[:3]}; is this an OmniGen-v1 checkpoint?")
    return out


def convert_diffusers_state_dict(sd: StateDict) -> StateDict:
    """OmniGenTransformer2DModel keys -> original OmniGen keys (inverse of the above)."""
    out: StateDict = {}
    fused: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = _ATTN.match(key)
        if m and m.group(2) in _QKV:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m:  # to_out.0
            out[f"llm.layers.{m.group(1)}.self_attn.o_proj.{m.group(3)}"] = value
        else:
            out[_original_name(key)] = value
    for (layer, suffix), parts in fused.items():
        out[f"llm.layers.{layer}.self_attn.qkv_proj.{suffix}"] = torch.cat([parts[n] for n in _QKV], dim=0)
    return out


def _original_name(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return "llm." + key


def _empty_transformer(config: dict[str, Any]) -> nn.Module:
    """OmniGenTransformer2DModel with parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import OmniGenTransformer2DModel

    with init_empty_weights(include_buffers=False):
        return OmniGenTransformer2DModel(**config)


def _check_keys(model: nn.Module, sd: StateDict, source: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model built from its config.json "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
                         "the config and the weights come from different models")


def _read_original(path: Path) -> tuple[dict[str, Any], StateDict, Path]:
    """(diffusers config, converted state dict, weights file) of an original-layout folder."""
    if detect_layout(path) != "original":
        raise ValueError(f"{path} is already in diffusers layout; pass it to load_transformer")
    config = transformer_config_from_original(_read_json(path / "config.json"))
    weights = _first_existing(path, ORIGINAL_WEIGHTS)
    assert weights is not None  # detect_layout checked it
    sd = convert_original_state_dict(_load_tensors(weights), config)
    return config, sd, weights


def load_original_transformer(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """OmniGenTransformer2DModel from an original OmniGen-v1 folder (dtype None: as stored)."""
    config, sd, weights = _read_original(Path(path))
    model = _empty_transformer(config)
    # pos_embed is a fixed sin-cos table; keep the computed one if a checkpoint omits it
    sd.setdefault("patch_embedding.pos_embed", model.patch_embedding.pos_embed)
    _check_keys(model, sd, weights)
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _stored_dtype(folder: Path) -> torch.dtype | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        names = [f.get_slice(k).get_dtype() for k in f.keys()]
    floats = [_SAFETENSORS_DTYPES[n] for n in names if n in _SAFETENSORS_DTYPES]
    return max(set(floats), key=floats.count) if floats else None


def _transformer_dir(path: Path) -> Path:
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def load_transformer(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """OmniGenTransformer2DModel from either layout; dtype None keeps the stored dtype."""
    p = Path(path)
    if detect_layout(p) == "original":
        return load_original_transformer(p, dtype)
    from diffusers import OmniGenTransformer2DModel

    folder = _transformer_dir(p)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder / TRANSFORMER_WEIGHTS} not found; the diffusers-layout "
                                "transformer folder needs its weights next to config.json")
    model = OmniGenTransformer2DModel.from_pretrained(
        str(folder), torch_dtype=dtype or _stored_dtype(folder), local_files_only=True)
    return model.eval()
