"""`DiTFuseDataModule`: the four shard sources mixed at configured ratios (LightningCLI-ready).

Training: `MixedStream` yields whole batches (docs/CONTRACTS.md), exactly `batches_per_epoch`
per rank per epoch, from per-source streams that walk each (rank, worker)'s part of the shards in
whole passes (datamodules.streams). Every batch reports its stream's position; the position of the
last batch *trained on* (`on_before_batch_transfer`, after Lightning's one-batch prefetch) is kept
per stream, starts the next epoch's workers and is in `state_dict()`, so a resumed run continues
each pass. Validation: `ValidationSet`, finite and deterministic, one task per batch, tasks
round-robin. The realized mix is counted in the main process as batches are handed to the
trainer: `datamodule.mix_counts` (kind -> samples), `datamodule.task_counts`, `mix_shares()`.
"""

from __future__ import annotations

import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.buckets import make_buckets
from datamodules.demo import build_demo, demo_ready, demo_shards
from datamodules.m3 import M3Config
from datamodules.mixing import (
    STREAM_STATE,
    HoldOut,
    MixedStream,
    StreamSpec,
    ValidationSet,
)
from datamodules.pipelines import PipelineConfig
from datamodules.schema import KINDS, expand_shards
from datamodules.targets import ControlConfig
from datamodules.workers import end_workers_at_exit, ignore_stop_signals
from ditfuse.core.prompts import CONTROL_SUBTASKS, TASKS

ShardSpec = str | list[str]

DEFAULT_RATIOS = {"fusion": 0.4, "m3": 0.3, "seg": 0.15, "control": 0.15}


