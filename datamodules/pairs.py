"""`ditfuse predict` over folders of image pairs: finite, rank- and worker-sharded batches and a
predict DataModule.

Pair discovery, prompts and pre/post-processing live in the core (ditfuse.interop.pairs), shared with
`ditfuse fuse`; they are re-exported here so `from datamodules.pairs import ...` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.workers import end_workers_at_exit, ignore_stop_signals
from ditfuse.core.images import read_image
from ditfuse.interop.pairs import (  # noqa: F401 - re-exports for datamodules, callbacks and older imports
    DEFAULT_MAX_SIDE,
    PairFiles,
    PreparedPair,
    batch_pairs,
    find_pairs,
    image_size,
    make_prompt,
    pad_to,
    padded_size,
    pair_dirs,
    prepare_pair,
    processing_size,
    read_prompt_file,
    resize,
    restore,
)


# ---------------------------------------------------------------------------------------------
# `ditfuse predict`: finite, rank- and worker-sharded batches of pairs
# ---------------------------------------------------------------------------------------------
class PairBatches(IterableDataset):
    """Batches of same-size pairs; rank r of w gets batches r, r+w, ...; workers split a rank's share.

    Pairs are grouped by their padded processing size (rows of a batch must share it), so every
    pair lands in exactly one batch, and every batch on exactly one rank: each output is written once.
    Unreadable pairs are skipped with a warning (`skipped` lists them in the process that hit them).
    """

    def __init__(self, pairs: list[PairFiles], prompt: str, max_side: int, multiple: int, batch_size: int,
                 seed: int = 0) -> None:
        self.pairs, self.prompt, self.max_side, self.multiple = pairs, prompt, max_side, multiple
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = 0, 1
        self.skipped: list[tuple[str, str]] = []
        self._batches: list[list[PairFiles]] | None = None

    def batches(self) -> list[list[PairFiles]]:
        if self._batches is None:
            groups: dict[tuple[int, int], list[PairFiles]] = {}
            for p in self.pairs:
                try:
                    hw = padded_size(*processing_size(*image_size(p.image1), self.max_side), self.multiple)
                except Exception:  # noqa: BLE001 - reported when the pair is read
                    hw = (0, 0)
                groups.setdefault(hw, []).append(p)
            self._batches = [g[i:i + self.batch_size] for _, g in sorted(groups.items())
                             for i in range(0, len(g), self.batch_size)]
        return self._batches

    def shard(self) -> list[list[PairFiles]]:
        return self.batches()[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.shard())

    def _load(self, batch: list[PairFiles]) -> dict | None:
        items, names = [], []
        for p in batch:
            try:
                items.append(prepare_pair(read_image(p.image1), read_image(p.image2), self.max_side, self.multiple))
                names.append(p.name)
            except ValueError as e:
                self.skipped.append((p.name, str(e)))
                print(f"warning: skipping pair {p.name}: {e}", flush=True)
        if not items:
            return None
        out = batch_pairs(items, [self.prompt] * len(items), [self.seed] * len(items))
        out["key"] = names
        return out

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.shard()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        for batch in mine:
            loaded = self._load(batch)
            if loaded is not None:
                yield loaded


class PairsDataModule(L.LightningDataModule):
    """Predict-only DataModule over a folder of pairs (image1/ and image2/ with equal file names).

    Args:
        pairs_dir: folder with image1/ and image2/; or image1_dir + image2_dir.
        task / prompt / control / segment: the prompt, as `ditfuse fuse` builds it.
        max_side: processing resolution (long side), a multiple of the model's pixels per token.
        multiple: pixels per token (16 for OmniGen-v1, 4 for the tiny preset); None: the model's.
        batch_size: pairs per batch (same-size pairs only). seed: initial noise seed of every pair.
    """

    def __init__(self, pairs_dir: str | None = None, image1_dir: str | None = None, image2_dir: str | None = None,
                 task: str | None = "ivif", prompt: str | None = None, control: str | None = None,
                 segment: str | None = None, max_side: int = DEFAULT_MAX_SIDE, multiple: int | None = None,
                 batch_size: int = 1, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers >= 0")
        self.dir1, self.dir2 = pair_dirs(pairs_dir, image1_dir, image2_dir)
        self.prompt = make_prompt(None if segment else task, prompt, control, segment)
        self.max_side, self.multiple, self.batch_size = max_side, multiple, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.pairs, self.problems = find_pairs(self.dir1, self.dir2)
        for name, why in self.problems:
            print(f"warning: skipping {name}: {why}", flush=True)
        self.dataset: PairBatches | None = None

    def output_names(self) -> list[str]:
        """Keys of every pair (all ranks): the writer checks them before any sampling."""
        return [p.name for p in self.pairs]

    def _multiple(self) -> int:
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        multiple = self.multiple or int(getattr(model, "pixels_per_token", 16))
        if self.max_side < multiple or self.max_side % multiple:
            raise ValueError(f"data.max_side ({self.max_side}) must be a positive multiple of {multiple} "
                             "(the model's pixels per token)")
        return multiple

    def setup(self, stage: str | None = None) -> None:
        self.dataset = PairBatches(self.pairs, self.prompt, self.max_side, self._multiple(), self.batch_size,
                                   self.seed)
        if self.trainer is not None:
            self.dataset.rank, self.dataset.world_size = self.trainer.global_rank, self.trainer.world_size

    def predict_dataloader(self) -> DataLoader:
        if self.dataset is None:
            self.setup("predict")
        # batch_size=None: the dataset yields whole batches; an IterableDataset also keeps Lightning
        # from adding a DistributedSampler on top of the rank sharding done here.
        end_workers_at_exit()
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                          worker_init_fn=ignore_stop_signals)
