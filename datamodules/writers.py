"""Shard writers: folder data sets -> WebDataset tars `{kind}-%06d.tar` (SHARDS.md).

Each writer validates as it goes (unpaired names, unreadable images, size mismatch), skips what
fails and reports it. Images already in PNG/JPEG are stored byte-for-byte; BMP/TIFF are re-encoded
as PNG (16-bit stays 16-bit). 16-bit images get their value range recorded in the json (`ranges`)
so the loader can stretch thermal images without losing their contrast.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from datamodules.io import (
    IMAGE_EXTS,
    ImageReadError,
    encode_png,
    read_image,
    value_range,
)
from datamodules.schema import FUSION_FALLBACKS, NOT_A_CLASS
from ditfuse.core.prompts import CONTROL_SUBTASKS, FUSION_TASKS


class TarShardWriter:
    """Writes samples into `out/{kind}-000000.tar`, `-000001.tar`, ... through webdataset's
    `ShardWriter`: a new shard starts after `shard_size` samples or once a shard holds
    `max_bytes` bytes of payload (the sample that crosses it stays whole, in the shard it started).

    Members get a fixed mtime (0) so the same input gives byte-identical shards. The first shard is
    opened with the first sample: nothing written leaves no empty tar behind.
    """

    def __init__(self, out: str | Path, kind: str, shard_size: int = 1000, max_bytes: float | None = None):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"--max-shard-bytes must be > 0, got {max_bytes}")
        self.out, self.kind, self.shard_size = Path(out), kind, shard_size
        self.max_bytes = float(max_bytes) if max_bytes else 3e12  # ShardWriter needs a number
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []
        self.count = 0
        self._sink: wds.ShardWriter | None = None
        self._file = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits keys there)")
        if self._sink is None:
            pattern = str(self.out / f"{self.kind}-%06d.tar")
            self._sink = wds.ShardWriter(pattern, maxcount=self.shard_size, maxsize=self.max_bytes, verbose=0,
                                         encoder=False, mtime=0, user="", group="", mode=0o644,
                                         opener=self._open)
        self._sink.write({"__key__": key, **files})
        self.count += 1

    def _open(self, fname: str):
        # ShardWriter closes the previous tar before it opens the next file, but never closes a
        # file that `opener` gave it: that is ours to do
        self._close_file()
        self.paths.append(Path(fname))
        self._file = open(fname, "wb")  # noqa: SIM115 - closed in _close_file
        return self._file

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._close_file()

    def __enter__(self) -> TarShardWriter:  # noqa: PYI034 - final class, py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare_out(out: str | Path, kind: str, overwrite: bool = False) -> Path:
    """Check `out` before any work: writable, and holding no `{kind}-*.tar` unless `overwrite`,
    which removes them (a smaller rewrite must not leave stale higher-numbered shards)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable; choose another --out")
    old = sorted(out.glob(f"{kind}-*.tar"))
    if old and not overwrite:
        raise ValueError(f"--out {out} already holds {len(old)} {kind} shard(s) ({old[0].name}, ...); pass "
                         "--overwrite to replace them, or choose another --out")
    for p in old:
        p.unlink()
    return out


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# folder readers
# ---------------------------------------------------------------------------------------------
@dataclass
class WriteReport:
    kind: str
    out: Path
    written: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason].append(name)

    def summary(self) -> str:
        lines = [f"{self.kind}: wrote {self.written} samples in {len(self.shards)} shard(s) to {self.out}"]
        for reason, names in sorted(self.skipped.items()):
            shown = ", ".join(names[:5]) + (f", ... (+{len(names) - 5})" if len(names) > 5 else "")
            lines.append(f"  skipped {len(names)} ({reason}): {shown}")
        if not self.skipped:
            lines.append("  skipped 0")
        return "\n".join(lines)


