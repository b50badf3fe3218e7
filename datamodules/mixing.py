"""The ratio mixer over the per-source streams, bad-sample accounting, the validation set.

Every (rank, worker) pair is one stream `sid` of `n = world_size * num_workers`; each source
kind gives it a `datamodules.streams.SourceStream` that walks the stream's own part of the shards
in whole passes. An epoch is a fixed number of batches per rank (split over its workers); the kind
of every row comes from a stratified schedule seeded by (seed, epoch, step, sid). With resolution
buckets a batch holds one bucket: samples drawn for another bucket wait ("pending") for a batch of
theirs. Each batch carries its stream's position (`STREAM_STATE`), which the DataModule keeps as
the batches are trained on and puts in the checkpoint, so the next epoch and a resumed run
continue each stream where it stopped.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from datamodules.buckets import Bucket, NoBucketError, choose_bucket, sample_hw
from datamodules.io import ImageReadError
from datamodules.m3 import seed_for
from datamodules.pipelines import PipelineConfig, collate, process
from datamodules.schema import (
    DEFAULT_STALL_TIMEOUT,
    SchemaError,
    ShardReadError,
    read_shard,
    sample_json,
)
from datamodules.streams import Position, SourceStream, TooManyBadSamples
from ditfuse.core.prompts import TASKS

STREAM_STATE = "__stream__"  # batch key of the producing stream's position (the loader pops it)

# what a bad sample raises while decoding/processing (anything else is a bug and propagates)
BAD_SAMPLE_ERRORS = (SchemaError, ImageReadError, ShardReadError, KeyError, ValueError, RuntimeError)


class BadSampleWarning(UserWarning):
    """A corrupt shard or an undecodable sample was skipped."""


class BadSampleTracker:
    """Counts good and bad samples per shard; warns (rate-limited) and stops past a fraction."""

    def __init__(self, max_fraction: float = 0.05, min_samples: int = 32, warn_first: int = 5,
                 warn_every_s: float = 30.0):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.warn_first, self.warn_every_s = warn_first, warn_every_s
        self.good = 0
        self.bad: Counter[str] = Counter()
        self._warned, self._last_warn = 0, 0.0

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())

    def ok(self) -> None:
        self.good += 1

    def failed(self, shard: str, reason: str) -> None:
        self.bad[shard] += 1
        self._warn(shard, reason)
        total = self.good + self.n_bad
        if total >= self.min_samples and self.n_bad / total > self.max_fraction:
            worst, count = self.bad.most_common(1)[0]
            raise TooManyBadSamples(
                f"too many bad samples: {self.n_bad} of {total} ({self.n_bad / total:.0%}) > "
                f"max_bad_fraction={self.max_fraction}; worst shard: {worst} ({count} bad; last error: "
                f"{reason}). Fix or remove that shard, or raise max_bad_fraction.")

    def _warn(self, shard: str, reason: str) -> None:
        now = time.monotonic()
        if self._warned < self.warn_first or now - self._last_warn > self.warn_every_s:
            self._warned += 1
            self._last_warn = now
            more = " (further warnings rate-limited)" if self._warned == self.warn_first else ""
            warnings.warn(f"skipped bad data in {shard}: {reason} [{self.n_bad} bad so far]{more}",
                          BadSampleWarning, stacklevel=3)


def kind_schedule(ratios: dict[str, float], rng: random.Random, chunk: int = 64) -> Iterator[str]:
    """Infinite kinds in proportion to `ratios` (normalised), stratified per chunk.

    Each chunk of `chunk` draws holds each kind's share rounded (largest remainder, with the rest
    carried to the next chunk) in random order: the realized share tracks the ratios to within a
    chunk instead of drifting with multinomial noise, and the order is still random.
    """
    kinds = [k for k, w in ratios.items() if w > 0]
    total = sum(ratios[k] for k in kinds)
    credit = dict.fromkeys(kinds, 0.0)
    while True:
        for k in kinds:
            credit[k] += ratios[k] / total * chunk
        counts = {k: int(credit[k]) for k in kinds}
        rest = chunk - sum(counts.values())
        for k in sorted(kinds, key=lambda k: credit[k] - counts[k], reverse=True)[:max(rest, 0)]:
            counts[k] += 1
        for k in kinds:
            credit[k] -= counts[k]
        draws = [k for k in kinds for _ in range(counts[k])]
        rng.shuffle(draws)
        yield from draws


@contextmanager
def _one_thread() -> Iterator[None]:
    """Per-sample ops are small: intra-op threads only add overhead (and fight the training step
    for cores when loading runs in the main process). DataLoader workers already use one thread."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class HoldOut:
    """Training samples kept for validation (`data.val_holdout`): 1 in `every`, by a stable hash of
    the sample key (independent of data.seed and of where the shards live)."""

    every: int = 100

    def held(self, key: str) -> bool:
        return seed_for(0, f"holdout/{key}") % self.every == 0

    def __call__(self, key: str) -> bool:  # the training streams' `keep`
        return not self.held(key)


