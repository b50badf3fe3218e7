"""DiTFuseModule on hand-built batches (docs/CONTRACTS.md): logs, optimizer gets only trainable
params, LoRA checkpoints hold only trainable tensors and load back onto the base, sample()."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from ditfuse.core import prompts as P
from ditfuse.model.lora import LoraSettings
from ditfuse.module import DiTFuseModule, OptimizerSettings, WarmupSchedule
from ditfuse.sampling.sampler import SamplerSettings

TINY = dict(preset="tiny", model_overrides={"num_layers": 1},
            val_sampler=SamplerSettings(steps=2, guidance_scale=1.0, img_guidance_scale=1.0))


def hand_batch(tasks=("m3", "ivif", "m3", "seg"), size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(tasks)
    prompts = [P.default_prompt(t, cls="circle") for t in tasks]
    return {"kind": ["fusion" if t in P.FUSION_TASKS else t for t in tasks], "task": list(tasks), "prompt": prompts,
            "images": torch.rand(B, 2, 3, size, size, generator=g) * 2 - 1,
            "target": torch.rand(B, 3, size, size, generator=g) * 2 - 1,
            "subtask": [None] * B, "key": [str(i) for i in range(B)], "meta": [{}] * B}


def _loader(n, seed=0):
    return DataLoader([hand_batch(seed=seed + i) for i in range(n)], batch_size=None)


def _trainer(tmp_path, **kw):
    return pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


def test_fit_logs_per_task_and_psnr_pair(tmp_path):
    model = DiTFuseModule(**TINY)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=_loader(2), val_dataloaders=_loader(1, seed=9))
    m = trainer.callback_metrics
    for key in ("train/loss", "train/loss/m3", "train/loss/ivif", "val/m3/psnr", "val/m3/psnr_mean", "val/loss"):
        assert key in m, key


def test_lora_optimizer_and_checkpoint_are_trainable_only(tmp_path):
    model = DiTFuseModule(**TINY, lora=LoraSettings(r=2, alpha=4), optimizer=OptimizerSettings(lr=1e-2))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_loader(2))
    opt = trainer.optimizers[0]
    in_opt = {id(p) for grp in opt.param_groups for p in grp["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert in_opt == {id(p) for p in trainable} and all(".lora_" in n for n, p in model.named_parameters()
                                                          if p.requires_grad)
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    assert state["state_dict"] and all(".lora_" in k for k in state["state_dict"])
    assert state["optimizer_states"] and state["lr_schedulers"]
    back = DiTFuseModule.from_checkpoint(ckpt)
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    # a checkpoint that lacks the trained tensors is refused with a message
    state["state_dict"] = {}
    torch.save(state, tmp_path / "empty.ckpt")
    with pytest.raises(KeyError, match="lacks"):
        DiTFuseModule.from_checkpoint(tmp_path / "empty.ckpt")


def test_sample_is_seeded_and_sized():
    model = DiTFuseModule(**TINY)
    b = hand_batch(size=16)
    a = model.sample(b, steps=2, seed=1)
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.sample(prompts=b["prompt"], images=b["images"], steps=2, seed=1))
    assert not torch.equal(a, model.sample(b, steps=2, seed=2))
    with pytest.raises(ValueError, match="multiple of 4"):
        model.sample(b, size=(18, 16))


def test_warmup_schedule():
    s = WarmupSchedule(warmup=4, total=10, kind="cosine", min_ratio=0.1)
    assert s(0) == 0.25 and s(3) == 1.0 and abs(s(10) - 0.1) < 1e-9
    assert WarmupSchedule(0, 10, "constant", 0.0)(7) == 1.0
