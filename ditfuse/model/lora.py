"""LoRA on the backbone's attention projections (peft), saved and loaded as trainable tensors only.

Defaults follow DiTFuse: rank 8, alpha 8, targets to_q/to_k/to_v/to_out.0 (the diffusers names of
OmniGen's fused qkv_proj / o_proj). peft initialises B to zero, so an adapted model equals its
base at init. The scale is lora_alpha / r everywhere.

Adapter folder format (peft's): `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_{A,B}.weight`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"
_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    r: int = 8  # DiTFuse
    alpha: float = 8.0  # DiTFuse: scale alpha / r = 1
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one module (e.g. to_q)")
        self.targets = list(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def peft_config(self):
        from peft import LoraConfig

        # target_modules matched as name suffixes; "to_out.0" must match "...self_attn.to_out.0"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.targets,
                          init_lora_weights=True, bias="none")


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers in place and freeze everything else. Returns `model`."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora.targets {settings.targets} matched no module of the backbone ({err})") from err
    n = 0
    for name, p in model.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype in (torch.bfloat16, torch.float16):
            # peft casts a new adapter to its base layer's dtype; trained in bf16, AdamW's small
            # updates round away. fp32, as get_peft_model(autocast_adapter_dtype=True) keeps it
            p.data = p.data.float()
        n += is_lora
    if n == 0:
        raise ValueError(f"lora.targets {settings.targets} matched no module of the backbone")
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in n for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter weights with peft's adapter-free keys (`layers.0.self_attn.to_q.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    from peft import set_peft_model_state_dict

    state = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter has keys the model does not: {unexpected[:4]} ...")


def save_adapter(model: nn.Module, folder: str | Path, settings: LoraSettings) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    cfg = settings.peft_config().to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["ditfuse"] = asdict(settings)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return folder


def read_adapter(folder: str | Path) -> tuple[LoraSettings, dict[str, Tensor]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder (needs adapter_config.json and "
                                "adapter_model.safetensors)")
    cfg = json.loads(cfg_file.read_text())
    targets = cfg.get("target_modules") or list(DEFAULT_TARGETS)
    settings = LoraSettings(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                            dropout=float(cfg.get("lora_dropout", 0.0)),
                            targets=[targets] if isinstance(targets, str) else list(targets))
    return settings, load_file(str(weights))


def load_adapter(model: nn.Module, folder: str | Path) -> LoraSettings:
    """Inject (if needed) and load an adapter saved by `save_adapter`."""
    settings, state = read_adapter(folder)
    if not has_lora(model):
        add_lora(model, settings)
    load_lora_state_dict(model, state)
    return settings


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (W + scale * B @ A) and drop the adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Only the parameters that train (what a LoRA checkpoint keeps)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


__all__ = ["LoraSettings", "add_lora", "has_lora", "lora_state_dict", "load_lora_state_dict", "save_adapter",
           "read_adapter", "load_adapter", "merge_and_unload", "trainable_state_dict", "count_parameters",
           "DEFAULT_TARGETS"]
