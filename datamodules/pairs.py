"""Folders of image pairs for inference: pairing, prompts, pre/post-processing, a predict DataModule.

Shared by `ditfuse fuse` (ditfuse/inference.py) and `ditfuse predict --config configs/predict.yaml`
so both see a pair exactly the same way:

1. read (8/16-bit, 1/3/4 channels, PNG/JPEG/BMP/TIFF; datamodules.io), grey -> RGB;
2. image 2 is resized to image 1's size when they differ (the caller warns);
3. the pair is scaled down (never up) so its long side fits `max_side`, then padded (reflect) on
   the bottom/right to a multiple of the model's pixels per token (16 for OmniGen-v1);
4. the fused output is cropped back and resized to image 1's original size.

Padding instead of a second resize keeps pixels aligned 1:1 when no scaling is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from datamodules.io import IMAGE_EXTS, read_image, to_tensor, to_uint8
from ditfuse.prompts import (
    CONTROL_SUBTASKS,
    FUSION_TASKS,
    IMAGE_1,
    IMAGE_2,
    build_prompt,
    default_prompt,
    instruction_for,
)

DEFAULT_MAX_SIDE = 1024  # DiTFuse/OmniGen sample at a 1024 px long side


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
def make_prompt(task: str | None = None, prompt: str | None = None, control: str | None = None,
                segment: str | None = None) -> str:
    """The DiTFuse prompt for the `ditfuse fuse` / predict options.

    - `segment`: "[SEG]. ... Segment the CLASS in the image." (alone);
    - `control`: "[CONTROL]. <LIGHT+>. ..." with the fusion instruction of `task` (M3's when None);
    - `prompt`: used verbatim when it holds both image placeholders, else it is the instruction
      (XXX) of the template, tagged as `task` ([FUSION] without a subtask when no task is given);
    - `task` alone: the published instruction of ivif / mff / mef.
    """
    if segment is not None:
        if task or control or prompt:
            raise ValueError("--segment builds its own prompt: drop --task/--control/--prompt")
        return default_prompt("seg", cls=segment)
    if task is not None and task not in FUSION_TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(FUSION_TASKS)}")
    if control is not None:
        if control not in CONTROL_SUBTASKS:
            raise ValueError(f"unknown control {control!r}: use one of {', '.join(CONTROL_SUBTASKS)}")
        if prompt:
            raise ValueError("--control builds its own prompt: drop --prompt (or write the control tags in it)")
        text = instruction_for("control", subtask=control, base_task=task or "m3")
        return build_prompt("control", text, subtask=control)
    if prompt is not None:
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("the prompt is empty")
        if IMAGE_1 in prompt and IMAGE_2 in prompt:
            return prompt
        if "<|image_" in prompt:
            raise ValueError(f"a full prompt must contain both {IMAGE_1} and {IMAGE_2}; or give only the "
                             "instruction and the template is added")
        return build_prompt(task or "m3", prompt)
    if task is None:
        raise ValueError("say what to do: --task ivif|mff|mef, --prompt, --prompt-file, --control or --segment")
    return default_prompt(task)


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-empty lines that do not start with '#'."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path}: {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line, '#' starts a comment)")
    return prompts


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------
@dataclass
class PairFiles:
    name: str  # image 1's stem: the output is <name>.png
    image1: Path
    image2: Path


def _images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTS}


def pair_dirs(pairs_dir: str | Path | None = None, image1_dir: str | Path | None = None,
              image2_dir: str | Path | None = None) -> tuple[Path, Path]:
    if pairs_dir is not None:
        if image1_dir or image2_dir:
            raise ValueError("give --pairs-dir or --image1-dir/--image2-dir, not both")
        image1_dir, image2_dir = Path(pairs_dir) / "image1", Path(pairs_dir) / "image2"
    if image1_dir is None or image2_dir is None:
        raise ValueError("folder mode needs --pairs-dir DIR (with image1/ and image2/) or both --image1-dir "
                         "and --image2-dir")
    for d in (Path(image1_dir), Path(image2_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"folder {d} does not exist")
    return Path(image1_dir), Path(image2_dir)


def find_pairs(image1_dir: Path, image2_dir: Path) -> tuple[list[PairFiles], list[tuple[str, str]]]:
    """Pairs by equal file name (or equal stem when the extensions differ), and the problems:
    (name, reason) for files without a partner."""
    ones, twos = _images(image1_dir), _images(image2_dir)
    twos_by_stem: dict[str, list[Path]] = {}
    for p in twos.values():
        twos_by_stem.setdefault(p.stem, []).append(p)
    pairs, problems, used = [], [], set()
    for name, p1 in ones.items():
        match = twos.get(name) or (twos_by_stem.get(p1.stem, [None])[0]
                                   if len(twos_by_stem.get(p1.stem, [])) == 1 else None)
        if match is None:
            problems.append((name, f"no partner in {image2_dir}"))
            continue
        used.add(match.name)
        pairs.append(PairFiles(p1.stem, p1, match))
    problems += [(n, f"no partner in {image1_dir}") for n in twos if n not in used]
    stems: dict[str, int] = {}
    for p in pairs:
        stems[p.name] = stems.get(p.name, 0) + 1
    for p in pairs:  # a.png and a.jpg in image1/ would write the same a.png
        if stems[p.name] > 1:
            p.name = p.image1.name.replace(".", "_")
    return pairs, problems


# ---------------------------------------------------------------------------------------------
# Pre/post-processing
# ---------------------------------------------------------------------------------------------
def processing_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) after scaling down (never up) so that max(h, w) <= max_side."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., 3, H, W) -> (..., 3, h, w), antialiased bicubic (bilinear for 1-pixel sides)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    mode = "bicubic" if min(*x.shape[-2:], *size) > 1 else "bilinear"
    out = F.interpolate(flat, size=size, mode=mode, antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def pad_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Pad (..., H, W) on the bottom/right to `size`: reflect, or replicate where the image is too small."""
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    flat = x.reshape(-1, *x.shape[-3:])
    return F.pad(flat, (0, pw, 0, ph), mode=mode).reshape(*x.shape[:-2], *size)


@dataclass
class PreparedPair:
    images: Tensor  # (2, 3, Hp, Wp) in [-1, 1], Hp and Wp multiples of the model's pixels per token
    original_hw: tuple[int, int]  # image 1's size: the output size
    content_hw: tuple[int, int]  # size before padding
    image2_resized_from: tuple[int, int] | None = None  # image 2's own size when it differed


def prepare_pair(image1: np.ndarray, image2: np.ndarray, max_side: int, multiple: int) -> PreparedPair:
    """Arrays from `read_image` -> a model-ready pair (see the module docstring)."""
    a, b = to_tensor(image1), to_tensor(image2)  # (3, H, W) in [0, 1]
    H, W = a.shape[-2:]
    resized_from = None
    if b.shape[-2:] != a.shape[-2:]:
        resized_from = tuple(b.shape[-2:])
        b = resize(b, (H, W)).clamp(0, 1)
    content = processing_size(H, W, max_side)
    pair = resize(torch.stack([a, b]), content).clamp(0, 1)
    pair = pad_to(pair, padded_size(*content, multiple))
    return PreparedPair(pair * 2 - 1, (H, W), content, resized_from)


def restore(output: Tensor, content_hw: tuple[int, int], original_hw: tuple[int, int]) -> np.ndarray:
    """Model output (3, Hp, Wp) in [-1, 1] -> (H, W, 3) uint8 at image 1's original size."""
    x = output.detach().float().cpu()[:, : content_hw[0], : content_hw[1]]
    x = resize(x, original_hw)
    return to_uint8((x + 1) / 2)


def batch_pairs(items: list[PreparedPair], prompts: list[str], seeds: list[int] | None = None) -> dict:
    """A predict batch (equal padded sizes): prompt, images (B, 2, 3, Hp, Wp), seed, sizes."""
    return {"prompt": list(prompts), "images": torch.stack([it.images for it in items]),
            "seed": seeds, "original_hw": [it.original_hw for it in items],
            "content_hw": [it.content_hw for it in items]}


# ---------------------------------------------------------------------------------------------
# `ditfuse predict`: finite, rank- and worker-sharded batches of pairs
# ---------------------------------------------------------------------------------------------
def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header (no decoding); falls back to a full read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001 - any header PIL cannot parse: decode with OpenCV
        arr = read_image(path)
        return arr.shape[0], arr.shape[1]


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
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)
