"""Each shipped cluster recipe fits an 80 GB A100 with 10% headroom at its largest bucket and
per-GPU batch, by the fake-tensor trace of ditfuse/model/memory_budget.py at full OmniGen-v1 depth
(benchmarks/memory_budget.py prints the table and validates the trace against a measured step)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ditfuse.model.memory_budget import GB, estimate, recipe_from_configs

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "omnigen_lora.yaml"
A100_GB, HEADROOM = 80, 0.9


def _omnigen_v1_params() -> tuple[int, int]:
    """(parameters, buffer elements) of OmniGenTransformer2DModel at omnigen-v1, on the meta device."""
    import torch

    from ditfuse.model.backbone import build_transformer
    from ditfuse.model.config import ModelConfig

    with torch.device("meta"):
        m = build_transformer(ModelConfig.from_name("omnigen-v1"), seed=None)
    return sum(p.numel() for p in m.parameters()), sum(b.numel() for b in m.buffers())


@pytest.mark.parametrize("overlay", ["ddp_a100.yaml", "fsdp_a100.yaml"])
def test_shipped_recipe_fits_an_80gb_a100_with_headroom(overlay):
    recipe = recipe_from_configs(overlay, BASE, ROOT / "configs" / "cluster" / overlay)
    assert recipe.bucket == (1024, 1024) and recipe.checkpointing and recipe.world == 16
    e = estimate(recipe)
    params, buffers = _omnigen_v1_params()  # 3.76B; buffers: the fp32 pos_embed table, RoPE factors
    if recipe.lora_r is not None:  # DDP + LoRA: the whole bf16 base on every GPU, frozen (buffers here)
        assert e["buffer"] == pytest.approx(2 * (params + buffers), rel=0.01)  # pos_embed follows, as .to() does
        assert e["param"] < 0.1 * GB and e["optstate"] == pytest.approx(2 * e["param"], rel=0.01)
    else:  # FSDP full fine-tune: fp32 weights and AdamW's two moments sharded over 16 GPUs
        assert e["param"] == pytest.approx(4 * params / 16, rel=0.01)
        assert e["optstate"] == pytest.approx(2 * e["param"], rel=0.01)
    assert e["act"] > 1 * GB  # checkpointed block inputs of 32 layers at ~12k tokens per sample
    assert e["total"] <= HEADROOM * A100_GB * GB, (
        f"{overlay}: {e['total'] / GB:.1f} GB per GPU at batch {recipe.batch_size} > {HEADROOM:.0%} of "
        f"{A100_GB} GB; lower data.batch_size (raise accumulate_grad_batches) in configs/cluster/{overlay}")


def test_trace_counts_the_adamw_step_temporaries_of_a_full_fine_tune():
    """MemTracker files what opt.step() allocates as optimizer state; beyond the resident state it
    is AdamW's temporaries (sqrt(exp_avg_sq) and its quotient of the largest parameter, the fp32
    token embedding), alive with every gradient: the measured peak of a full fine-tune's step
    (benchmarks/memory_budget.py validates it; dropping them missed 0.79 GB)."""
    from ditfuse.model.memory_budget import Recipe, trace_step

    recipe = Recipe(name="full", batch_size=1, bucket=(256, 256), lora_r=None, base_dtype=None)
    peak = trace_step(recipe, 1)
    embedding = 4 * 32064 * 3072  # fp32 embed_tokens of omnigen-v1
    assert peak["optstate"] == pytest.approx(2 * peak["param"], rel=1e-3)  # resident moments only
    assert peak["grad"] == peak["param"]
    assert peak["temp"] >= 2 * embedding and peak["act"] < 0.01 * GB  # the optimizer step, not the forward