@dataclass
class StreamSpec:
    """Everything a worker needs to rebuild its streams (it is pickled to worker processes)."""

    shards: dict[str, list[str]]
    ratios: dict[str, float]
    cfg: PipelineConfig
    batch_size: int
    batches_per_epoch: int
    seed: int = 0
    max_bad_fraction: float = 0.05
    shuffle_buffer: int = 64
    open_shards: int = 4
    buckets: list[Bucket] | None = None
    holdout: dict[str, HoldOut] | None = None  # kind -> what training skips
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # seconds an http(s) shard may send nothing


class MixedStream(IterableDataset):
    """Yields whole training batches (the batch dict of docs/CONTRACTS.md plus STREAM_STATE),
    exactly `batches_per_epoch` per rank per epoch, split over this rank's DataLoader workers.
    `positions` (sid -> state, as the batches reported it) is where each stream starts."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world_size: int = 1,
                 positions: dict[int, dict] | None = None):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.positions = positions or {}
        self.epoch, self.step = 0, 0

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Seeds the kind schedule; where the streams are comes from `positions`."""
        self.epoch, self.step = int(epoch), int(step)

    def __len__(self) -> int:
        return self.spec.batches_per_epoch

    def _stream_id(self) -> tuple[int, int, int]:
        """(sid, n, batches for this worker)."""
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        bpe = self.spec.batches_per_epoch
        return self.rank * nw + w, self.world_size * nw, bpe // nw + (1 if w < bpe % nw else 0)

    def __iter__(self) -> Iterator[dict]:
        sp = self.spec
        sid, n, n_batches = self._stream_id()
        tracker = BadSampleTracker(sp.max_bad_fraction)
        rows = _Rows(sp, sid, n, tracker, self.positions.get(sid) or {})
        schedule = kind_schedule(sp.ratios, random.Random(seed_for(sp.seed, f"e{self.epoch}/s{self.step}/sid{sid}of{n}/mix")))
        for _ in range(n_batches):
            with _one_thread():
                batch = rows.batch([next(schedule) for _ in range(sp.batch_size)])
            batch[STREAM_STATE] = rows.state()
            yield batch


class _Rows:
    """One worker's source streams and the samples drawn for a bucket not yet batched."""

    def __init__(self, spec: StreamSpec, sid: int, n: int, tracker: BadSampleTracker, state: dict):
        self.spec, self.sid, self.n, self.tracker = spec, sid, n, tracker
        starts = state.get("streams", {}) if state.get("n") == n else {}
        self.streams = {
            k: SourceStream(k, spec.shards[k], sid, n, spec.seed, tracker.failed, buffer=spec.shuffle_buffer,
                            open_shards=spec.open_shards, keep=(spec.holdout or {}).get(k),
                            start=Position.of(starts.get(k)), stall_timeout=spec.stall_timeout)
            for k, w in spec.ratios.items() if w > 0}
        self.pending: dict[str, list[dict]] = {k: [] for k in self.streams}
        self.search = max(64, 4 * spec.batch_size)  # draws spent looking for a bucket before giving up
        for k, wanted in (state.get("pending", {}) if starts else {}).items():
            if k not in self.streams:
                continue  # a kind whose ratio became 0
            got = self.streams[k].fetch([tuple(p) for p in wanted])
            self.pending[k] = [self._bucketed(got[tuple(p)]) for p in wanted if tuple(p) in got]

    def state(self) -> dict:
        return {"sid": self.sid, "n": self.n, "streams": {k: s.pos.as_list() for k, s in self.streams.items()},
                "pending": {k: [list(s["__pos__"]) for s in v] for k, v in self.pending.items() if v}}

    def batch(self, kinds: list[str]) -> dict:
        """A batch with these kinds, all rows in the bucket of the first row."""
        first = self._row(kinds[0], None)
        bucket = first["__bucket__"]
        return collate([first["row"], *(self._row(k, bucket)["row"] for k in kinds[1:])])

    def _row(self, kind: str, bucket: int | None) -> dict:
        """The next good sample of `kind` in `bucket` (any when None), processed; bad ones are
        skipped, counted, warned about."""
        while True:
            sample = self._take(kind, bucket)
            b = sample["__bucket__"]
            size = self.spec.buckets[b] if self.spec.buckets else None
            try:
                row = process(kind, sample, self.spec.cfg, seed=self.spec.seed, size=size,
                              draw_key=f"{sample['__key__']}@p{sample['__pos__'][0]}", train=True)
            except BAD_SAMPLE_ERRORS as e:
                self.tracker.failed(sample.get("__shard__", "?"), f"{sample.get('__key__')}: {type(e).__name__}: {e}")
                continue
            self.tracker.ok()
            return {"row": row, "__bucket__": b}

    def _take(self, kind: str, bucket: int | None) -> dict:
        pend = self.pending[kind]
        for i, s in enumerate(pend):  # oldest first, so no pending sample waits forever
            if bucket is None or s["__bucket__"] == bucket:
                return pend.pop(i)
        while True:
            for _ in range(self.search):
                sample = next(self.streams[kind])
                try:
                    sample = self._bucketed(sample)
                except BAD_SAMPLE_ERRORS as e:
                    self.tracker.failed(sample.get("__shard__", "?"), f"{sample.get('__key__')}: {e}")
                    continue
                if bucket is None or sample["__bucket__"] == bucket:
                    return sample
                pend.append(sample)
            if pend:
                # this kind has (next to) nothing in the batch's bucket: its oldest pending sample is
                # resized and cropped to the bucket instead, so the batch keeps its mix and one shape
                sample = pend.pop(0)
                sample["__bucket__"] = bucket
                return sample

    def _bucketed(self, sample: dict) -> dict:
        buckets = self.spec.buckets
        sample["__bucket__"] = choose_bucket(*sample_hw(sample), buckets, self.spec.cfg.max_upscale) if buckets else 0
        return sample


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _task_of(kind: str, sample: dict) -> str | None:
    if kind != "fusion":
        return kind
    try:
        return sample_json(sample).get("task")
    except SchemaError:
        return None


