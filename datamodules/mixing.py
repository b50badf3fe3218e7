"""Infinite per-source streams, the ratio mixer, bad-sample accounting, the validation set.

Stream layout: every (rank, worker) pair is one stream `sid` of `n = world_size * num_workers`.
A source with at least `n` shards gives stream `sid` the shards `sid::n`; a source with fewer
shards gives every stream every shard but only the samples `(i + shard_index) % n == sid`. Either
way streams never see each other's samples. Each stream cycles over its part forever, reshuffling
the shard order every pass and the samples through a buffer ("resampled"); an epoch is a fixed
number of batches cut from that stream, seeded by (seed, epoch, step offset, sid).
"""

from __future__ import annotations

import random
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from datamodules.io import ImageReadError
from datamodules.m3 import seed_for
from datamodules.pipelines import PipelineConfig, collate, process
from datamodules.schema import SchemaError, ShardReadError, iter_tar, sample_json
from ditfuse.prompts import TASKS

# what a bad sample raises while decoding/processing (anything else is a bug and propagates)
BAD_SAMPLE_ERRORS = (SchemaError, ImageReadError, ShardReadError, KeyError, ValueError, RuntimeError)


class BadSampleWarning(UserWarning):
    """A corrupt shard or an undecodable sample was skipped."""


class TooManyBadSamples(RuntimeError):
    """The bad-sample fraction passed `max_bad_fraction`."""


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


# ---------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------
def stream_part(shards: list[str], sid: int, n: int) -> tuple[list[tuple[int, str]], bool]:
    """(shard index, path) of stream sid's shards, and whether samples must be filtered by index."""
    if len(shards) >= n:
        return [(i, s) for i, s in enumerate(shards) if i % n == sid], False
    return list(enumerate(shards)), True


def source_stream(kind: str, shards: list[str], sid: int, n: int, seed: int, tracker: BadSampleTracker,
                  buffer: int = 64) -> Iterator[dict]:
    """Infinite raw samples of one source for stream `sid` of `n` (see the module docstring)."""
    part, filtered = stream_part(shards, sid, n)
    rng = random.Random(seed)
    buf: list[dict] = []
    while True:
        order = part[:]
        rng.shuffle(order)
        got = 0
        for idx, shard in order:
            for sample in _read_shard(shard, tracker):
                sample_i = sample.pop("__index__")
                if filtered and (sample_i + idx) % n != sid:
                    continue
                got += 1
                if len(buf) < buffer:
                    buf.append(sample)
                    continue
                j = rng.randrange(buffer)
                yield buf[j]
                buf[j] = sample
        if got == 0 and not buf:
            raise TooManyBadSamples(
                f"{kind}: stream {sid} of {n} (ranks x workers) found no readable samples in "
                f"{[s for _, s in part]}; check these shards (a source needs at least one sample per stream)")
        if len(buf) < buffer:  # the whole part fits in the buffer: serve it shuffled, then reread
            rng.shuffle(buf)
            yield from buf
            buf = []


def _read_shard(shard: str, tracker: BadSampleTracker) -> Iterator[dict]:
    try:
        for i, sample in enumerate(iter_tar(shard)):
            sample["__index__"] = i
            yield sample
    except ShardReadError as e:
        tracker.failed(shard, str(e))


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


