"""Per-task validation metrics on the model's sampled outputs.

Logs `val/<task>/<metric>` for the fusion tasks (ivif, mff, mef, m3: the classical metric set of
`ditfuse.eval.metrics`, plus `ref_psnr`/`ref_ssim` against the target), `val/seg/miou` and
`val/control/accuracy`. Values are kept per sample id (task/key) and merged over the DDP ranks
like the module's `val/*` (ditfuse.module.GlobalMeans): a batch the distributed sampler repeats
to even out the ranks counts once, so every mean is over the distinct validation samples, the
same on 1 or N ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from callbacks._common import check_every, is_due, log_global_means, sample_ids, sampled_outputs, task_indices, to_255
from ditfuse.eval import metrics as fm
from ditfuse.eval.task_metrics import binary_miou, control_accuracy, recover_overlay_mask
from ditfuse.module import GlobalMeans

FUSION_LIKE = ("ivif", "mff", "mef", "m3")


class FusionMetrics(pl.Callback):
    """Score each validation batch per task; log the epoch means.

    Args:
        every_n_epochs: run on every n-th validation epoch.
        metrics: fusion metric names (default: all of `ditfuse.eval.metrics.METRIC_NAMES`).
        reference: also score PSNR/SSIM against the target where the task has one.
        control_tolerance: relative tolerance of the control-accuracy check.
    """

    def __init__(self, every_n_epochs: int = 1, metrics: Sequence[str] | None = None,
                 reference: bool = True, control_tolerance: float = 0.5) -> None:
        self.every_n_epochs = check_every(every_n_epochs)
        unknown = sorted(set(metrics or ()) - set(fm.METRIC_NAMES))
        if unknown:
            raise ValueError(f"FusionMetrics: unknown metrics {unknown}; choose from {list(fm.METRIC_NAMES)}")
        self.metrics = tuple(metrics) if metrics else tuple(fm.METRIC_NAMES)
        self.reference = reference
        self.control_tolerance = control_tolerance
        self._warned_no_base = self._warned_small = False
        # the same ordered names on every rank: one merge at epoch end whatever tasks a rank saw
        names = [f"val/{t}/{m}" for t in FUSION_LIKE for m in self.metrics]
        if reference:
            names += [f"val/{t}/ref_{m}" for t in FUSION_LIKE for m in ("psnr", "ssim")]
        names += ["val/seg/miou", "val/control/accuracy"]
        self._means = GlobalMeans(names)

    # -- accumulation ----------------------------------------------------------------------------
    def _update(self, name: str, values: Tensor, ids: list[str]) -> None:
        keep = ~torch.isnan(values.float().flatten())  # a metric undefined for a sample: not counted
        self._means.add(name, values.flatten()[keep], [i for i, k in zip(ids, keep.tolist()) if k])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._means.reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not is_due(trainer, self.every_n_epochs):
            return
        out, ids = sampled_outputs(pl_module, batch, outputs), sample_ids(batch)
        for task, rows in task_indices(batch).items():
            row_ids = [ids[i] for i in rows.tolist()]
            rows = rows.to(out.device)
            if task in FUSION_LIKE:
                self._score_fusion(task, batch, out, rows, row_ids)
            elif task == "seg":
                self._score_seg(batch, out, rows, row_ids)
            elif task == "control":
                self._score_control(batch, out, rows, row_ids)

    def _score_fusion(self, task: str, batch: dict[str, Any], out: Tensor, rows: Tensor, ids: list[str]) -> None:
        a, b = to_255(batch["images"][rows, 0]), to_255(batch["images"][rows, 1])
        f = to_255(out[rows])
        for name, values in fm.compute_fusion_metrics(a, b, f, metrics=self._fitting(f)).items():
            self._update(f"val/{task}/{name}", values, ids)
        if self.reference:
            for name, values in fm.reference_metrics(to_255(batch["target"][rows]), f).items():
                self._update(f"val/{task}/ref_{name.lower()}", values, ids)

    def _fitting(self, f: Tensor) -> list[str]:
        """The configured metrics minus VIF when images are below its 4-scale minimum (CPU demo)."""
        if "VIF" in self.metrics and min(f.shape[-2:]) < fm.VIF_MIN_SIDE:
            if not self._warned_small:
                rank_zero_warn(f"FusionMetrics: VIF needs images of at least {fm.VIF_MIN_SIDE} px; "
                               f"validation images are {tuple(f.shape[-2:])}, so VIF is not logged")
                self._warned_small = True
            return [m for m in self.metrics if m != "VIF"]
        return list(self.metrics)

    def _score_seg(self, batch: dict[str, Any], out: Tensor, rows: Tensor, ids: list[str]) -> None:
        if "mask" not in batch:
            return
        base = _seg_base(batch, rows)
        pred = recover_overlay_mask(_unit(out[rows]), _unit(base))
        self._update("val/seg/miou", binary_miou(pred, batch["mask"][rows].bool()), ids)

    def _score_control(self, batch: dict[str, Any], out: Tensor, rows: Tensor, ids: list[str]) -> None:
        if "control_base" not in batch:
            if not self._warned_no_base:
                rank_zero_warn("FusionMetrics: control batches carry no `control_base`; "
                               "val/control/accuracy is not logged")
                self._warned_no_base = True
            return
        subtasks = [batch["subtask"][i] for i in rows.tolist()]
        acc = control_accuracy(_unit(out[rows]), _unit(batch["control_base"][rows]),
                               _unit(batch["target"][rows]), subtasks, self.control_tolerance)
        self._update("val/control/accuracy", acc, ids)

    # -- logging ---------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not is_due(trainer, self.every_n_epochs):
            return
        log_global_means(pl_module, self._means)


def _unit(x: Tensor) -> Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


def _seg_base(batch: dict[str, Any], rows: Tensor) -> Tensor:
    """The image the seg overlay was painted on: image 1 unless the sample's json says otherwise."""
    metas = batch.get("meta") or [{}] * len(batch["task"])
    which = torch.tensor([int((metas[i] or {}).get("overlay_base", 1)) - 1 for i in rows.tolist()],
                         device=rows.device)
    return batch["images"][rows, which]