def _kind_tasks(kind: str) -> tuple[str, ...]:
    return ("ivif", "mff", "mef") if kind == "fusion" else (kind,)


def read_validation(kind: str, shards: list[str], per_task: int, select: HoldOut | None = None,
                    stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> dict[str, list[dict]]:
    """task -> the first `per_task` samples of each task of `kind` (shards in order), read through
    webdataset (stops once every task of the kind is full). `select`: only held-out samples."""
    by_task: dict[str, list[dict]] = {t: [] for t in _kind_tasks(kind)}
    for shard in shards:
        try:
            for sample in read_shard(shard, stall_timeout):
                if select is not None and not select.held(sample["__key__"]):
                    continue
                task = _task_of(kind, sample)
                if task in by_task and len(by_task[task]) < per_task:
                    by_task[task].append(sample)
                    if all(len(v) >= per_task for v in by_task.values()):
                        return by_task
        except ShardReadError as e:
            warnings.warn(f"validation: skipped {e}", BadSampleWarning, stacklevel=2)
    return by_task


class ValidationSet(Dataset):
    """Finite, deterministic validation batches, each of one task (and one bucket), interleaved
    round-robin over TASKS (ivif, mff, mef, m3, seg, control, ivif, ...) so that any
    `limit_val_batches` covers the tasks evenly.

    `sources`: kind -> (shards, None) for validation shards, or (training shards, HoldOut) for the
    hold-out. The first `per_task` samples of each task are kept in memory (raw bytes), processed
    with a centre crop and per-key seeds, so metrics per task compare across epochs and runs;
    `batch["key"]` holds each sample's stable key.
    """

    def __init__(self, sources: dict[str, tuple[list[str], HoldOut | None]], cfg: PipelineConfig, *,
                 seed: int = 0, batch_size: int = 4, per_task: int = 16, buckets: list[Bucket] | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT):
        self.cfg, self.seed, self.buckets = cfg, seed, buckets
        by_task: dict[str, list[dict]] = {t: [] for t in TASKS}
        for kind, (shards, select) in sources.items():
            for task, samples in read_validation(kind, shards, per_task, select, stall_timeout).items():
                by_task[task] += [{**s, "__kind__": kind} for s in samples]
        per_task_batches = {t: self._batches(v, batch_size) for t, v in by_task.items()}
        self.task_counts = {t: n for t, bs in per_task_batches.items() if (n := sum(map(len, bs)))}
        rounds = max((len(b) for b in per_task_batches.values()), default=0)
        self.batches = [per_task_batches[t][r] for r in range(rounds) for t in TASKS if r < len(per_task_batches[t])]

    def _batches(self, samples: list[dict], batch_size: int) -> list[list[tuple[dict, Bucket | None]]]:
        groups: dict[int, list[dict]] = {}
        too_small: list[str] = []
        for s in samples:
            try:
                b = choose_bucket(*sample_hw(s), self.buckets, self.cfg.max_upscale) if self.buckets else 0
            except NoBucketError as e:  # one small image must not stop the run: drop it, say so
                too_small.append(f"{s['__key__']}: {e}")
                continue
            groups.setdefault(b, []).append(s)
        if too_small:
            warnings.warn(f"validation: skipped {len(too_small)} sample(s) no bucket fits, e.g. {too_small[0]}",
                          BadSampleWarning, stacklevel=2)
        out = []
        for b, group in sorted(groups.items()):
            size = self.buckets[b] if self.buckets else None
            out += [[(s, size) for s in group[i:i + batch_size]] for i in range(0, len(group), batch_size)]
        return out

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        with _one_thread():
            return collate([process(s["__kind__"], s, self.cfg, seed=self.seed, train=False, size=size)
                            for s, size in self.batches[i]])
