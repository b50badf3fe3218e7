"""Resolution buckets: training at the sizes and aspect ratios inference runs at.

A bucket is an (height, width) in pixels, both multiples of the model's pixels per token (16 for
OmniGen-v1: 8x VAE downsampling x 2x2 patches; 4 for the `tiny` preset: pixel_unshuffle by 2 x 2x2
patches). `data.buckets` is either a list of [h, w], or {max_pixels: P, aspect_ratios: [w/h, ...]},
which gives for each ratio r the largest (h, w) with h*w <= P and w/h ~ r.

Each sample goes to the bucket nearest its aspect ratio (in log space, so 2:1 and 1:2 are equally
far from 1:1); among buckets of that ratio, the largest that needs no more than `max_upscale`
upscaling. The image is resized to cover the bucket and cropped (datamodules.pipelines), and a
training batch holds one bucket (datamodules.mixing).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from datamodules.schema import SchemaError, image_field

Bucket = tuple[int, int]


class NoBucketError(SchemaError):
    """A sample that would need more upscaling than `max_upscale` for every bucket."""


def make_buckets(spec: Sequence[Sequence[int]] | dict | None, multiple: int = 16) -> list[Bucket] | None:
    """`data.buckets` -> sorted unique (h, w) buckets, checked; None when no buckets are configured."""
    if spec is None:
        return None
    if multiple < 1:
        raise ValueError(f"bucket_multiple must be >= 1, got {multiple}")
    if isinstance(spec, dict):
        buckets = _from_max_pixels(spec, multiple)
    else:
        buckets = [_pair(b) for b in spec]
    if not buckets:
        raise ValueError("buckets: empty; give a list of [h, w] or {max_pixels, aspect_ratios}")
    bad = [b for b in buckets if b[0] < multiple or b[1] < multiple or b[0] % multiple or b[1] % multiple]
    if bad:
        raise ValueError(f"buckets: {bad} are not positive multiples of bucket_multiple={multiple} (the model's "
                         f"pixels per token: 16 for omnigen-v1, 4 for tiny)")
    return sorted(set(buckets))


def _pair(b: Sequence[int]) -> Bucket:
    if isinstance(b, (str, bytes)) or len(b) != 2 or not all(isinstance(v, int) for v in b):
        raise ValueError(f"buckets: each entry must be [height, width] in pixels, got {b!r}")
    return int(b[0]), int(b[1])


def _from_max_pixels(spec: dict, multiple: int) -> list[Bucket]:
    unknown = set(spec) - {"max_pixels", "aspect_ratios"}
    if unknown or "max_pixels" not in spec:
        raise ValueError(f"buckets: a dict needs max_pixels and aspect_ratios (w/h), got keys {sorted(spec)}")
    pixels, ratios = int(spec["max_pixels"]), [float(r) for r in spec.get("aspect_ratios") or [1.0]]
    if pixels < multiple * multiple or any(r <= 0 for r in ratios):
        raise ValueError(f"buckets: max_pixels={pixels} must hold one {multiple}x{multiple} block and "
                         f"aspect_ratios {ratios} must be > 0")
    out = []
    for r in ratios:
        h = max(multiple, int(math.sqrt(pixels / r)) // multiple * multiple)
        w = max(multiple, int(pixels / h) // multiple * multiple)
        w = min(w, max(multiple, round(h * r / multiple) * multiple))  # stay near r, within the area
        out.append((h, w))
    return out


def choose_bucket(h: int, w: int, buckets: Sequence[Bucket], max_upscale: float) -> int:
    """Index of the bucket for an h x w image (see the module docstring)."""
    ar = math.log(w / h)

    def need(b: Bucket) -> float:  # scale that makes the image cover the bucket
        return max(b[0] / h, b[1] / w)

    order = sorted(range(len(buckets)), key=lambda i: (round(abs(math.log(buckets[i][1] / buckets[i][0]) - ar), 3),
                                                      -buckets[i][0] * buckets[i][1]))
    for i in order:
        if need(buckets[i]) <= max_upscale + 1e-9:
            return i
    smallest = min(buckets, key=lambda b: b[0] * b[1])
    raise NoBucketError(f"a {h}x{w} image needs {need(smallest):.2f}x upscaling even for the {smallest[0]}x"
                        f"{smallest[1]} bucket (data.max_upscale={max_upscale}); raise it or add smaller buckets")


def sample_hw(sample: dict) -> tuple[int, int]:
    """(h, w) of a raw sample's first image, from the file header (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    for stem in ("img", "img1"):
        name = image_field(sample, stem)
        if name is not None:
            try:
                with Image.open(io.BytesIO(sample[name])) as im:
                    return im.height, im.width
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise SchemaError(f"sample {sample.get('__key__')}: cannot read the size of {name} ({e})") from e
    raise SchemaError(f"sample {sample.get('__key__')}: no img/img1 image")