class _CountingLoader(DataLoader):
    """A DataLoader that restarts its streams where they stopped at every `iter()`, counts the
    kinds it delivers and hands each batch's stream position to `on_batch`.

    The dataset is pickled to the workers when `iter()` starts them (persistent_workers is off),
    so the epoch and the stream positions set just before reach every worker.
    """

    def __init__(self, dataset: MixedStream, position: Callable[[], tuple[int, int]],
                 positions: Callable[[], dict[int, dict]], on_batch: Callable[[dict, dict], None], **kwargs):
        super().__init__(dataset, batch_size=None, persistent_workers=False, worker_init_fn=ignore_stop_signals,
                         **kwargs)
        end_workers_at_exit()
        self._position, self._positions, self._on_batch = position, positions, on_batch

    def state_dict(self) -> dict:
        """Lightning's resumable-loader interface. The stream positions live in the DataModule's state
        (gathered from all ranks), which a checkpoint holds and restores before this loader starts."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self) -> Iterator[dict]:  # type: ignore[override]
        self.dataset.set_epoch(*self._position())  # type: ignore[attr-defined]
        self.dataset.positions = self._positions()  # type: ignore[attr-defined]
        for batch in super().__iter__():
            self._on_batch(batch, batch.pop(STREAM_STATE))
            yield batch


class DiTFuseDataModule(L.LightningDataModule):
    """Mixes the fusion / m3 / seg / control shard sources.

    Args:
        shards: kind -> shard spec: a local path, folder, glob or brace pattern, a `pipe:` command,
            an http(s) (or other webdataset-opened) URL, or a list of these. Kinds left out use
            `demo_dir` when it is set.
        ratios: kind -> non-negative weight (normalised; 0 disables a kind).
        image_size: square training/validation crop size, a multiple of 16 (when `buckets` is unset).
        buckets: resolution buckets, a list of [h, w] or {max_pixels, aspect_ratios} (datamodules.buckets);
            one bucket per batch. bucket_multiple: the model's pixels per token (16 omnigen-v1, 4 tiny).
        max_upscale: a bucket never upscales an image more than this.
        batch_size: per rank. val_batch_size: defaults to batch_size.
        num_workers: DataLoader workers per rank (each is its own stream).
        seed: one seed for shard order, mixing, crops, M3 and prompts.
        batches_per_epoch: training batches per rank per epoch (equal on all ranks).
        val_shards: kind -> spec for validation (demo_dir's val split when None and demo_dir set).
        val_samples_per_task: the first N samples of each task form the validation set.
        val_holdout: N > 0: kinds that val_shards does not cover validate on N samples per task held
            out of their training shards (1 in `val_holdout_every` samples by key hash, never trained on).
        demo_dir: build the scikit-image demo shards here in `prepare_data` if missing.
        m3_*: M3 options (datamodules.m3.M3Config). control_*: control subtask weights and op values.
        prompt_tags: False is the no-tag ablation. random_instructions: False uses the published
            instruction only. instructions: own pools per task or control subtask.
        ivif_fallback: target for IVIF pairs without one (mean_y | max_y | image1).
        target_fallback: mff/mef -> target for pairs without one (mean | image1 | image2); unset: such
            a pair stops the run (a shard writer's recorded choice is used when the config has none).
        max_bad_fraction: stop when more than this share of samples is bad (per worker).
        shuffle_buffer: samples buffered per source stream for shuffling.
        open_shards: shards a source stream reads at once (their samples are interleaved).
        stall_timeout: seconds an http(s) shard may send no byte before it is abandoned and counted
            as a broken shard (training goes on with the other shards; see max_bad_fraction).
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
        target_fallback: dict[str, str] | None = None,
        max_bad_fraction: float = 0.05,
        shuffle_buffer: int = 64,
        open_shards: int = 4,
        stall_timeout: float = 60.0,
        buckets: list[list[int]] | dict[str, Any] | None = None,
        bucket_multiple: int = 16,
        max_upscale: float = 2.0,
        val_holdout: int = 0,
        val_holdout_every: int = 100,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.ratios = _check_ratios(DEFAULT_RATIOS if ratios is None else ratios)
        self.shard_specs = _check_shards(shards or {}, self.ratios, demo_dir)
        _check_positive(image_size=image_size, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                        val_samples_per_task=val_samples_per_task, shuffle_buffer=shuffle_buffer,
                        open_shards=open_shards, val_holdout_every=val_holdout_every)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if not stall_timeout > 0:
            raise ValueError(f"data.stall_timeout must be > 0 seconds, got {stall_timeout}")
        self.stall_timeout = float(stall_timeout)
        if max_upscale < 1.0 or val_holdout < 0:
            raise ValueError(f"max_upscale must be >= 1 (got {max_upscale}) and val_holdout >= 0 (got {val_holdout})")
        self.buckets = make_buckets(buckets, bucket_multiple)
        m3 = M3Config(tuple(m3_block_sizes), m3_ops or M3Config().ops, m3_both_fraction,
                      m3_blur_kinds or M3Config().blur_kinds, tuple(m3_blur_kernels), tuple(m3_blur_sigma),
                      m3_noise_kinds or M3Config().noise_kinds, tuple(m3_noise_sigma), tuple(m3_salt_pepper))
        smallest = min(min(b) for b in self.buckets) if self.buckets else image_size
        if min(m3.block_sizes) > smallest:
            raise ValueError(f"m3_block_sizes {m3.block_sizes}: at least one must be <= the smallest crop side "
                             f"{smallest} (image_size or buckets)")
        control = ControlConfig(control_subtasks or {s: 1.0 for s in CONTROL_SUBTASKS},
                                control_gamma or {}, control_contrast or {})
        self.pipeline = PipelineConfig(image_size, m3, control, prompt_tags, random_instructions,
                                       instructions, ivif_fallback, dict(target_fallback or {}),
                                       max_upscale=float(max_upscale))
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.batches_per_epoch = batches_per_epoch
        self.val_specs, self.demo_dir = val_shards, demo_dir
        self.val_holdout, self.holdout = val_holdout, HoldOut(val_holdout_every)
        _check_val_cover(self.ratios, val_shards, val_holdout)
        self.val_samples_per_task = val_samples_per_task
        self.val_batch_size = val_batch_size or batch_size
        self.max_bad_fraction, self.shuffle_buffer, self.pin_memory = max_bad_fraction, shuffle_buffer, pin_memory
        self.open_shards = open_shards
        self._rank, self._world = rank, world_size
        self._epoch, self._step = 0, 0  # used when no trainer is attached (or after set_epoch)
        self._explicit_position = False
        self.mix_counts: Counter[str] = Counter()
        self.task_counts: Counter[str] = Counter()
        self.train_shards: dict[str, list[str]] = {}
        self.holdout_kinds: list[str] = []
        self.val_set: ValidationSet | None = None
        # stream sid -> position after the last batch trained on; batches handed out, not yet trained
        self.stream_positions: dict[int, dict] = {}
        self._handed_out: deque[dict] = deque()

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Build the demo shards (once, on one process per node) if `demo_dir` is set and missing."""
        if self.demo_dir and not demo_ready(self.demo_dir):
            build_demo(self.demo_dir, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.demo_dir and not demo_ready(self.demo_dir):
            self.prepare_data()  # direct use without a trainer
        specs = {**(demo_shards(self.demo_dir) if self.demo_dir else {}), **self.shard_specs}
        active = [k for k, w in self.ratios.items() if w > 0]
        self.train_shards = {k: expand_shards(specs[k], f"shards.{k}") for k in active}
        val = self.val_specs if self.val_specs is not None else (demo_shards(self.demo_dir, "val") if self.demo_dir else {})
        val_shards = {k: expand_shards(v, f"val_shards.{k}") for k, v in val.items()}
        self.holdout_kinds = [k for k in active if k not in val_shards] if self.val_holdout else []
        self._report(specs, val, val_shards)
        sources = {**{k: (v, None) for k, v in val_shards.items()},
                   **{k: (self.train_shards[k], self.holdout) for k in self.holdout_kinds}}
        if not sources:
            warnings.warn("no validation data: set data.val_shards, data.val_holdout or data.demo_dir; "
                          "validation is skipped", UserWarning, stacklevel=2)
            return
        per_task = self.val_holdout or self.val_samples_per_task
        self.val_set = ValidationSet(sources, self.pipeline, seed=self.seed, batch_size=self.val_batch_size,
                                     per_task=per_task, buckets=self.buckets, stall_timeout=self.stall_timeout)
        if self.holdout_kinds and self._rank_world()[0] == 0:
            print(f"data: val_holdout: 1 in {self.holdout.every} samples of {self.holdout_kinds} (key hash) kept "
                  f"out of training; validation samples per task: {self.val_set.task_counts}", flush=True)

    def _report(self, specs: dict, val: dict, val_shards: dict[str, list[str]]) -> None:
        """One line per kind and split on rank 0: shards found and the first pattern."""
        if self._rank_world()[0] != 0:
            return
        for split, found, given in (("train", self.train_shards, specs), ("val", val_shards, val)):
            for k, urls in found.items():
                first = given[k] if isinstance(given[k], str) else next(iter(given[k]))
                print(f"data: {split} {k}: {len(urls)} shard(s) from {first}", flush=True)

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
        """(epoch, step) that seeds the next training iterator's kind schedule: the trainer's unless
        set_epoch was called; without a trainer, an internal counter so successive iterators differ."""
        trainer = self._trainer_or_none()
        if trainer is not None and not self._explicit_position:
            return trainer.current_epoch, trainer.global_step
        pos = (self._epoch, self._step)
        self._epoch += 1
        self._explicit_position = False
        return pos

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Seed the next training iterator's kind schedule with (epoch, step)."""
        self._epoch, self._step, self._explicit_position = int(epoch), int(step), True

    # ------------------------------------------------------------------ loaders
    def train_dataset(self) -> MixedStream:
        if not self.train_shards:
            self.setup("fit")
        spec = StreamSpec(self.train_shards, self.ratios, self.pipeline, self.batch_size,
                          self.batches_per_epoch, self.seed, self.max_bad_fraction, self.shuffle_buffer,
                          self.open_shards, self.buckets, {k: self.holdout for k in self.holdout_kinds},
                          self.stall_timeout)
        return MixedStream(spec, *self._rank_world())

    def train_dataloader(self) -> DataLoader:
        # Lightning then warns that an IterableDataset's __len__ "could be inaccurate" with
        # num_workers > 1. MixedStream's is exact: the workers split batches_per_epoch between them
        # (tests/test_data_mixing.py::test_workers_split_and_count_exactly), so the warning misleads
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        return _CountingLoader(self.train_dataset(), self._position, self._start_positions, self._delivered,
                               num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        if self.val_set is None or len(self.val_set) == 0:
            return []
        end_workers_at_exit()
        return DataLoader(self.val_set, batch_size=None, shuffle=False, num_workers=min(self.num_workers, 2),
                          pin_memory=self.pin_memory, worker_init_fn=ignore_stop_signals)

    # ------------------------------------------------------------------ stream positions
    def _start_positions(self) -> dict[int, dict]:
        """A new training iterator starts where the trained-on batches left each stream; batches
        handed out but not trained on (prefetched) are drawn again."""
        self._handed_out.clear()
        n = self._rank_world()[1] * max(self.num_workers, 1)
        stale = {st.get("n") for st in self.stream_positions.values()} - {n}
        if stale:
            warnings.warn(f"the checkpointed data streams were {sorted(stale)} (ranks x workers), now {n}: every "
                          "stream starts a new pass (keep world size and data.num_workers to continue them)",
                          UserWarning, stacklevel=2)
            self.stream_positions = {}
        return dict(self.stream_positions)

    def _delivered(self, batch: dict, state: dict) -> None:
        self._count(batch)
        if self._trainer_or_none() is None:
            self.stream_positions[state["sid"]] = state  # no trainer: handed out = used
        else:
            self._handed_out.append(state)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this right before a batch is trained on (after its prefetch), in the order
        the loader handed batches out: the oldest handed-out position is now trained on."""
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.training and self._handed_out:
            state = self._handed_out.popleft()
            self.stream_positions[state["sid"]] = state
        return batch

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
        """Mix counters and every stream's position. Under DDP the positions of all ranks are
        gathered (every rank calls this while a checkpoint is made; rank 0's copy is saved)."""
        return {"mix_counts": dict(self.mix_counts), "task_counts": dict(self.task_counts),
                "epoch": self._epoch, "step": self._step, "stream_positions": _gather(self.stream_positions)}

    def load_state_dict(self, state: dict) -> None:
        self.mix_counts = Counter(state.get("mix_counts", {}))
        self.task_counts = Counter(state.get("task_counts", {}))
        self._epoch, self._step = state.get("epoch", 0), state.get("step", 0)
        self.stream_positions = {int(k): v for k, v in state.get("stream_positions", {}).items()}
        self._handed_out.clear()


def _gather(positions: dict[int, dict]) -> dict[int, dict]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(positions)
    parts: list[dict[int, dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, positions)
    return {sid: st for part in parts for sid, st in (part or {}).items()}


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


def _check_val_cover(ratios: dict[str, float], val_shards: dict | None, val_holdout: int) -> None:
    """A kind that trains must validate once validation is configured for other kinds."""
    if not val_shards or val_holdout:
        return
    missing = [k for k, w in ratios.items() if w > 0 and k not in val_shards]
    if missing:
        raise ValueError(f"val_shards covers {sorted(val_shards)} but not {missing} (ratio > 0); set "
                         f"data.val_shards.{missing[0]} or data.val_holdout (samples per task held out of training)")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if values["image_size"] % 16:
        raise ValueError(f"image_size must be a multiple of 16 (the DiT patch grid), got {values['image_size']}")


__all__ = ["DEFAULT_RATIOS", "TASKS", "DiTFuseDataModule"]