def list_images(folder: str | Path, recursive: bool = False) -> dict[str, Path]:
    """stem -> path of the images in a folder (stems with several extensions: the first, sorted)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(folder.rglob("*") if recursive else folder.iterdir())
    out: dict[str, Path] = {}
    for p in files:
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            stem = str(p.relative_to(folder).with_suffix("")) if recursive else p.stem
            out.setdefault(stem, p)
    return out


def pair_folders(folders: dict[str, str | Path | None], report: WriteReport) -> list[tuple[str, dict[str, Path]]]:
    """Match files by name across folders; names missing from some folder are reported unpaired."""
    listed = {role: list_images(f) for role, f in folders.items() if f is not None}
    names = sorted(set().union(*(set(v) for v in listed.values())))
    pairs = []
    for name in names:
        missing = [role for role, imgs in listed.items() if name not in imgs]
        if missing:
            report.skip("unpaired name", f"{name} (no {'/'.join(missing)})")
        else:
            pairs.append((name, {role: imgs[name] for role, imgs in listed.items()}))
    return pairs


def _stored(arr: np.ndarray, path: Path) -> tuple[str, bytes]:
    """(extension, bytes) to store: PNG/JPEG as is, anything else re-encoded as PNG."""
    ext = path.suffix.lower().lstrip(".")
    if ext in ("png", "jpg", "jpeg"):
        return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    return "png", encode_png(arr)


def _sample_key(name: str) -> str:
    return name.replace("/", "__").replace(".", "_").replace(" ", "_")


def _load_group(paths: dict[str, Path], report: WriteReport, name: str) -> tuple[dict[str, bytes], dict] | None:
    """Read every role's image; None (and a report entry) if one is unreadable or sizes differ."""
    files, ranges, shapes = {}, {}, {}
    for role, path in paths.items():
        try:
            arr = read_image(path)
        except ImageReadError:
            report.skip("unreadable image", str(path))
            return None
        shapes[role] = arr.shape[:2]
        ext, data = _stored(arr, path)
        files[f"{role}.{ext}"] = data
        if arr.dtype == np.uint16 and role != "mask":
            ranges[role] = list(value_range(arr))
    if len(set(shapes.values())) > 1:
        report.skip("size mismatch", f"{name} {dict(shapes)}")
        return None
    return files, ({"ranges": ranges} if ranges else {})


def _write_all(kind: str, groups: list[tuple[str, dict[str, Path]]], out: str | Path, shard_size: int,
               meta_for, report: WriteReport, progress: bool = True, max_bytes: float | None = None) -> WriteReport:
    with TarShardWriter(out, kind, shard_size, max_bytes) as w:
        for name, paths in tqdm(groups, desc=f"shards {kind}", unit="sample", file=sys.stderr,
                                disable=not progress):
            loaded = _load_group(paths, report, name)
            if loaded is None:
                continue
            files, extra = loaded
            meta = {**meta_for(name), **extra}
            w.write(_sample_key(name), {**files, "json": json_bytes(meta)})
            report.written += 1
        report.shards = list(w.paths)
    return report


# ---------------------------------------------------------------------------------------------
# the four writers
# ---------------------------------------------------------------------------------------------
def write_fusion(task: str, image1_dir: str | Path, image2_dir: str | Path, out: str | Path, *,
                 target_dir: str | Path | None = None, shard_size: int = 1000, dataset: str | None = None,
                 instruction: str | None = None, progress: bool = True, max_bytes: float | None = None,
                 overwrite: bool = False, target_fallback: str | None = None) -> WriteReport:
    """Paired folders (image 1 = visible / far-focus / over-exposed; image 2 = infrared / near / under).

    mff/mef pairs without targets are refused unless `target_fallback` (mean | image1 | image2) says
    what the loader should train towards; it is recorded in each sample's json.
    """
    if task not in FUSION_TASKS:
        raise ValueError(f"--task must be one of {', '.join(FUSION_TASKS)}, got {task!r}")
    if target_fallback is not None and (task == "ivif" or target_fallback not in FUSION_FALLBACKS):
        raise ValueError(f"--target-fallback {target_fallback!r}: only for --task mff/mef, one of "
                         f"{', '.join(FUSION_FALLBACKS)} (ivif uses data.ivif_fallback)")
    if task != "ivif" and target_dir is None and target_fallback is None:
        raise ValueError(f"--task {task} without --target-dir: pass --target-fallback "
                         f"({' | '.join(FUSION_FALLBACKS)}) to record what to train towards, or give the targets")
    prepare_out(out, "fusion", overwrite)
    report = WriteReport("fusion", Path(out))
    groups = pair_folders({"img1": image1_dir, "img2": image2_dir, "target": target_dir}, report)

    def meta(name: str) -> dict:
        m = {"task": task, "name": name, "dataset": dataset or Path(image1_dir).resolve().parent.name}
        if target_fallback is not None and target_dir is None:
            m["target_fallback"] = target_fallback
        return {**m, "instruction": instruction} if instruction else m

    return _write_all("fusion", groups, out, shard_size, meta, report, progress, max_bytes)


