"""`DiTFuseDataModule`: the four shard sources mixed at configured ratios (LightningCLI-ready).

Training: `MixedStream` yields whole batches (docs/CONTRACTS.md), exactly `batches_per_epoch`
per rank per epoch, from infinite per-source streams split by rank and worker. Validation:
`ValidationSet`, finite and deterministic, one task per batch in TASKS order.
The realized mix is counted in the main process as batches are handed to the trainer:
`datamodule.mix_counts` (kind -> samples), `datamodule.task_counts`, `datamodule.mix_shares()`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.demo import build_demo, demo_ready, demo_shards
from datamodules.m3 import M3Config
from datamodules.mixing import MixedStream, StreamSpec, ValidationSet
from datamodules.pipelines import PipelineConfig
from datamodules.schema import KINDS, expand_shards
from datamodules.targets import ControlConfig
from ditfuse.prompts import CONTROL_SUBTASKS, TASKS

ShardSpec = str | list[str]

DEFAULT_RATIOS = {"fusion": 0.4, "m3": 0.3, "seg": 0.15, "control": 0.15}


class _CountingLoader(DataLoader):
    """A DataLoader that re-seeds its stream at every `iter()` and counts the kinds it delivers.

    The dataset is pickled to the workers when `iter()` starts them (persistent_workers is off),
    so setting the epoch just before reaches every worker.
    """

    def __init__(self, dataset: MixedStream, position: Callable[[], tuple[int, int]],
                 on_batch: Callable[[dict], None], **kwargs):
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self._position, self._on_batch = position, on_batch

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        self.dataset.set_epoch(*self._position())  # type: ignore[attr-defined]
        for batch in super().__iter__():
            self._on_batch(batch)
            yield batch


class DiTFuseDataModule(L.LightningDataModule):
    """Mixes the fusion / m3 / seg / control shard sources.

    Args:
        shards: kind -> glob/brace pattern, folder, or list of tar paths. Kinds left out use
            `demo_dir` when it is set.
        ratios: kind -> non-negative weight (normalised; 0 disables a kind).
        image_size: training/validation crop size, a multiple of 16.
        batch_size: per rank. val_batch_size: defaults to batch_size.
        num_workers: DataLoader workers per rank (each is its own stream).
        seed: one seed for shard order, mixing, crops, M3 and prompts.
        batches_per_epoch: training batches per rank per epoch (equal on all ranks).
        val_shards: kind -> pattern for validation (demo_dir's val split when None and demo_dir set).
        val_samples_per_task: the first N samples of each task form the validation set.
        demo_dir: build the scikit-image demo shards here in `prepare_data` if missing.
        m3_*: M3 options (datamodules.m3.M3Config). control_*: control subtask weights and op values.
        prompt_tags: False is the no-tag ablation. random_instructions: False uses the published
            instruction only. instructions: own pools per task or control subtask.
        ivif_fallback: target for IVIF pairs without one (mean_y | max_y | image1).
        max_bad_fraction: stop when more than this share of samples is bad (per worker).
        shuffle_buffer: samples buffered per source stream for shuffling.
        rank, world_size: override the distributed position (tests; normally from the trainer).
    """

    def __init__(
        self,
        shards: dict[str, ShardSpec] | None = None,
        ratios: dict[str, float] | None = None,
        image_size: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        seed: int = 0,
        batches_per_epoch: int = 1000,
        val_shards: dict[str, ShardSpec] | None = None,
        val_samples_per_task: int = 16,
        val_batch_size: int | None = None,
        demo_dir: str | None = None,
        m3_block_sizes: Sequence[int] = (16, 32, 64),
        m3_ops: dict[str, float] | None = None,
        m3_both_fraction: float = 0.25,
        m3_blur_kinds: dict[str, float] | None = None,
        m3_blur_kernels: Sequence[int] = (3, 5, 7, 9, 11),
        m3_blur_sigma: tuple[float, float] = (0.8, 3.0),
        m3_noise_kinds: dict[str, float] | None = None,
        m3_noise_sigma: tuple[float, float] = (10.0, 35.0),
        m3_salt_pepper: tuple[float, float] = (0.01, 0.03),
        control_subtasks: dict[str, float] | None = None,
        control_gamma: dict[str, float] | None = None,
        control_contrast: dict[str, float] | None = None,
        prompt_tags: bool = True,
        random_instructions: bool = True,
        instructions: dict[str, list[str]] | None = None,
        ivif_fallback: str = "mean_y",
        max_bad_fraction: float = 0.05,
        shuffle_buffer: int = 64,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.ratios = _check_ratios(DEFAULT_RATIOS if ratios is None else ratios)
        self.shard_specs = _check_shards(shards or {}, self.ratios, demo_dir)
        _check_positive(image_size=image_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                        val_samples_per_task=val_samples_per_task, shuffle_buffer=shuffle_buffer)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        m3 = M3Config(tuple(m3_block_sizes), m3_ops or M3Config().ops, m3_both_fraction,
                      m3_blur_kinds or M3Config().blur_kinds, tuple(m3_blur_kernels), tuple(m3_blur_sigma),
                      m3_noise_kinds or M3Config().noise_kinds, tuple(m3_noise_sigma), tuple(m3_salt_pepper))
        if min(m3.block_sizes) > image_size:
            raise ValueError(f"m3_block_sizes {m3.block_sizes}: at least one must be <= image_size {image_size}")
        control = ControlConfig(control_subtasks or {s: 1.0 for s in CONTROL_SUBTASKS},
                                control_gamma or {}, control_contrast or {})
        self.pipeline = PipelineConfig(image_size, m3, control, prompt_tags, random_instructions,
                                       instructions, ivif_fallback)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.batches_per_epoch = batches_per_epoch
        self.val_specs, self.demo_dir = val_shards, demo_dir
        self.val_samples_per_task = val_samples_per_task
        self.val_batch_size = val_batch_size or batch_size
        self.max_bad_fraction, self.shuffle_buffer, self.pin_memory = max_bad_fraction, shuffle_buffer, pin_memory
        self._rank, self._world = rank, world_size
        self._epoch, self._step = 0, 0  # used when no trainer is attached (or after set_epoch)
        self._explicit_position = False
        self.mix_counts: Counter[str] = Counter()
        self.task_counts: Counter[str] = Counter()
        self.train_shards: dict[str, list[str]] = {}
        self.val_set: ValidationSet | None = None

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Build the demo shards (once, on one process per node) if `demo_dir` is set and missing."""
        if self.demo_dir and not demo_ready(self.demo_dir):
            build_demo(self.demo_dir, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.demo_dir and not demo_ready(self.demo_dir):
            self.prepare_data()  # direct use without a trainer
        specs = {**(demo_shards(self.demo_dir) if self.demo_dir else {}), **self.shard_specs}
        self.train_shards = {k: expand_shards(specs[k], f"shards.{k}") for k, w in self.ratios.items() if w > 0}
        val = self.val_specs if self.val_specs is not None else (demo_shards(self.demo_dir, "val") if self.demo_dir else None)
        if val:
            self.val_set = ValidationSet({k: expand_shards(v, f"val_shards.{k}") for k, v in val.items()},
                                         self.pipeline, seed=self.seed, batch_size=self.val_batch_size,
                                         per_task=self.val_samples_per_task)

    # ------------------------------------------------------------------ distributed position
    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            return self._rank or 0, self._world or 1
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def _position(self) -> tuple[int, int]:
        """(epoch, step) that seeds the next training iterator: the trainer's unless set_epoch was
        called; without a trainer, an internal counter so successive iterators differ."""
        trainer = self._trainer_or_none()
        if trainer is not None and not self._explicit_position:
            return trainer.current_epoch, trainer.global_step
        pos = (self._epoch, self._step)
        self._epoch += 1
        self._explicit_position = False
        return pos

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Seed the next training iterator with (epoch, step), e.g. to continue a resumed run on new data."""
        self._epoch, self._step, self._explicit_position = int(epoch), int(step), True

    # ------------------------------------------------------------------ loaders
    def train_dataset(self) -> MixedStream:
        if not self.train_shards:
            self.setup("fit")
        spec = StreamSpec(self.train_shards, self.ratios, self.pipeline, self.batch_size,
                          self.batches_per_epoch, self.seed, self.max_bad_fraction, self.shuffle_buffer)
        return MixedStream(spec, *self._rank_world())

    def train_dataloader(self) -> DataLoader:
        return _CountingLoader(self.train_dataset(), self._position, self._count, num_workers=self.num_workers,
                               pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return DataLoader(self.val_set, batch_size=None, shuffle=False, num_workers=min(self.num_workers, 2),
                          pin_memory=self.pin_memory)

    # ------------------------------------------------------------------ accounting and state
    def _count(self, batch: dict) -> None:
        self.mix_counts.update(batch["kind"])
        self.task_counts.update(batch["task"])

    def mix_shares(self) -> dict[str, float]:
        """Realized share of each configured kind among the training samples delivered so far."""
        total = sum(self.mix_counts.values())
        return {k: (self.mix_counts[k] / total if total else 0.0) for k in self.ratios}

    @property
    def normalized_ratios(self) -> dict[str, float]:
        """The configured ratios normalised to sum to 1 (what `mix_shares` should approach)."""
        total = sum(self.ratios.values())
        return {k: w / total for k, w in self.ratios.items()}

    def state_dict(self) -> dict:
        return {"mix_counts": dict(self.mix_counts), "task_counts": dict(self.task_counts),
                "epoch": self._epoch, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self.mix_counts = Counter(state.get("mix_counts", {}))
        self.task_counts = Counter(state.get("task_counts", {}))
        self._epoch, self._step = state.get("epoch", 0), state.get("step", 0)


# ---------------------------------------------------------------------------------------------
# config checks: one line, naming the setting
# ---------------------------------------------------------------------------------------------
def _check_ratios(ratios: dict[str, float]) -> dict[str, float]:
    unknown = set(ratios) - set(KINDS)
    if unknown:
        raise ValueError(f"ratios: unknown kind(s) {sorted(unknown)}; use {', '.join(KINDS)}")
    bad = {k: w for k, w in ratios.items() if not isinstance(w, (int, float)) or w < 0}
    if bad:
        raise ValueError(f"ratios: weights must be non-negative numbers, got {bad}")
    if sum(ratios.values()) <= 0:
        raise ValueError(f"ratios: all weights are zero ({ratios}); give at least one kind a weight > 0")
    return {k: float(w) for k, w in ratios.items()}


def _check_shards(shards: dict[str, ShardSpec], ratios: dict[str, float], demo_dir: str | None) -> dict[str, ShardSpec]:
    unknown = set(shards) - set(KINDS)
    if unknown:
        raise ValueError(f"shards: unknown kind(s) {sorted(unknown)}; use {', '.join(KINDS)}")
    missing = [k for k, w in ratios.items() if w > 0 and not shards.get(k) and not demo_dir]
    if missing:
        raise ValueError(f"shards: kind(s) {missing} have ratio > 0 but no shards; set shards.{missing[0]} "
                         f"(or its ratio to 0, or demo_dir)")
    return dict(shards)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if values["image_size"] % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the DiT patch grid), got {values['image_size']}")


__all__ = ["DEFAULT_RATIOS", "TASKS", "DiTFuseDataModule"]
