"""The cluster recipes parse into the strategies they promise (what LightningCLI builds from them),
and the module refuses strategy/model settings that cannot work together, before any step."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from diffusers.models.transformers.transformer_omnigen import OmniGenBlock
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from ditfuse.module import DiTFuseModule

CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "cluster"


def _recipe(name: str) -> tuple[dict, Strategy]:
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(Strategy, "strategy")  # as LightningCLI types trainer.strategy
    strategy = parser.instantiate(parser.parse_object({"strategy": cfg["trainer"]["strategy"]})).strategy
    return cfg, strategy


def _blocks_match(policy) -> bool:
    return policy._module_classes == {OmniGenBlock}


def test_fsdp_recipe_shards_per_block_checkpoints_per_block_and_saves_sharded():
    cfg, strategy = _recipe("fsdp_a100.yaml")
    assert isinstance(strategy, FSDPStrategy)
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert _blocks_match(strategy.kwargs["auto_wrap_policy"]), "one FSDP unit per OmniGenBlock"
    assert strategy.kwargs["use_orig_params"] is True  # LoRA: frozen and trainable tensors share units
    assert _blocks_match(strategy._activation_checkpointing_kwargs["auto_wrap_policy"])
    assert strategy._state_dict_type == "sharded"
    assert cfg["model"]["gradient_checkpointing"] is False and cfg["model"]["base_dtype"] is None


def test_ddp_recipe():
    cfg, strategy = _recipe("ddp_a100.yaml")
    assert isinstance(strategy, DDPStrategy)
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["gradient_checkpointing"] is True  # DDP has no policy: the model's own


def _setup(model: DiTFuseModule, strategy: Strategy) -> None:
    model._trainer = SimpleNamespace(strategy=strategy)
    model.setup("fit")


def test_double_checkpointing_and_mixed_dtype_units_fail_at_setup():
    policy = {OmniGenBlock}
    _setup(DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1}),
           FSDPStrategy(auto_wrap_policy=policy, activation_checkpointing_policy=policy))
    with pytest.raises(ValueError, match="model.gradient_checkpointing=false"):
        _setup(DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1}, gradient_checkpointing=True),
               FSDPStrategy(activation_checkpointing_policy=policy))
    lora = {"r": 2, "alpha": 2.0, "targets": ["to_q"]}
    with pytest.raises(ValueError, match="model.base_dtype=null"):
        _setup(DiTFuseModule(preset="tiny", model_overrides={"num_layers": 1}, lora=lora, base_dtype="bf16"),
               FSDPStrategy(auto_wrap_policy=policy))
