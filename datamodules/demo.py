"""Offline demo shards from the photographs that ship inside scikit-image.

`build_demo(out)` writes `out/{train,val}/{fusion,m3,seg,control}/*.tar`. Validation photos never
appear in training. Fusion pairs are synthesised with a ground truth:
- multi-focus: complementary depth-like blur masks (smooth random field, soft edges);
- multi-exposure: an over- and an under-exposed rendition;
- infrared-visible: a pseudo-thermal 16-bit view with warm targets that hide in the visible view's
  shadows; the ground truth keeps the visible texture and shows the warm targets.
Seg samples paint `skimage.draw.random_shapes` shapes into a photo ("Segment the circle in the
image."); control samples derive from fusion-with-target and clean M3 samples (op drawn on the fly).
Crops are small (96 px by default) so the build takes seconds; the CPU demo trains at 32x32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata
from skimage.draw import random_shapes

from datamodules.io import encode_png
from datamodules.schema import KINDS
from datamodules.writers import json_bytes, write_samples
from ditfuse.core.prompts import CONTROL_SUBTASKS, FUSION_TASKS

# cat == chelsea in skimage: never split them apart
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "retina", "colorwheel", "camera",
                "moon", "grass", "gravel", "brick", "cell", "clock", "text", "page")
VAL_PHOTOS = ("chelsea", "coins", "immunohistochemistry")
SHAPES = {1: "circle", 2: "rectangle", 3: "triangle", 4: "ellipse"}
THERMAL_RANGE = (3000, 12000)  # pseudo 16-bit sensor counts: the range is recorded in the json

# samples per split: train per kind (fusion: per task), val per task
TRAIN_COUNTS = {"fusion": 64, "m3": 128, "seg": 96, "control": 96}
VAL_PER_TASK = 8

Image = np.ndarray  # (H, W, 3) float32 in [0, 1]


def _photo(name: str, short_side: int) -> Image:
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, 2)
    img = img[..., :3].astype(np.float32) / 255.0
    s = short_side / min(img.shape[:2])
    return cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)


def _crops(photos: list[Image], rng: np.random.Generator, size: int) -> Iterator[Image]:
    while True:
        p = photos[rng.integers(len(photos))]
        y, x = rng.integers(p.shape[0] - size + 1), rng.integers(p.shape[1] - size + 1)
        c = p[y:y + size, x:x + size]
        yield np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c)


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """(size, size) smooth random field in [0, 1] (bicubic upsampled coarse noise)."""
    f = cv2.resize(rng.random((cells, cells)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def _u8(img: Image) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-3 anisotropic Gaussian 'warm targets', (size, size) in [0, 1]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        sy, sx = rng.uniform(0.04, 0.12, 2) * size
        out = np.maximum(out, np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2)))
    return out


# ---------------------------------------------------------------------------------------------
# synthetic pairs: (img1, img2, target) with img1 = visible / far-focus / over-exposed
# ---------------------------------------------------------------------------------------------
def synth_mff(img: Image, rng: np.random.Generator) -> tuple[Image, Image, Image]:
    m = (_smooth_field(rng, img.shape[0]) > 0.5).astype(np.float32)
    m = cv2.GaussianBlur(m, (0, 0), 1.5)[..., None]  # soft depth edges
    blur = cv2.GaussianBlur(img, (0, 0), rng.uniform(1.5, 3.0))
    return m * img + (1 - m) * blur, (1 - m) * img + m * blur, img


def synth_mef(img: Image, rng: np.random.Generator) -> tuple[Image, Image, Image]:
    over = np.clip(img ** rng.uniform(0.35, 0.6) * rng.uniform(1.2, 1.5), 0, 1)
    under = img ** rng.uniform(1.8, 2.6) * rng.uniform(0.3, 0.5)
    return over, under, img


def synth_ivif(img: Image, rng: np.random.Generator) -> tuple[Image, np.ndarray, Image]:
    """Visible RGB, a 16-bit grey pseudo-thermal view, and the ground truth."""
    size = img.shape[0]
    hot = _blobs(rng, size)
    grey = cv2.GaussianBlur(img.mean(2), (0, 0), 2.0)
    thermal = np.clip(0.35 * grey + 0.15 * _smooth_field(rng, size) + 0.6 * hot, 0, 1)
    lo, hi = THERMAL_RANGE
    thermal16 = (lo + thermal * (hi - lo)).astype(np.uint16)
    a = (0.7 * hot)[..., None]
    visible = img * (1 - a)  # warm targets hide in shadow in the visible view
    target = np.clip(img * (1 - a) + a * np.array([1.0, 0.92, 0.85], np.float32), 0, 1)
    return visible, thermal16, target


def synth_seg(img: Image, rng: np.random.Generator) -> tuple[Image, Image, np.ndarray]:
    """Photo with painted shapes, a pseudo-thermal view (shapes warm), and the label map."""
    size = img.shape[0]
    labels = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(1, len(SHAPES) + 1))
        shape_img, _ = random_shapes((size, size), 1, min_size=size // 6, max_size=size // 2,
                                     shape=SHAPES[label], num_channels=1, channel_axis=None,
                                     intensity_range=(0, 0), rng=int(rng.integers(2**31)))
        labels[shape_img == 0] = label
    colours = rng.uniform(0, 1, (len(SHAPES) + 1, 3)).astype(np.float32)
    on = (labels > 0)[..., None]
    img1 = np.where(on, 0.3 * img + 0.7 * colours[labels], img)
    grey = cv2.GaussianBlur(img.mean(2), (0, 0), 2.0)
    img2 = np.repeat(np.clip(0.4 * grey + 0.5 * (labels > 0) + 0.05, 0, 1)[..., None], 3, 2)
    return img1, img2, labels


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def _fusion_files(task: str, img: Image, rng: np.random.Generator, name: str) -> dict[str, bytes]:
    meta = {"task": task, "dataset": "skimage-demo", "name": name}
    if task == "ivif":
        vis, thermal16, target = synth_ivif(img, rng)
        meta["ranges"] = {"img2": list(THERMAL_RANGE)}
        files = {"img1.png": encode_png(_u8(vis)), "img2.png": encode_png(thermal16),
                 "target.png": encode_png(_u8(target))}
    else:
        a, b, t = (synth_mff if task == "mff" else synth_mef)(img, rng)
        files = {"img1.png": encode_png(_u8(a)), "img2.png": encode_png(_u8(b)), "target.png": encode_png(_u8(t))}
    return {**files, "json": json_bytes(meta)}


def _seg_files(img: Image, rng: np.random.Generator, name: str) -> dict[str, bytes]:
    a, b, labels = synth_seg(img, rng)
    present = {str(k): SHAPES[k] for k in np.unique(labels).tolist() if k}
    meta = {"classes": {"0": "background", **present}, "dataset": "skimage-demo", "name": name}
    return {"img1.png": encode_png(_u8(a)), "img2.png": encode_png(_u8(b)),
            "mask.png": encode_png(labels), "json": json_bytes(meta)}


def _m3_files(img: Image, name: str) -> dict[str, bytes]:
    return {"img.png": encode_png(_u8(img)), "json": json_bytes({"dataset": "skimage-demo", "name": name})}


def _control_files(img: Image, rng: np.random.Generator, name: str, subtask: str | None) -> dict[str, bytes]:
    """Derived control source: a fusion-with-target triple or a clean M3 image; op applied on the fly."""
    if rng.random() < 0.5:
        files = _fusion_files(str(rng.choice(FUSION_TASKS)), img, rng, name)
    else:
        files = _m3_files(img, name)
    if subtask is not None:  # validation: fixed subtask, target still derived from the base
        import json

        meta = json.loads(files["json"])
        files["json"] = json_bytes({**meta, "subtask": subtask, "derive": True})
    return files


def _split_samples(kind: str, photos: list[Image], rng: np.random.Generator, size: int,
                   counts: dict[str, int], split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    crops = _crops(photos, rng, size)
    if kind == "fusion":
        for task in FUSION_TASKS:
            for i in range(counts[task]):
                yield f"{split}_{task}_{i:05d}", _fusion_files(task, next(crops), rng, f"{task}_{i}")
    elif kind == "m3":
        for i in range(counts["m3"]):
            yield f"{split}_m3_{i:05d}", _m3_files(next(crops), f"m3_{i}")
    elif kind == "seg":
        for i in range(counts["seg"]):
            yield f"{split}_seg_{i:05d}", _seg_files(next(crops), rng, f"seg_{i}")
    else:
        for i in range(counts["control"]):
            sub = CONTROL_SUBTASKS[i % len(CONTROL_SUBTASKS)] if split == "val" else None
            yield f"{split}_control_{i:05d}", _control_files(next(crops), rng, f"control_{i}", sub)


def build_demo(out: str | Path, *, seed: int = 0, crop: int = 96, scale: float = 1.0,
               shard_size: int = 64) -> dict[str, int]:
    """Write the demo shards; returns {split/kind: samples}. `scale` multiplies the sample counts."""
    out = Path(out)
    t0 = time.time()
    counts = {
        "train": {**{t: max(1, round(TRAIN_COUNTS["fusion"] * scale)) for t in FUSION_TASKS},
                  **{k: max(1, round(TRAIN_COUNTS[k] * scale)) for k in ("m3", "seg", "control")}},
        "val": {t: VAL_PER_TASK for t in (*FUSION_TASKS, "m3", "seg", "control")},
    }
    written: dict[str, int] = {}
    for split, names in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        photos = [_photo(n, 2 * crop) for n in names]
        for k_i, kind in enumerate(KINDS):
            # one generator per (split, kind): adding samples to one kind leaves the others unchanged
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, k_i])
            samples = list(_split_samples(kind, photos, rng, crop, counts[split], split))
            if split == "train":  # interleave tasks so every shard (and so every worker) sees all
                samples = [samples[i] for i in rng.permutation(len(samples))]
            write_samples(kind, samples, out / split / kind, shard_size)
            written[f"{split}/{kind}"] = len(samples)
    written["seconds"] = round(time.time() - t0, 2)  # type: ignore[assignment]
    return written


def demo_ready(out: str | Path) -> bool:
    out = Path(out)
    return all(any((out / split / kind).glob("*.tar")) for split in ("train", "val") for kind in KINDS)


def demo_shards(out: str | Path, split: str = "train") -> dict[str, str]:
    """kind -> glob pattern of the demo shards of a split (what a DataModule config would set)."""
    return {kind: str(Path(out) / split / kind / f"{kind}-*.tar") for kind in KINDS}
