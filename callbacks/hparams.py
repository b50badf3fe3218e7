"""Hyperparameters for TensorBoard's HParams view: the data mix next to the final val metrics.

TensorBoard's HParams view shows one row per run: the hyperparameters recorded at the run's
start, and for each declared metric tag the last value that tag reached in that run. So a sweep
over data-mix ratios becomes a comparison table once every run records its ratios and declares
the validation tags it reports. Lightning's own `log_hyperparams` call records the module's init
arguments but declares no metric (with `default_hp_metric: false`) or only a placeholder
`hp_metric` (the default, which you then have to fill in yourself).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

# module / datamodule init arguments worth a column when present (missing ones are skipped);
# a dotted key reads into a nested setting (a dataclass or a mapping)
MODULE_KEYS = ("preset", "optimizer.lr", "optimizer.warmup_steps", "optimizer.schedule", "lora.r",
               "lora.alpha", "flow.t_sampler", "flow.p_text", "flow.p_all", "gradient_checkpointing")
DATA_KEYS = ("image_size", "batch_size", "seed", "batches_per_epoch", "prompt_tags", "m3_ops")


class HParamsLogger(pl.Callback):
    """Record the data mix (+ a few module/data settings) with the metric tags to compare.

    Columns: `data.ratios.<kind>` (the configured weight, named like the sweep key),
    `data.share.<kind>` (the normalised probability), `model.<key>` / `data.<key>` for the keys
    in `module_keys` / `data_keys` that the module's / datamodule's hparams hold, the global
    batch size, and `extra`.

    `metrics` are the tags the HParams view shows (e.g. `val/m3/psnr`); they are declared at fit
    start. With `metrics=None` they are found instead: every logged metric starting with
    `metric_prefix` after the first validation epoch (the record is then written at that point,
    so a run that never validates has no row).
    """

    def __init__(self, metrics: list[str] | None = None, module_keys: list[str] | None = None,
                 data_keys: list[str] | None = None, metric_prefix: str = "val/",
                 extra: dict[str, Any] | None = None) -> None:
        if metrics is not None and not metrics:
            raise ValueError("HParamsLogger metrics: give at least one tag, or None to find val/* tags")
        self.metrics = list(metrics) if metrics is not None else None
        self.module_keys = tuple(MODULE_KEYS if module_keys is None else module_keys)
        self.data_keys = tuple(DATA_KEYS if data_keys is None else data_keys)
        self.metric_prefix = metric_prefix
        self.extra = dict(extra or {})
        self._written = False

    # -- hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = False
        for logger in _tensorboard_loggers(trainer):
            if getattr(logger, "_default_hp_metric", False):
                rank_zero_warn("HParamsLogger: the TensorBoardLogger has default_hp_metric=True, so Lightning "
                               "also writes a placeholder `hp_metric` record; set "
                               "`default_hp_metric: false` on the logger for a clean HParams view.")
        if self.metrics is not None:
            self._write(trainer, pl_module, self.metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.metrics is None and not self._written and not trainer.sanity_checking:
            found = sorted(k for k in trainer.callback_metrics if k.startswith(self.metric_prefix))
            if found:
                self._write(trainer, pl_module, found)

    # -- what is recorded -------------------------------------------------------------------------
    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The flat {column: value} record of this run."""
        params: dict[str, Any] = {}
        dm = getattr(trainer, "datamodule", None)
        ratios = {str(k): float(v) for k, v in (getattr(dm, "ratios", None) or {}).items()}
        total = sum(ratios.values())
        for kind, weight in sorted(ratios.items()):
            params[f"data.ratios.{kind}"] = weight
            params[f"data.share.{kind}"] = weight / total if total > 0 else 0.0
        for prefix, source, keys in (("model", pl_module.hparams, self.module_keys),
                                     ("data", getattr(dm, "hparams", {}), self.data_keys)):
            for key in keys:
                value = _lookup(source, key)
                if value is not _MISSING:
                    params.update(_flatten(f"{prefix}.{key}", value))
        batch = getattr(dm, "batch_size", None) or getattr(dm, "hparams", {}).get("batch_size")
        if isinstance(batch, int):
            params["trainer.global_batch"] = batch * trainer.world_size * trainer.accumulate_grad_batches
        params["trainer.world_size"] = trainer.world_size
        if "PL_GLOBAL_SEED" in os.environ:  # set by seed_everything (LightningCLI's seed_everything)
            params["seed_everything"] = int(os.environ["PL_GLOBAL_SEED"])
        params.update(_flatten("", self.extra))
        return {k: _sanitize(v) for k, v in params.items()}

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: list[str]) -> None:
        params = self.collect(trainer, pl_module)
        for logger in _tensorboard_loggers(trainer):
            _write_hparams(logger, params, metrics)
        self._written = True


def _tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


@rank_zero_only
def _write_hparams(logger: TensorBoardLogger, params: dict[str, Any], metrics: list[str]) -> None:
    """The HParams plugin's three summaries, with `metrics` declared and no value written for them.

    `TensorBoardLogger.log_hyperparams(params, metrics={tag: value})` would declare the tags too,
    but it also logs each value as a scalar point, a fake one at fit start (it would show up on
    the metric's own curve). The declaration alone is what the HParams view needs; the values
    are the tags' own last points.
    """
    from torch.utils.tensorboard.summary import hparams

    logger.hparams.update(params)  # -> hparams.yaml next to the events
    experiment, session_start, session_end = hparams(params, {m: math.nan for m in metrics})
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, session_start, session_end):
        writer.add_summary(summary)
    writer.flush()


_MISSING = object()


def _lookup(source: Any, dotted: str) -> Any:
    """`source[a][b]` for "a.b", through mappings and dataclasses; _MISSING when absent."""
    value = source
    for part in dotted.split("."):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = getattr(value, part, _MISSING)
        elif isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


def _sanitize(value: Any) -> int | float | str | bool:
    """TensorBoard takes bool/int/float/str hparams; the rest is shown as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)
