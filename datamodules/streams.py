"""One source's samples for one (rank, worker) stream: whole passes over its part of the shards.

Stream `sid` of `n = world_size * num_workers` owns the shards `sid::n` of a source (when there are
at least `n`), or, with fewer shards, every shard but only the samples `(i + shard index) % n ==
sid`; either way no two streams ever deliver the same sample. A *pass* walks the stream's part to
the end: the shard order is shuffled per pass, and the shards are read `open_shards` at a time (a
*window*): samples of the open shards are interleaved at random and mixed through a shuffle buffer,
which is drained at the window's end. Then the next window, and after the last one the next pass.

Everything is a function of (seed, kind, sid, n, pass, window), so the stream's position is three
integers, `(pass, window, yielded in the window)`: they travel with every batch to the main
process, go into the checkpoint, and a resumed or next-epoch stream rebuilds its window and skips
what it had yielded (reading those bytes again, not decoding them).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from datamodules.m3 import seed_for
from datamodules.schema import DEFAULT_STALL_TIMEOUT, ShardReadError, read_shard


class TooManyBadSamples(RuntimeError):
    """The bad-sample fraction passed `max_bad_fraction` (datamodules/mixing.py), or a stream found
    no readable sample in its shards. Here, below mixing.py, so both raise it without a cycle."""


@dataclass
class Position:
    """Where a stream is: pass, window of the pass, samples yielded from that window."""

    pass_: int = 0
    window: int = 0
    yielded: int = 0

    def as_list(self) -> list[int]:
        return [self.pass_, self.window, self.yielded]

    @classmethod
    def of(cls, value: list[int] | tuple[int, ...] | None) -> Position:
        return cls(*value) if value else cls()


def stream_part(shards: list[str], sid: int, n: int) -> tuple[list[tuple[int, str]], bool]:
    """(shard index, url) of stream sid's shards, and whether samples must be filtered by index."""
    if len(shards) >= n:
        return [(i, s) for i, s in enumerate(shards) if i % n == sid], False
    return list(enumerate(shards)), True


class SourceStream:
    """Infinite raw samples of one source for stream `sid` of `n` (see the module docstring).

    Each yielded sample carries `__pos__ = (pass, window, index in window)`. `on_bad(shard, reason)`
    is told of every unreadable shard (the samples before the damage are kept). `keep(key)` drops
    samples that are not for training (the validation hold-out).
    """

    def __init__(self, kind: str, shards: list[str], sid: int, n: int, seed: int,
                 on_bad: Callable[[str, str], None], *, buffer: int = 64, open_shards: int = 4,
                 keep: Callable[[str], bool] | None = None, start: Position | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT):
        self.kind, self.sid, self.n, self.seed = kind, sid, n, seed
        self.stall_timeout = stall_timeout
        self.part, self.filtered = stream_part(shards, sid, n)
        self.on_bad, self.buffer, self.open_shards = on_bad, max(1, buffer), max(1, open_shards)
        self.keep = keep
        self.pos = start or Position()
        self._it: Iterator[dict] | None = None

    def _rng(self, *tag: object) -> random.Random:
        return random.Random(seed_for(self.seed, "/".join(map(str, (self.kind, f"{self.sid}of{self.n}", *tag)))))

    def windows(self, pass_: int) -> list[list[tuple[int, str]]]:
        order = self.part[:]
        self._rng("pass", pass_).shuffle(order)
        k = self.open_shards
        return [order[i:i + k] for i in range(0, len(order), k)]

    def window_samples(self, pass_: int, window: int) -> Iterator[dict]:
        """The samples of one window, in their (deterministic) shuffled order."""
        rng = self._rng("pass", pass_, "window", window)
        readers = [(idx, url, self._read(idx, url)) for idx, url in self.windows(pass_)[window]]
        buf: list[dict] = []
        i = 0
        while readers:
            r = rng.randrange(len(readers))  # interleave the open shards at random
            sample = next(readers[r][2], None)
            if sample is None:
                readers.pop(r)
                continue
            if len(buf) < self.buffer:
                buf.append(sample)
                continue
            j = rng.randrange(self.buffer)
            buf[j], sample = sample, buf[j]
            sample["__pos__"] = (pass_, window, i)
            i += 1
            yield sample
        rng.shuffle(buf)
        for sample in buf:
            sample["__pos__"] = (pass_, window, i)
            i += 1
            yield sample

    def _read(self, idx: int, url: str) -> Iterator[dict]:
        try:
            for i, sample in enumerate(read_shard(url, self.stall_timeout)):
                if self.filtered and (i + idx) % self.n != self.sid:
                    continue
                if self.keep is not None and not self.keep(sample["__key__"]):
                    continue
                yield sample
        except ShardReadError as e:
            self.on_bad(url, str(e))

    def fetch(self, wanted: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], dict]:
        """The samples at positions `wanted` (re-read from their windows): a resumed stream's
        pending samples (drawn, not yet in a batch) come back this way."""
        out: dict[tuple[int, int, int], dict] = {}
        for pw in sorted({(p, w) for p, w, _ in wanted}):
            need = {i for p, w, i in wanted if (p, w) == pw}
            for sample in self.window_samples(*pw):
                if sample["__pos__"][2] in need:
                    out[sample["__pos__"]] = sample
                    if len(out) == len(wanted):
                        break
        return out

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._run()
        return next(self._it)

    def _run(self) -> Iterator[dict]:
        while True:
            wins = self.windows(self.pos.pass_)
            whole = self.pos.window == 0 and self.pos.yielded == 0  # not a resumed tail of a pass
            got = 0
            while self.pos.window < len(wins):
                skip = self.pos.yielded  # a rebuilt stream skips what it had yielded
                for k, sample in enumerate(self.window_samples(self.pos.pass_, self.pos.window)):
                    got += 1
                    if k < skip:
                        continue
                    self.pos.yielded += 1
                    yield sample
                self.pos = Position(self.pos.pass_, self.pos.window + 1, 0)
            if whole and not got:
                raise TooManyBadSamples(
                    f"{self.kind}: stream {self.sid} of {self.n} (ranks x workers) found no readable samples "
                    f"in {[s for _, s in self.part]}; check these shards (a source needs at least one sample "
                    "per stream)")
            self.pos = Position(self.pos.pass_ + 1, 0, 0)
