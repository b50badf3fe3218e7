"""Weight interop: OmniGen-v1 layouts, official DiTFuse LoRA adapters, merging (the library of
`ditfuse convert`, whose command line is ditfuse/commands/convert.py).

Two model layouts hold the same network (docs/DESIGN.md "Model", "Interop facts"):
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

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ditfuse.interop.weights import (
    TensorInfo,
    check_host_ram,
    human,
    load_bytes,
    load_mmap,
    read_header,
)

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

# original prefix -> diffusers prefix (docs/DESIGN.md "Model"); `llm.` keys lose the prefix and the
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


def _original_weight_files(folder: Path) -> list[Path]:
    """model.safetensors, its shards (model-0000k-of-0000n.safetensors), or model.pt."""
    single = _first_existing(folder, ORIGINAL_WEIGHTS[:1])
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    pt = _first_existing(folder, ORIGINAL_WEIGHTS[1:])
    return [single] if single else shards or ([pt] if pt else [])


# --------------------------------------------------------------------------- model layouts
def detect_layout(path: str | Path) -> Layout:
    """"diffusers" (transformer/config.json, or a transformer folder itself) or "original"."""
    p = Path(path)
    hint = ("pass a local folder in diffusers layout (transformer/config.json + weights) or in the "
            "original OmniGen-v1 layout (config.json + model.safetensors)")
    if not p.is_dir():
        state = "is not a folder" if p.exists() else "does not exist"
        raise FileNotFoundError(f"model folder {p} {state}; {hint}")
    if (p / "transformer" / "config.json").is_file():
        return "diffusers"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p / 'config.json'} not found (nor {p / 'transformer' / 'config.json'}); {hint}")
    if _read_json(p / "config.json").get("_class_name") == "OmniGenTransformer2DModel":
        return "diffusers"
    if not _original_weight_files(p):
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
            # row blocks of a row-major tensor are contiguous views: no copy of the frozen base
            # (a clone here held 1.8 GB more of OmniGen-v1 per process, and unshared)
            for name, part in zip(_QKV, value.split(list(sizes), dim=0)):
                out[f"layers.{m.group(1)}.self_attn.{name}.{m.group(3)}"] = part
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


def _empty_transformer(config: dict[str, Any], buffers: bool = False) -> nn.Module:
    """OmniGenTransformer2DModel with parameters (and buffers if asked) on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import OmniGenTransformer2DModel

    with init_empty_weights(include_buffers=buffers):
        return OmniGenTransformer2DModel(**config)


def _check_keys(model: nn.Module, sd: StateDict, source: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model built from its config.json "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                         f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
                         "the config and the weights come from different models")


def expected_original_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    """Original OmniGen key -> shape for a diffusers transformer config (meta device: no memory)."""
    meta = _empty_transformer(config, buffers=True).state_dict()
    return {k: v.shape for k, v in convert_diffusers_state_dict(meta).items()}


def check_original_weights(path: Path, dtype: torch.dtype | None = None
                           ) -> tuple[dict[str, Any], list[tuple[Path, dict[str, TensorInfo] | None]]]:
    """(diffusers config, [(weights file, header or None for model.pt)]) of an original-layout
    folder, checked before anything is allocated: config.json is a Phi-3 config, every
    .safetensors file is whole, its tensors are the ones the config's model has (names and
    shapes), and the load fits in host RAM. Each failure is one line naming the file."""
    if detect_layout(path) != "original":
        raise ValueError(f"{path} is already in diffusers layout; pass it to load_transformer")
    raw_cfg = _read_json(path / "config.json")
    if raw_cfg.get("model_type", "phi3") != "phi3":
        raise ValueError(f"{path / 'config.json'} has model_type {raw_cfg['model_type']!r}; OmniGen-v1's is "
                         "'phi3' (a Phi-3 config): pass the OmniGen-v1 folder")
    config = transformer_config_from_original(raw_cfg)
    _check_shard_set(path)
    files = [(f, read_header(f) if f.suffix == ".safetensors" else None) for f in _original_weight_files(path)]
    headers = {k: (f, i) for f, infos in files if infos is not None for k, i in infos.items()}
    if len(headers) and len(files) == sum(i is not None for _, i in files):
        _check_original_shapes(path, config, headers)
    mapped = copied = 0
    for f, infos in files:
        m, c = load_bytes(infos, dtype) if infos is not None else (f.stat().st_size, 0)
        mapped, copied = mapped + m, copied + c
    # mapped pages are page cache, shared by every process of the node that maps the file: one
    # rank's figure is the node's (a conversion's copies are per process)
    check_host_ram(f"loading {path} ({human(mapped)} mapped from disk"
                   + (f" + {human(copied)} converted to {dtype})" if copied else ")"),
                   mapped + copied, "store the weights in the dtype you load them in (model.base_dtype)")
    return config, files