def write_m3(images_dir: str | Path, out: str | Path, *, shard_size: int = 1000, dataset: str | None = None,
             progress: bool = True, max_bytes: float | None = None, overwrite: bool = False) -> WriteReport:
    """A folder (searched recursively) of clean images; the views are made on the fly."""
    prepare_out(out, "m3", overwrite)
    report = WriteReport("m3", Path(out))
    groups = [(name, {"img": p}) for name, p in list_images(images_dir, recursive=True).items()]
    ds = dataset or Path(images_dir).resolve().name
    return _write_all("m3", groups, out, shard_size, lambda name: {"name": name, "dataset": ds}, report, progress,
                      max_bytes)


def load_classes(path: str | Path) -> dict[str, str]:
    """A class-map JSON: {"1": "car", ...} or a list of names (index = label id)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--classes {path}: not a readable JSON file ({e})") from e
    classes = {str(i): n for i, n in enumerate(raw)} if isinstance(raw, list) else {str(k): str(v) for k, v in raw.items()}
    if not classes:
        raise ValueError(f"--classes {path}: no classes")
    return classes


def write_seg(image1_dir: str | Path, image2_dir: str | Path, mask_dir: str | Path, classes: dict[str, str] | str | Path,
              out: str | Path, *, shard_size: int = 1000, dataset: str | None = None,
              overlay_base: str = "img1", progress: bool = True, max_bytes: float | None = None,
              overwrite: bool = False) -> WriteReport:
    """Image pairs + label maps (uint8/uint16) + a class map; only classes present are listed per sample."""
    prepare_out(out, "seg", overwrite)
    cmap = classes if isinstance(classes, dict) else load_classes(classes)
    report = WriteReport("seg", Path(out))
    groups = pair_folders({"img1": image1_dir, "img2": image2_dir, "mask": mask_dir}, report)
    present: dict[str, dict[str, str]] = {}
    kept = []
    for name, paths in groups:
        try:
            labels = np.unique(read_image(paths["mask"]))
        except ImageReadError:
            report.skip("unreadable image", str(paths["mask"]))
            continue
        named = {str(int(v)): cmap[str(int(v))] for v in labels if str(int(v)) in cmap}
        if not any(v.lower() not in NOT_A_CLASS for v in named.values()):
            report.skip("no known class in mask", name)
            continue
        present[name] = named
        kept.append((name, paths))
    ds = dataset or Path(image1_dir).resolve().parent.name

    def meta(name: str) -> dict:
        return {"classes": present[name], "name": name, "dataset": ds, "overlay_base": overlay_base}

    return _write_all("seg", kept, out, shard_size, meta, report, progress, max_bytes)


def write_control(image1_dir: str | Path, image2_dir: str | Path, target_dir: str | Path, out: str | Path, *,
                  subtask: str | None = None, subtasks: dict[str, str] | None = None, shard_size: int = 1000,
                  dataset: str | None = None, progress: bool = True, max_bytes: float | None = None,
                  overwrite: bool = False) -> WriteReport:
    """Pre-made control triples: the target is already adjusted; one subtask for all or per name."""
    if subtask is None and not subtasks:
        raise ValueError("control triples need --subtask (one for all) or --subtask-map (name -> subtask)")
    for s in [subtask, *(subtasks or {}).values()]:
        if s is not None and s not in CONTROL_SUBTASKS:
            raise ValueError(f"subtask must be one of {', '.join(CONTROL_SUBTASKS)}, got {s!r}")
    prepare_out(out, "control", overwrite)
    report = WriteReport("control", Path(out))
    groups = pair_folders({"img1": image1_dir, "img2": image2_dir, "target": target_dir}, report)
    if subtasks:
        for name, _ in [g for g in groups if g[0] not in subtasks and subtask is None]:
            report.skip("no subtask in map", name)
        groups = [g for g in groups if g[0] in subtasks or subtask is not None]
    ds = dataset or Path(image1_dir).resolve().parent.name

    def meta(name: str) -> dict:
        return {"subtask": (subtasks or {}).get(name, subtask), "name": name, "dataset": ds}

    return _write_all("control", groups, out, shard_size, meta, report, progress, max_bytes)


def write_samples(kind: str, samples: Iterable[tuple[str, dict[str, bytes]]], out: str | Path,
                  shard_size: int = 1000, overwrite: bool = True) -> list[Path]:
    """Write ready-made samples (key, {field: bytes}); used by the demo builder (which replaces
    its own shards: `overwrite` defaults to True here)."""
    prepare_out(out, kind, overwrite)
    with TarShardWriter(out, kind, shard_size) as w:
        for key, files in samples:
            w.write(key, files)
    return list(w.paths)
