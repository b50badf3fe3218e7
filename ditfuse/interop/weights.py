"""Safetensors weights checked without loading them, loaded without copying them.

- `read_header`: the JSON header of a .safetensors file (format: 8-byte little-endian header
  length, JSON header, one byte buffer indexed by `data_offsets`; github.com/huggingface/safetensors
  README "Format"), each tensor's byte span checked against its dtype and shape and the buffer's
  end against the file size: a truncated or corrupt file is named before any allocation.
- `load_mmap`: every tensor as a view of one private (copy-on-write) mmap of the file. Nothing is
  read until used, and the pages are the kernel's page cache, shared by every process that maps
  the same file: 8 ranks of a node loading a 7.6 GB bf16 release hold one copy, not eight
  (safetensors' own `load_file` copies each tensor into process memory).
- `check_host_ram`: the bytes a load will need against MemAvailable, one line with both figures
  instead of an OOM kill.

Pure file and memory arithmetic: no Lightning, no model code.
"""

from __future__ import annotations

import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

HEADER_BYTES = 8  # u64 little-endian length of the JSON header (safetensors format)
MAX_HEADER = 100_000_000  # safetensors refuses headers above 100 MB (safetensors/src/tensor.rs)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
GIB = 1024**3


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a .safetensors file; ValueError naming the file when it is truncated
    or its header does not index its bytes."""
    p = Path(path)
    size = p.stat().st_size
    again = "copy or download the file again"
    if size < HEADER_BYTES:
        raise ValueError(f"{p} has {size} bytes, not even a safetensors header; {again}")
    with p.open("rb") as f:
        n = int.from_bytes(f.read(HEADER_BYTES), "little")
        if n > min(MAX_HEADER, size - HEADER_BYTES):
            raise ValueError(f"{p}: its header says {n} header bytes but the file has {size} bytes "
                             f"(truncated, or not a safetensors file); {again}")
        try:
            raw = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{p}: the safetensors header is not valid JSON ({err}); {again}") from None
    raw.pop("__metadata__", None)
    base = HEADER_BYTES + n
    infos = {k: _info(p, k, v, base) for k, v in raw.items()}
    end = max((i.end for i in infos.values()), default=base)
    if end > size:
        last = max(infos, key=lambda k: infos[k].end)
        raise ValueError(f"{p} is truncated: {size:,} bytes on disk, its header indexes {end:,} "
                         f"(tensor {last!r} ends past the end of the file); {again}")
    return infos


def _info(path: Path, name: str, entry: dict, base: int) -> TensorInfo:
    if entry.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}; expected one of {', '.join(DTYPES)}")
    dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
    start, end = entry["data_offsets"]
    need = math.prod(shape) * dtype.itemsize
    if end - start != need:
        raise ValueError(f"{path}: tensor {name!r} spans {end - start} bytes but {entry['dtype']} {list(shape)} "
                         f"needs {need}; the file is corrupt, copy it again")
    return TensorInfo(dtype, shape, base + start, base + end)


def load_mmap(path: str | Path, infos: dict[str, TensorInfo] | None = None) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file as a view of one copy-on-write mmap (zero copy).

    ACCESS_COPY (MAP_PRIVATE): the pages are the shared page cache until a process writes one,
    which then gets its own copy of that page only; the file itself is never written. A tensor
    keeps the mmap alive (torch.frombuffer holds the buffer)."""
    p = Path(path)
    infos = read_header(p) if infos is None else infos
    with p.open("rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if p.stat().st_size else None
    out: dict[str, Tensor] = {}
    for name, i in infos.items():
        numel = math.prod(i.shape)
        if numel == 0:
            out[name] = torch.empty(i.shape, dtype=i.dtype)
            continue
        # offsets of one dtype are multiples of its size in files safetensors writes (it sorts by
        # alignment); frombuffer needs nothing more
        out[name] = torch.frombuffer(mm, dtype=i.dtype, count=numel, offset=i.start).view(i.shape)
    return out


def mem_available() -> int:
    """Bytes the kernel can hand out without swapping (/proc/meminfo MemAvailable: free memory plus
    reclaimable page cache); 0 where /proc is absent (then no check is made)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_bytes(infos: dict[str, TensorInfo], dtype: torch.dtype | None) -> tuple[int, int]:
    """(bytes mapped from the file, bytes of private copies) a load into `dtype` makes: a tensor
    already stored in `dtype` (or any with dtype None) stays a view of the shared mmap; the others
    are converted into process memory."""
    mapped = sum(i.nbytes for i in infos.values())
    copied = 0
    if dtype is not None:
        copied = sum(math.prod(i.shape) * dtype.itemsize for i in infos.values()
                     if i.dtype.is_floating_point and i.dtype != dtype)
    return mapped, copied


def human(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def check_host_ram(what: str, need: int, setting: str) -> None:
    """MemoryError (one line, both figures) when `need` bytes exceed MemAvailable."""
    avail = mem_available()
    if avail and need > avail:
        raise MemoryError(f"{what} needs {human(need)} of host RAM but only {human(avail)} is available "
                          f"(MemAvailable); free memory, run fewer processes per node, or {setting}")
