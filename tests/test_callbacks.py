"""Validation callbacks in a short CPU fit: the TensorBoard event file holds their tags."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import FusionMetrics, IQAMetrics, MixMonitor, SampleGrid
from callbacks.mix_monitor import KINDS
from datamodules import DiTFuseDataModule
from ditfuse.module import DiTFuseModule

FUSION_TASKS = ("ivif", "mff", "mef", "m3")


def _fit(tmp_path: Path, callbacks: list[pl.Callback]) -> EventAccumulator:
    dm = DiTFuseDataModule(demo_dir=str(tmp_path / "demo"), image_size=32, batch_size=4, num_workers=0,
                           batches_per_epoch=3, val_samples_per_task=2, val_batch_size=6,
                           m3_block_sizes=[4, 8], seed=0)
    model = DiTFuseModule(preset="tiny", val_sampler={"steps": 2, "guidance_scale": 1.0,
                                                      "img_guidance_scale": 1.0})
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="cb", default_hp_metric=False)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=logger, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> EventAccumulator:
    tmp = tmp_path_factory.mktemp("callbacks")
    return _fit(tmp, [FusionMetrics(), SampleGrid(num_samples=2), MixMonitor(log_every_n_steps=1)])


def test_fusion_metric_scalars_per_task(events):
    scalars = set(events.Tags()["scalars"])
    for task in FUSION_TASKS:
        for metric in ("EN", "SD", "SF", "AG", "MI", "SCD", "CC", "MSE", "PSNR", "Qabf", "SSIM",
                       "ref_psnr", "ref_ssim"):
            assert f"val/{task}/{metric}" in scalars, f"val/{task}/{metric} missing"
        assert f"val/{task}/VIF" not in scalars  # 32 px is below VIF's 4-scale minimum: dropped, not crashed
    assert "val/seg/miou" in scalars
    assert "val/control/accuracy" in scalars
    miou = events.Scalars("val/seg/miou")[-1].value
    assert 0.0 <= miou <= 1.0


def test_sample_grids_and_prompts_per_task(events):
    images = set(events.Tags()["images"])
    for task in (*FUSION_TASKS, "seg", "control"):
        assert f"samples/{task}" in images
    grid = events.Images("samples/m3")[-1]
    assert grid.width > grid.height  # 4 columns: image 1 | image 2 | output | target
    assert any(tag.startswith("samples/m3/prompts") for tag in events.Tags()["tensors"])


def test_mix_shares_sum_to_one(events):
    scalars = set(events.Tags()["scalars"])
    shares = [events.Scalars(f"data/share/{k}")[-1].value for k in KINDS]
    assert abs(sum(shares) - 1.0) < 1e-6
    assert all(f"data/ratio/{k}" in scalars for k in KINDS)


def test_iqa_callback_logs_scores_from_local_weights(tmp_path):
    from tests._tiny_iqa import make_tiny_iqa_weights

    weights = make_tiny_iqa_weights(tmp_path / "iqa")
    events = _fit(tmp_path, [IQAMetrics(weights_dir=str(weights), max_images=4, maniqa_crops=1)])
    scalars = set(events.Tags()["scalars"])
    iqa_tags = {t for t in scalars if t.endswith("/clipiqa") or t.endswith("/maniqa")}
    assert iqa_tags, f"no IQA scalars in {sorted(scalars)}"
    assert all(torch.isfinite(torch.tensor(events.Scalars(t)[-1].value)) for t in iqa_tags)


def test_iqa_callback_fails_fast_on_missing_weights(tmp_path):
    from ditfuse.eval.iqa import IQAWeightsMissing

    cb = IQAMetrics(weights_dir=str(tmp_path / "nothing-here"))
    with pytest.raises(IQAWeightsMissing, match="clipiqa"):
        cb.setup(pl.Trainer(accelerator="cpu", logger=False), DiTFuseModule(preset="tiny"), "fit")


def test_fusion_metrics_count_a_repeated_batch_once():
    """The distributed sampler repeats batches to give every rank as many: a sample seen twice
    counts once (merged by sample id), so every mean is over the distinct samples."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    n = 3
    batch = {"task": ["m3"] * n, "key": [f"k{i}" for i in range(n)],
             "images": torch.rand(n, 2, 3, 32, 32, generator=g) * 2 - 1,
             "target": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1}
    out = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    first_two = {k: v[:2] for k, v in batch.items()}

    def logged(batches: list[tuple[dict, torch.Tensor]]) -> dict[str, float]:
        cb = FusionMetrics(metrics=["EN", "PSNR", "SSIM"])
        values: dict[str, float] = {}
        module = SimpleNamespace(log=lambda name, v, **kw: values.__setitem__(name, float(v)))
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=0)
        cb.on_validation_epoch_start(trainer, module)
        for i, (b, o) in enumerate(batches):
            cb.on_validation_batch_end(trainer, module, {"output": o}, b, i)
        cb.on_validation_epoch_end(trainer, module)
        return values

    once = logged([(batch, out)])
    repeated = logged([(batch, out), (first_two, out[:2])])
    assert set(once) == {"val/m3/EN", "val/m3/PSNR", "val/m3/SSIM", "val/m3/ref_psnr", "val/m3/ref_ssim"}
    assert repeated == once
