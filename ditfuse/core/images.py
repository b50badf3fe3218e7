"""Image reading and encoding: 8/16-bit, 1/3/4 channels, PNG/JPEG/BMP/TIFF via OpenCV.

The one home for decoding images: the core (ditfuse.interop.pairs, `ditfuse fuse`) and the data
pipelines (datamodules, via datamodules.io) both read through it; imports point down.

Arrays are numpy in RGB order: (H, W) or (H, W, 3), uint8 or uint16; alpha is dropped. 16-bit
images stay 16-bit (thermal cameras use a narrow part of the range; the writers record it).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file or buffer that cannot be decoded."""


def _normalise(arr: np.ndarray | None, what: str) -> np.ndarray:
    if arr is None or arr.size == 0:
        raise ImageReadError(f"cannot decode image {what}")
    if arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):  # float TIFF: assume [0, 1]
            arr = (np.clip(np.nan_to_num(arr), 0, 1) * 65535).astype(np.uint16)
        else:
            raise ImageReadError(f"unsupported pixel type {arr.dtype} in {what}; use 8- or 16-bit images")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]  # drop alpha
        if arr.shape[2] != 3:
            raise ImageReadError(f"{what}: {arr.shape[2]} channels; use 1, 3 or 4")
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)  # OpenCV order -> RGB (faster than a numpy flip)
    return arr


def decode_image(data: bytes, what: str = "<bytes>") -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    except cv2.error as e:
        raise ImageReadError(f"cannot decode image {what}: {e}") from e
    return _normalise(arr, what)


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"cannot read {path}: {e}") from e
    return decode_image(data, str(path))


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of an RGB/grey uint8/uint16 array (16-bit stays 16-bit)."""
    if arr.ndim == 3:
        arr = np.ascontiguousarray(arr[:, :, ::-1])
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ImageReadError(f"cannot encode a {arr.dtype} {arr.shape} array as PNG")
    return buf.tobytes()


def value_range(arr: np.ndarray) -> tuple[int, int]:
    return int(arr.min()), int(arr.max())


def to_tensor(arr: np.ndarray, vrange: tuple[float, float] | None = None) -> Tensor:
    """(3, H, W) float32 in [0, 1]. Grey is replicated to 3 channels.

    16-bit images are stretched over `vrange` (the recorded range of the source; per-image min/max
    when None) so thermal contrast survives; 8-bit images are divided by 255.
    """
    x = torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint16:
        lo, hi = vrange if vrange is not None else (float(x.min()), float(x.max()))
        x = ((x - lo) / max(hi - lo, 1.0)).clamp(0.0, 1.0)
    else:
        x = x / 255.0
    x = x[None].expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)
    return x.contiguous()


def to_raw_tensor(arr: np.ndarray, vrange: tuple[float, float] | None = None) -> Tensor:
    """(C, H, W) with C in {1, 3}, without conversion work: 8-bit stays uint8 (a view of the
    array); 16-bit becomes float in [0, 1] over `vrange` (as in `to_tensor`). Crop first, then
    `float01` it: converting only the crop saves most of the per-sample copying."""
    if arr.dtype == np.uint16:
        x = to_tensor(arr, vrange)
        return x[:1] if arr.ndim == 2 else x
    t = torch.from_numpy(arr)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def float01(x: Tensor) -> Tensor:
    """A raw (C, H, W) plane (uint8 or float in [0, 1]) -> (3, H, W) float32 in [0, 1]."""
    if x.dtype == torch.uint8:
        # one pass from the (possibly HWC-strided) crop into a contiguous float tensor
        x = torch.empty(x.shape, dtype=torch.float32).copy_(x).mul_(1 / 255)
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def to_uint8(x: Tensor, truncate: bool = False) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, rounded; `truncate` floors as OmniGen's pipeline
    does (`(samples * 255).to(torch.uint8)`), on average half a level darker."""
    x = x.clamp(0, 1) * 255
    return (x if truncate else x + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
