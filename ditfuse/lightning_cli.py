"""`ditfuse fit|validate|test|predict`: LightningCLI over DiTFuseModule + DiTFuseDataModule.

- Configs compose the LightningCLI way: `--config a.yaml --config b.yaml`, dotted overrides
  (`--model.pretrained=/path`, `--data.ratios.m3=0.8`), `--print_config`.
- The data-mix ratios are `data.ratios` in every shipped config (what `ditfuse sweep` grids over).
- Settings are checked before anything expensive: model paths exist and have a known layout,
  LoRA / optimizer / flow / sampler settings are valid, and the DataModule's own checks run,
  all before the backbone is built or a shard is read.
- The saved config overwrites its previous copy, so a rerun or a SLURM requeue into the same
  log dir does not fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


def _as_dict(ns: Any) -> Any:
    if hasattr(ns, "as_dict"):
        return ns.as_dict()
    return ns


def check_model_config(model: dict[str, Any]) -> None:
    """Fail fast (before building anything) on model settings that cannot work."""
    from ditfuse.backbone import detect_layout
    from ditfuse.config import ModelConfig
    from ditfuse.lora import LoraSettings
    from ditfuse.module import FlowSettings, OptimizerSettings
    from ditfuse.sampler import SamplerSettings

    ModelConfig.from_name(model.get("preset", "tiny"), **(model.get("model_overrides") or {}))
    if model.get("pretrained"):
        detect_layout(model["pretrained"])  # raises a FileNotFoundError naming the path
    for key in ("vae_path", "tokenizer"):
        value = model.get(key)
        if value and value != "builtin" and not Path(value).exists():
            raise FileNotFoundError(f"model.{key}={value} does not exist (local paths only; nothing is downloaded)")
    for key, cls in (("lora", LoraSettings), ("optimizer", OptimizerSettings), ("flow", FlowSettings),
                     ("val_sampler", SamplerSettings)):
        value = model.get(key)
        if isinstance(value, dict):
            cls(**value)


class DiTFuseCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        check_model_config(_as_dict(cfg.get("model")) or {})
        data = _as_dict(cfg.get("data"))
        if isinstance(data, dict):
            # DataModule __init__ only checks settings (no I/O): run it once now, before the
            # backbone (GBs for omnigen-v1) is built, so a bad data setting fails in seconds
            self.datamodule_class(**data)


def datamodule_for(subcommand: str | None):
    """`predict` reads folders of pairs (datamodules.pairs.PairsDataModule, configs/predict.yaml);
    fit/validate/test read shards (datamodules.DiTFuseDataModule)."""
    if subcommand == "predict":
        from datamodules.pairs import PairsDataModule

        return PairsDataModule
    from datamodules import DiTFuseDataModule

    return DiTFuseDataModule


def run_lightning_cli(args: list[str]) -> DiTFuseCLI:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download implicitly
    from ditfuse.module import DiTFuseModule

    args = list(args)
    # `ditfuse fit ...` passes sys.argv[1:] explicitly; LightningCLI warns when both are set
    cli_args = None if args == sys.argv[1:] else args
    subcommand = args[0] if args else None
    # fit/validate/test save the resolved config next to the logs (overwritten on a requeue);
    # predict has no log folder, and a config.yaml dropped into the working directory helps nobody
    save_config = {} if subcommand == "predict" else {"save_config_kwargs": {"overwrite": True}}
    return DiTFuseCLI(
        DiTFuseModule,
        datamodule_for(subcommand),
        args=cli_args,
        seed_everything_default=0,
        save_config_callback=None if subcommand == "predict" else SaveConfigCallback,
        **save_config,
        parser_kwargs={"default_env": False},
    )