def _check_shard_set(path: Path) -> None:
    """model-0000k-of-0000n.safetensors: all n shards present (a partial download names the first gap)."""
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    names = {f.name for f in shards}
    for f in shards[:1]:
        m = re.match(r"model-(\d+)-of-(\d+)\.safetensors$", f.name)
        if m is None:
            continue
        width, total = len(m[1]), int(m[2])
        for k in range(1, total + 1):
            name = f"model-{k:0{width}d}-of-{m[2]}.safetensors"
            if name not in names:
                raise FileNotFoundError(f"{path / name} is missing ({len(names)} of {total} weight shards present); "
                                        "copy or download the missing shard")


def _check_original_shapes(path: Path, config: dict[str, Any], headers: dict[str, tuple[Path, TensorInfo]]) -> None:
    expected = expected_original_shapes(config)
    optional = {"pos_embed"}  # a fixed sin-cos table, recomputed when absent
    missing = sorted(set(expected) - set(headers) - optional)
    extra = sorted(k for k in set(headers) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    shape = f"config.json: {config['num_layers']} layers, hidden_size {config['hidden_size']}"
    if missing or extra:
        names = missing or extra
        raise ValueError(f"{path}: the weights {'lack' if missing else 'have unexpected'} {len(names)} tensors "
                         f"of the model its {shape} describes (e.g. {names[:2]}); the config and the "
                         "weights come from different models")
    for key, want in expected.items():
        if key in headers and tuple(headers[key][1].shape) != tuple(want):
            f, info = headers[key]
            raise ValueError(f"{f}: tensor {key!r} has shape {list(info.shape)} but {shape} expects "
                             f"{list(want)}; the config and the weights come from different models")


def check_pretrained(path: str | Path, dtype: torch.dtype | None = None) -> None:
    """The checks a load makes before allocating, for a folder of either layout (the CLI runs it
    before building anything): original layout in full, diffusers layout: whole weight files."""
    p = Path(path)
    if detect_layout(p) == "original":
        check_original_weights(p, dtype)
        return
    for f in sorted(_transformer_dir(p).glob("*.safetensors")):
        read_header(f)


def _read_original(path: Path, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], StateDict, Path]:
    """(diffusers config, converted state dict, weights file) of an original-layout folder; the
    safetensors tensors are views of a shared mmap (ditfuse.interop.weights), nothing is copied."""
    config, files = check_original_weights(path, dtype)
    raw: StateDict = {}
    for f, infos in files:
        raw.update(load_mmap(f, infos) if infos is not None else _load_tensors(f))
    return config, convert_original_state_dict(raw, config), files[0][0]