class MixedStream(IterableDataset):
    """Yields whole training batches (the batch dict of docs/CONTRACTS.md), exactly
    `batches_per_epoch` per rank per epoch, split over this rank's DataLoader workers."""

    def __init__(self, spec: StreamSpec, rank: int = 0, world_size: int = 1):
        self.spec, self.rank, self.world_size = spec, rank, world_size
        self.epoch, self.step = 0, 0

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Position in the run: a new (epoch, step) gives new samples (resumed runs included)."""
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
        tag = f"e{self.epoch}/s{self.step}/sid{sid}of{n}"
        tracker = BadSampleTracker(sp.max_bad_fraction)
        streams = {k: source_stream(k, sp.shards[k], sid, n, seed_for(sp.seed, f"{tag}/{k}"), tracker,
                                    sp.shuffle_buffer)
                   for k, w in sp.ratios.items() if w > 0}
        schedule = kind_schedule(sp.ratios, random.Random(seed_for(sp.seed, f"{tag}/mix")))
        drawn = 0
        for _ in range(n_batches):
            rows = []
            with _one_thread():
                for _ in range(sp.batch_size):
                    kind = next(schedule)
                    rows.append(self._next_row(kind, streams[kind], tracker, f"{tag}/{drawn}"))
                    drawn += 1
                batch = collate(rows)
            yield batch

    def _next_row(self, kind: str, stream: Iterator[dict], tracker: BadSampleTracker, draw: str) -> dict:
        """The next good sample of `kind` (bad ones are skipped, counted, warned about)."""
        while True:
            sample = next(stream)
            try:
                row = process(kind, sample, self.spec.cfg, seed=self.spec.seed,
                              draw_key=f"{sample['__key__']}@{draw}", train=True)
            except BAD_SAMPLE_ERRORS as e:
                tracker.failed(sample.get("__shard__", "?"), f"{sample.get('__key__')}: {type(e).__name__}: {e}")
                continue
            tracker.ok()
            return row


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SampleRef:
    kind: str
    shard: str
    key: str
    fields: tuple[tuple[str, int, int], ...]  # (field, offset, size) in the tar


def _index_tar(shard: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {field: (offset, size)})] in tar order (headers only; data is read on demand)."""
    from datamodules.schema import split_name

    out: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(shard, "r:") as tar:
        for m in tar.getmembers():
            if m.isfile():
                key, field = split_name(m.name)
                out.setdefault(key, {})[field] = (m.offset_data, m.size)
    return list(out.items())


def _load(ref: _SampleRef) -> dict:
    sample: dict = {"__key__": ref.key, "__shard__": ref.shard}
    with open(ref.shard, "rb") as f:
        for field, off, size in ref.fields:
            f.seek(off)
            sample[field] = f.read(size)
    return sample


def _task_of(kind: str, ref: _SampleRef) -> str | None:
    if kind != "fusion":
        return kind
    meta_field = [f for f in ref.fields if f[0] == "json"]
    try:
        return sample_json(_load(_SampleRef(kind, ref.shard, ref.key, tuple(meta_field)))).get("task")
    except SchemaError:
        return None


class ValidationSet(Dataset):
    """Finite, deterministic validation batches, each of one task, in TASKS order.

    The first `per_task` samples of each task (shards sorted, tar order) are used, processed with
    a centre crop and per-key seeds, so metrics per task compare across epochs and runs.
    """

    def __init__(self, shards: dict[str, list[str]], cfg: PipelineConfig, *, seed: int = 0,
                 batch_size: int = 4, per_task: int = 16):
        self.cfg, self.seed = cfg, seed
        by_task: dict[str, list[_SampleRef]] = {t: [] for t in TASKS}
        for kind, paths in shards.items():
            for shard in paths:
                try:
                    index = _index_tar(shard)
                except (tarfile.TarError, OSError) as e:
                    warnings.warn(f"validation: skipped unreadable shard {shard}: {e}", BadSampleWarning)
                    continue
                for key, fields in index:
                    ref = _SampleRef(kind, shard, key, tuple((f, o, s) for f, (o, s) in fields.items()))
                    task = _task_of(kind, ref)
                    if task in by_task and len(by_task[task]) < per_task:
                        by_task[task].append(ref)
        self.task_counts = {t: len(v) for t, v in by_task.items() if v}
        self.batches = [refs[i:i + batch_size] for refs in by_task.values() for i in range(0, len(refs), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        with _one_thread():
            return collate([process(r.kind, _load(r), self.cfg, seed=self.seed, train=False)
                            for r in self.batches[i]])
