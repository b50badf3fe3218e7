"""EMA of the trainable weights: the analytic average, swap for validation, checkpoint round trip."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema import CHECKPOINT_KEY, EMA


class Toy(pl.LightningModule):
    """A trainable linear layer after a frozen one; records weights around every hook we test."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.after_step: list[dict[str, Tensor]] = []  # raw weights after each optimizer step
        self.in_validation: list[dict[str, Tensor]] = []
        self.batch_start: list[dict[str, Tensor]] = []

    def trainable(self) -> dict[str, Tensor]:
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.frozen(x)), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.in_validation.append(self.trainable())

    def on_train_start(self) -> None:
        self.after_step = [{}] * self.trainer.global_step  # a resumed run starts past step 0

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self.batch_start.append(self.trainable())

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.trainer.global_step > len(self.after_step):  # the optimizer stepped (not a micro-batch)
            self.after_step.append(self.trainable())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2, momentum=0.9)


def _loader(n: int = 12, batch: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)),
                      batch_size=batch, shuffle=False)


def _trainer(ema: EMA, tmp_path, max_steps: int, **kw) -> pl.Trainer:
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[ema, *kw.pop("callbacks", [])],
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kw)


def _analytic(init: dict[str, Tensor], steps: list[dict[str, Tensor]], decay: float,
              start_step: int = 0, every: int = 1) -> dict[str, Tensor]:
    ema = {n: v.clone() for n, v in init.items()}
    for k, weights in enumerate(steps, start=1):  # global_step after the k-th optimizer step
        if k >= start_step and k % every == 0:
            ema = {n: decay * ema[n] + (1 - decay) * weights[n] for n in ema}
    return ema


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor], **kw) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], **kw)


@pytest.mark.parametrize("start_step,every,accumulate", [(0, 1, 1), (3, 2, 1), (0, 1, 2)])
def test_ema_equals_analytic_average_of_trainable_weights(tmp_path, start_step, every, accumulate):
    torch.manual_seed(0)
    model = Toy()
    init = model.trainable()
    frozen = {n: p.clone() for n, p in model.frozen.named_parameters()}
    ema = EMA(decay=0.8, start_step=start_step, every_n_steps=every, apply_at_end=False)
    _trainer(ema, tmp_path, max_steps=6, accumulate_grad_batches=accumulate).fit(model, _loader())

    assert set(ema.shadow) == {"head.weight", "head.bias"}  # the frozen layer is not averaged
    assert len(model.after_step) == 6
    _assert_close(ema.shadow, _analytic(init, model.after_step, 0.8, start_step, every))
    raw = model.trainable()
    assert all(not torch.allclose(ema.shadow[n], raw[n]) for n in raw), "EMA should lag the raw weights"
    for n, p in model.frozen.named_parameters():
        assert torch.equal(p, frozen[n])


def test_ema_is_swapped_in_for_validation_and_restored_after(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(decay=0.7, apply_at_end=False)
    snapshots: list[dict[str, Tensor]] = []

    class Snap(pl.Callback):  # the EMA at each validation, as the callback holds it
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            snapshots.append({n: v.clone() for n, v in ema.shadow.items()})

    trainer = _trainer(ema, tmp_path, max_steps=6, callbacks=[Snap()], limit_val_batches=1,
                       val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(model, _loader(), _loader(4))

    assert len(model.in_validation) == 2 == len(snapshots)
    for seen, shadow in zip(model.in_validation, snapshots):
        _assert_close(seen, shadow)  # validation ran on the averaged weights
    # after the validation at step 3, training resumed from the raw step-3 weights, not the EMA
    _assert_close(model.batch_start[3], model.after_step[2])
    assert not torch.allclose(model.batch_start[3]["head.weight"], snapshots[0]["head.weight"])


def test_ema_written_into_the_model_at_the_end(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    ema = EMA(decay=0.7)
    _trainer(ema, tmp_path, max_steps=4).fit(model, _loader())
    _assert_close(model.trainable(), ema.shadow)


def test_ema_checkpoint_round_trip_matches_uninterrupted_run(tmp_path):
    def run(max_steps: int, ckpt_path=None, save=False) -> tuple[EMA, Toy]:
        torch.manual_seed(0)
        model = Toy()
        ema = EMA(decay=0.8, apply_at_end=False)
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)] if save else []
        trainer = _trainer(ema, tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(model, _loader(6), ckpt_path=ckpt_path)
        return ema, model

    full_ema, full_model = run(6)
    first_ema, _ = run(3, save=True)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    stored = torch.load(ckpt, weights_only=False)
    assert set(stored[CHECKPOINT_KEY]) == {"head.weight", "head.bias"}
    _assert_close(stored[CHECKPOINT_KEY], first_ema.shadow)

    resumed_ema, resumed_model = run(6, ckpt_path=ckpt)  # a fresh EMA restored from the checkpoint
    assert [bool(w) for w in resumed_model.after_step] == [False] * 3 + [True] * 3  # steps 4..6 ran
    _assert_close(resumed_ema.shadow, full_ema.shadow)
    _assert_close(resumed_model.trainable(), full_model.trainable())


def test_ema_checkpoint_from_another_trainable_set_is_refused(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay=0.9)
    ema.on_load_checkpoint(None, Toy(), {CHECKPOINT_KEY: {"other.weight": torch.zeros(1)}})
    with pytest.raises(RuntimeError, match="lacks 2 trainable tensors"):
        _trainer(ema, tmp_path, max_steps=1).fit(Toy(), _loader())


def test_ema_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        EMA(every_n_steps=0)
