"""Image pairs for inference: pairing, prompts, pre/post-processing (no Lightning).

The one home for reading pairs: `ditfuse fuse` (ditfuse/commands/fuse.py) and `ditfuse predict`
(datamodules/pairs.py's DataModule) import it, so both see a pair exactly the same way:

1. read (8/16-bit, 1/3/4 channels, PNG/JPEG/BMP/TIFF; ditfuse.core.images), grey -> RGB;
2. image 2 is resized to image 1's size when they differ (the caller warns);
3. the pair is scaled down (never up) so its long side fits `max_side`, then padded (reflect) on
   the bottom/right to a multiple of the model's pixels per token (16 for OmniGen-v1);
4. the fused output is cropped back and resized to image 1's original size.

Padding instead of a second resize keeps pixels aligned 1:1 when no scaling is needed.

`prepare_official` is the official DiTFuse test.py instead (`ditfuse fuse --official`): the long
side goes to `max_side` up or down, sides are floored to multiples of 16 (LANCZOS per image), and
the output stays at that size.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ditfuse.core.images import IMAGE_EXTS, read_image, to_tensor, to_uint8
from ditfuse.core.prompts import (
    CONTROL_SUBTASKS,
    FUSION_TASKS,
    IMAGE_1,
    IMAGE_2,
    build_prompt,
    default_prompt,
    instruction_for,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # `--dtype` names


class FuseError(Exception):
    """A problem the user fixes by changing an option or a file; printed as one line."""


def _stderr_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


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
    original_hw: tuple[int, int]  # the output size (image 1's; test.py's processing size when official)
    content_hw: tuple[int, int]  # size before padding
    image2_resized_from: tuple[int, int] | None = None  # image 2's own size when it differed
    sample_hw: tuple[int, int] | None = None  # size to sample at when not the inputs' (official, > 1024)
    truncate: bool = False  # write uint8 by truncation (the official pipeline) instead of rounding

    @property
    def batch_key(self) -> tuple:
        """Pairs with equal keys can be sampled in one batch (`batch_pairs`): same padded inputs,
        same sampling size."""
        return tuple(self.images.shape), self.sample_hw


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


def restore(output: Tensor, content_hw: tuple[int, int], original_hw: tuple[int, int],
            truncate: bool = False) -> np.ndarray:
    """Model output (3, Hp, Wp) in [-1, 1] -> (H, W, 3) uint8 at image 1's original size."""
    x = output.detach().float().cpu()[:, : content_hw[0], : content_hw[1]]
    x = resize(x, original_hw)
    return to_uint8(x * 0.5 + 0.5, truncate=truncate)  # OmniGen's `samples * 0.5 + 0.5`


# ---------------------------------------------------------------------------------------------
# The official DiTFuse test.py pre-processing (`ditfuse fuse --official`)
# ---------------------------------------------------------------------------------------------
OFFICIAL_MULTIPLE = 16  # test.py floors sides to multiples of 16
OFFICIAL_MAX_INPUT = 1024  # OmniGenProcessor's max_image_size (test.py keeps the default)


def official_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) of test.py's prepare_image_for_model: scale so the long side is `max_side` (up or
    down), round each side, floor it to a multiple of 16 (at least 16)."""
    scale = float(max_side) / float(max(height, width))
    floor16 = lambda x: max(OFFICIAL_MULTIPLE, int(round(x * scale)) // OFFICIAL_MULTIPLE * OFFICIAL_MULTIPLE)
    return floor16(height), floor16(width)


def _pil_rgb8(arr: np.ndarray) -> Image.Image:
    """An RGB 8-bit PIL image, as test.py's `Image.open(p).convert("RGB")` gives for 8-bit files
    (16-bit ones are stretched like to_tensor, where PIL's conversion would clip them)."""
    if arr.dtype != np.uint8 or arr.ndim == 2:
        arr = to_uint8(to_tensor(arr))
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def processor_crop(img: Image.Image, max_image_size: int = OFFICIAL_MAX_INPUT) -> Image.Image:
    """OmniGenProcessor's input-image rule (OmniGen/utils.py crop_arr): halve with BOX while the
    short side is >= 2x the limit, scale the long side down to it (BICUBIC), up to a 16 px short
    side, then centre-crop both sides to multiples of 16. A no-op on test.py's sizes <= 1024."""
    while min(img.size) >= 2 * max_image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    if max(img.size) > max_image_size:
        scale = max_image_size / max(img.size)
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    if min(img.size) < 16:
        scale = 16 / min(img.size)
        img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w % 16) // 2, (h % 16) // 2
    return img.crop((left, top, left + w - w % 16, top + h - h % 16))


def _official_tensor(img: Image.Image) -> Tensor:
    """torchvision ToTensor + Normalize(0.5, 0.5), as OmniGenProcessor: (3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def prepare_official(image1: np.ndarray, image2: np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> PreparedPair:
    """A pair as test.py feeds it to OmniGenPipeline (see official_size); the output is written at
    the processing size, by truncation. Image 2 is first resized to image 1's size when they
    differ (the model takes equal-size inputs; test.py would resize each on its own)."""
    a, b = _pil_rgb8(image1), _pil_rgb8(image2)
    resized_from = None
    if b.size != a.size:
        resized_from = (b.height, b.width)
        b = b.resize(a.size, resample=Image.LANCZOS)
    h, w = official_size(a.height, a.width, max_side)
    if (h, w) != (a.height, a.width):  # test.py returns the image untouched when nothing changes
        a, b = a.resize((w, h), resample=Image.LANCZOS), b.resize((w, h), resample=Image.LANCZOS)
    inputs = torch.stack([_official_tensor(processor_crop(x)) for x in (a, b)])
    sample_hw = None if tuple(inputs.shape[-2:]) == (h, w) else (h, w)
    return PreparedPair(inputs, (h, w), (h, w), resized_from, sample_hw=sample_hw, truncate=True)


def batch_pairs(items: list[PreparedPair], prompts: list[str], seeds: list[int] | None = None) -> dict:
    """A predict batch (equal padded sizes): prompt, images (B, 2, 3, Hp, Wp), seed, sizes."""
    return {"prompt": list(prompts), "images": torch.stack([it.images for it in items]),
            "seed": seeds, "original_hw": [it.original_hw for it in items],
            "content_hw": [it.content_hw for it in items]}


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header (no decoding); falls back to a full read."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception:
        arr = read_image(path)
        return arr.shape[0], arr.shape[1]