def load_original_transformer(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """OmniGenTransformer2DModel from an original OmniGen-v1 folder (dtype None: as stored).

    Zero copy when the stored dtype is the one asked for: the parameters are views of the
    file's mmap (load_state_dict(assign=True) keeps the tensors it is given), so ranks on one node
    share one copy in the page cache."""
    config, sd, weights = _read_original(Path(path), dtype)
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
        names = [f.get_slice(k).get_dtype() for k in f.keys()]  # noqa: SIM118 - safe_open is no dict
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


# --------------------------------------------------------------------------- LoRA adapters
_ADAPTER = "default"  # peft's adapter name; saved files drop it, raw state dicts keep it
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
_PREFIXES = ("base_model.model.", "model.", "llm.")  # PeftModel wrapper, OmniGen.llm
_OFFICIAL_TO_OURS = {"self_attn.o_proj": "self_attn.to_out.0", "mlp.gate_up_proj": "mlp.gate_up_proj",
                     "mlp.down_proj": "mlp.down_proj"}  # Phi3 and OmniGenBlock share the MLP names
_OURS_TO_OFFICIAL = {v: k for k, v in _OFFICIAL_TO_OURS.items()}
_LAYER_MODULE = re.compile(r"^layers\.(\d+)\.(.+)$")


def _split_key(key: str) -> tuple[str, str]:
    """(module path without wrapper prefixes, "A" | "B") of a LoRA weight key."""
    m = _LORA_KEY.match(key)
    if m is None:
        raise ValueError(f"adapter key {key!r} is not a LoRA A/B weight; only plain LoRA adapters "
                         "(no bias, DoRA or modules_to_save) can be converted")
    module = m["module"]
    for prefix in _PREFIXES:
        module = module.removeprefix(prefix)
    return module, m["ab"]


def _group(sd: StateDict) -> dict[str, dict[str, Tensor]]:
    """{module path: {"A": lora_A, "B": lora_B}} with wrapper prefixes and adapter names removed."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        module, ab = _split_key(key)
        modules.setdefault(module, {})[ab] = value
    broken = [m for m, ab in modules.items() if set(ab) != {"A", "B"}]
    if broken:
        raise ValueError(f"adapter modules {broken[:3]} lack lora_A or lora_B; the adapter file is incomplete")
    return modules


def _ungroup(modules: dict[str, dict[str, Tensor]], prefix: str = "") -> StateDict:
    return {f"{prefix}{m}.lora_{ab}.weight": t for m, abs_ in modules.items() for ab, t in abs_.items()}


def _keys_format(keys: list[str]) -> AdapterFormat:
    leaves = {_split_key(k)[0] for k in keys}
    if any(m.endswith((".qkv_proj", ".o_proj")) for m in leaves) or any(".llm." in f".{k}" for k in keys):
        return "official"
    return "ditfuse"


def _adapter_files(folder: str | Path) -> tuple[Path, Path]:
    p = Path(folder)
    hint = f"pass a peft adapter folder holding {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}"
    if not p.is_dir():
        raise FileNotFoundError(f"adapter folder {p} does not exist; {hint}")
    if not (p / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{p / ADAPTER_CONFIG} not found; {hint}")
    weights = _first_existing(p, ADAPTER_WEIGHTS)
    if weights is None:
        raise FileNotFoundError(f"{p / ADAPTER_WEIGHTS[0]} not found; {hint}")
    return p / ADAPTER_CONFIG, weights


def detect_adapter_format(folder: str | Path) -> AdapterFormat:
    """"official" (fused qkv_proj/o_proj on OmniGen's llm) or "ditfuse" (to_q/to_k/to_v/to_out.0)."""
    _, weights = _adapter_files(folder)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return _keys_format(list(f.keys()))
    return _keys_format(list(_load_tensors(weights)))


def _check_plain_lora(config: dict[str, Any], *, patterns_ok: bool) -> None:
    for key in ("use_dora", "lora_bias", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"adapter_config.json sets {key}={config[key]!r}; only plain LoRA converts")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json sets bias={config['bias']!r}; only bias='none' converts")
    if not patterns_ok and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ValueError("the official adapter sets rank_pattern/alpha_pattern; per-module ranks are not "
                         "supported on import (export a single r and lora_alpha)")


def lora_scale(config: dict[str, Any], module: str | None = None) -> float:
    """lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module when patterns are set."""
    from peft.utils.other import get_pattern_key

    r, alpha = config["r"], config["lora_alpha"]
    if module is not None:
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        r = ranks.get(get_pattern_key(list(ranks), module), r)
        alpha = alphas.get(get_pattern_key(list(alphas), module), alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _adapter_config(config: dict[str, Any], targets: set[str], **changes: Any) -> dict[str, Any]:
    """Copy of a peft adapter config with new targets, JSON-ready, no base model reference; keys
    peft's LoraConfig does not know (e.g. this framework's "ditfuse" block) are dropped."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    out = {k: _jsonable(v) for k, v in config.items() if k in fields}
    out.update({"peft_type": "LORA", "target_modules": sorted(targets), "base_model_name_or_path": None,
                "rank_pattern": {}, "alpha_pattern": {}, **changes})
    out.setdefault("lora_alpha", out.get("r"))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", value)  # enums (PeftType, TaskType)


def _leaf(module: str) -> str:
    """Target name peft matches for a module path (`to_out.0` keeps its index)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def convert_official_lora(state_dict: StateDict, config: dict[str, Any],
                          model_config: dict[str, Any] | None = None) -> tuple[StateDict, dict[str, Any]]:
    """Official fused-qkv adapter -> this framework's (A copied to to_q/k/v, B split by rows).

    `config` is the official adapter_config.json; `model_config` (the transformer's) gives the
    q/k/v row split; without it the split is in thirds, which holds for every model diffusers'
    OmniGen attention can run (num_key_value_heads == num_attention_heads).
    """
    _check_plain_lora(config, patterns_ok=False)
    out: dict[str, dict[str, Tensor]] = {}
    for module, ab in _group(state_dict).items():
        m = _LAYER_MODULE.match(module)
        if m and m[2] == "self_attn.qkv_proj":
            out.update(_split_qkv_lora(f"layers.{m[1]}.self_attn", ab, model_config))
        elif m and m[2] in _OFFICIAL_TO_OURS:
            out[f"layers.{m[1]}.{_OFFICIAL_TO_OURS[m[2]]}"] = dict(ab)
        else:
            raise ValueError(f"official adapter module {module!r} has no counterpart in "
                             "OmniGenTransformer2DModel (expected llm.layers.N.self_attn.qkv_proj/o_proj)")
    out, rank = _compact(out)
    r = config["r"]
    alpha = config["lora_alpha"] * (math.sqrt(rank / r) if config.get("use_rslora") else rank / r)
    return _ungroup(out), _adapter_config(config, {_leaf(m) for m in out}, r=rank, lora_alpha=_tidy(alpha))


def _tidy(alpha: float) -> float | int:
    return round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _compact(modules: dict[str, dict[str, Tensor]]) -> tuple[dict[str, dict[str, Tensor]], int]:
    """Drop rank columns whose B column is zero (exact: they add nothing) when every module keeps
    the same rank; this undoes export_official_lora's block-diagonal and zero padding."""
    rank = next(iter(modules.values()))["A"].shape[0]
    keep = {m: (ab["B"] != 0).any(dim=0).nonzero().flatten() for m, ab in modules.items()}
    ranks = {len(k) for k in keep.values() if len(k)}
    if len(ranks) != 1 or ranks == {rank}:
        return modules, rank
    return {m: {"A": ab["A"][keep[m]].clone(), "B": ab["B"][:, keep[m]].clone()}
            for m, ab in modules.items() if len(keep[m])}, ranks.pop()


def _split_qkv_lora(prefix: str, ab: dict[str, Tensor], model_config: dict[str, Any] | None
                    ) -> dict[str, dict[str, Tensor]]:
    rows = ab["B"].shape[0]
    sizes = qkv_sizes(model_config) if model_config else (rows // 3,) * 3
    if sum(sizes) != rows:
        raise ValueError(f"{prefix}.qkv_proj lora_B has {rows} rows, the model's q/k/v need {sizes}; "
                         "the adapter was trained on another model")
    parts = ab["B"].split(list(sizes), dim=0)
    return {f"{prefix}.{name}": {"A": ab["A"].clone(), "B": b.clone()} for name, b in zip(_QKV, parts)}


def export_official_lora(state_dict: StateDict, config: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """This framework's adapter -> official fused-qkv format, exactly.

    to_q/to_k/to_v with one shared A fuse into rank r (B stacked by rows); otherwise the A are
    stacked (rank 3r) under a block-diagonal B. Every module is zero-padded to the largest rank
    R and lora_alpha is scaled by R/r, so alpha/R (or alpha/sqrt(R)) equals the old scale; with
    per-module patterns each B absorbs its own scale ratio instead.
    """
    _check_plain_lora(config, patterns_ok=True)
    modules = _group(state_dict)
    scales = {m: lora_scale(config, m) for m in modules}
    base = lora_scale(config)
    fused: dict[str, tuple[Tensor, Tensor]] = {}
    for prefix, parts in _qkv_groups(modules).items():
        fused[f"llm.{prefix}.qkv_proj"] = _fuse_qkv(parts, {n: scales[f"{prefix}.{n}"] / base for n in parts})
    for module, ab in modules.items():
        m = _LAYER_MODULE.match(module)
        if m and m[2].startswith("self_attn.to_") and m[2] != "self_attn.to_out.0":
            continue  # fused above
        if not m or m[2] not in _OURS_TO_OFFICIAL:
            raise ValueError(f"adapter module {module!r} has no counterpart in OmniGen's llm (targets "
                             "to_q/to_k/to_v/to_out.0/gate_up_proj/down_proj export)")
        fused[f"llm.layers.{m[1]}.{_OURS_TO_OFFICIAL[m[2]]}"] = (ab["A"], ab["B"] * (scales[module] / base))
    return _pad_to_common_rank(fused, config)


def _qkv_groups(modules: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, dict[str, Tensor]]]:
    """{"layers.N.self_attn" : {"to_q": {"A", "B"}, ...}} for every layer with q/k/v adapters."""
    groups: dict[str, dict[str, dict[str, Tensor]]] = {}
    for module, ab in modules.items():
        m = _LAYER_MODULE.match(module)
        name = m[2].removeprefix("self_attn.") if m else ""
        if name in _QKV:
            groups.setdefault(f"layers.{m[1]}.self_attn", {})[name] = ab
    return groups


def _fuse_qkv(parts: dict[str, dict[str, Tensor]], ratio: dict[str, float]) -> tuple[Tensor, Tensor]:
    """(A, B) of one fused qkv_proj; a missing q/k/v contributes zero rows of B."""
    rows = next(iter(parts.values()))["B"].shape[0]  # q, k and v have equal rows (no GQA)
    a_list = [parts[n]["A"] for n in _QKV if n in parts]  # q, k, v order, as B's blocks below
    ref = parts[next(iter(parts))]["B"]
    if all(torch.equal(a, a_list[0]) for a in a_list):
        blocks = [parts[n]["B"] * ratio[n] if n in parts else ref.new_zeros(rows, ref.shape[1]) for n in _QKV]
        return a_list[0], torch.cat(blocks, dim=0)
    a = torch.cat(a_list, dim=0)
    b = ref.new_zeros(3 * rows, a.shape[0])
    col = 0
    for i, name in enumerate(_QKV):
        if name in parts:
            rank = parts[name]["A"].shape[0]
            b[i * rows:(i + 1) * rows, col:col + rank] = parts[name]["B"] * ratio[name]
            col += rank
    return a, b


def _pad_to_common_rank(fused: dict[str, tuple[Tensor, Tensor]], config: dict[str, Any]
                        ) -> tuple[StateDict, dict[str, Any]]:
    rank = max(a.shape[0] for a, _ in fused.values())
    out: StateDict = {}
    for module, (a, b) in fused.items():
        pad = rank - a.shape[0]
        out[f"base_model.model.{module}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        out[f"base_model.model.{module}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    # keep the scale: alpha'/R == alpha/r (rslora: alpha'/sqrt(R) == alpha/sqrt(r))
    ratio = rank / config["r"]
    alpha = config["lora_alpha"] * (math.sqrt(ratio) if config.get("use_rslora") else ratio)
    targets = {m.rsplit(".", 1)[-1] for m in fused}
    return out, _adapter_config(config, targets, r=rank, lora_alpha=_tidy(alpha))


def _normalize_ours(state_dict: StateDict) -> StateDict:
    return _ungroup(_group(state_dict))


def check_adapter(folder: str | Path, model_config: dict[str, Any] | None = None) -> None:
    """An adapter's weights against its adapter_config.json (each module's rank is the r, or the
    rank_pattern entry, the config gives) and, with `model_config`, against the model's width;
    from the safetensors header alone, so `ditfuse fuse --lora` fails before the model is built."""
    config_path, weights = _adapter_files(folder)
    if weights.suffix != ".safetensors":
        return  # adapter_model.bin: checked when loaded
    config = _read_json(config_path)
    ranks = config.get("rank_pattern") or {}
    from peft.utils.other import get_pattern_key

    for key, info in read_header(weights).items():
        module, ab = _split_key(key)
        rank = info.shape[0] if ab == "A" else info.shape[-1]
        want = ranks.get(get_pattern_key(list(ranks), module), config.get("r")) if ranks else config.get("r")
        if want is not None and rank != want:
            raise ValueError(f"{weights}: lora_{ab} of {module!r} has rank {rank} but {config_path.name} says "
                             f"r={want}; the config and the weights come from different adapters")
        hidden = (model_config or {}).get("hidden_size")
        if hidden and ab == "A" and module.endswith(("qkv_proj", "o_proj", "to_q", "to_k", "to_v", "to_out.0")) \
                and info.shape[-1] != hidden:
            raise ValueError(f"{weights}: lora_A of {module!r} reads {info.shape[-1]} features but the model's "
                             f"hidden_size is {hidden}; the adapter was trained on another model")


def load_adapter_state(folder: str | Path, model_config: dict[str, Any] | None = None
                       ) -> tuple[StateDict, dict[str, Any]]:
    """(state dict in this framework's naming, adapter config) from an adapter of either format."""
    config_path, weights = _adapter_files(folder)
    check_adapter(folder, model_config)
    config = _read_json(config_path)
    sd = _load_tensors(weights)
    if _keys_format(list(sd)) == "official":
        return convert_official_lora(sd, config, model_config)
    _check_plain_lora(config, patterns_ok=True)
    sd = _normalize_ours(sd)
    return sd, _adapter_config(config, {_leaf(m) for m in _group(sd)},
                               rank_pattern=config.get("rank_pattern") or {},
                               alpha_pattern=config.get("alpha_pattern") or {})


def save_adapter(folder: str | Path, state_dict: StateDict, config: dict[str, Any]) -> None:
    """peft adapter folder: adapter_config.json + adapter_model.safetensors, keys prefixed
    `base_model.model.` as PeftModel.save_pretrained (and ditfuse.model.lora.save_adapter) write them."""
    p = Path(folder)
    p.mkdir(parents=True, exist_ok=True)
    (p / ADAPTER_CONFIG).write_text(json.dumps({k: _jsonable(v) for k, v in config.items()}, indent=2))
    prefix = "base_model.model."
    _save_tensors({k if k.startswith(prefix) else prefix + k: v for k, v in state_dict.items()},
                  p / ADAPTER_WEIGHTS[0])


def lora_config_from_dict(config: dict[str, Any]):
    """peft.LoraConfig from an adapter_config.json dict (unknown keys of other peft versions dropped)."""
    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
    return LoraConfig(**{k: v for k, v in config.items() if k in fields})


def inject_lora(transformer: nn.Module, state_dict: StateDict, config: dict[str, Any]) -> nn.Module:
    """Add the adapter (either format) to the transformer through peft, unmerged; returns it."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if _keys_format(list(state_dict)) == "official":
        state_dict, config = convert_official_lora(state_dict, config, dict(transformer.config))
    state_dict = _normalize_ours(state_dict)
    inject_adapter_in_model(lora_config_from_dict(config), transformer, adapter_name=_ADAPTER)
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=_ADAPTER)
    unloaded = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or unloaded:
        raise ValueError(f"adapter does not fit the transformer (unexpected {result.unexpected_keys[:3]}, "
                         f"not loaded {unloaded[:3]}); it was trained on another model or config")
    return transformer


def merge_lora(transformer: nn.Module, state_dict: StateDict, config: dict[str, Any]) -> nn.Module:
    """Merge W <- W + scale * B @ A into the transformer (peft's own merge) and drop the adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_lora(transformer, state_dict, config)
    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, module.get_base_layer())
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config
    return transformer


def _model_config(path: Path) -> dict[str, Any]:
    """Transformer config dict of a model folder of either layout, without loading weights."""
    if detect_layout(path) == "original":
        return transformer_config_from_original(_read_json(path / "config.json"))
    return _read_json(_transformer_dir(path) / "config.json")
