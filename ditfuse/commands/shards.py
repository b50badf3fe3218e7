"""`ditfuse shards write fusion|m3|seg|control`, `ditfuse shards demo`, `ditfuse shards inspect`.

Imports stay light at module level (argparse, the prompt names): image, torch and webdataset code
is imported by the command that runs, so `ditfuse shards --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from ditfuse.commands.argparsing import StrictParser
from ditfuse.core.prompts import CONTROL_SUBTASKS, FUSION_TASKS

KINDS = ("fusion", "m3", "seg", "control")  # datamodules.schema.KINDS, without importing it

_SHARD_RE = re.compile(r"^(?P<kind>[a-z0-9]+)-\d{6}\.tar$")


def _parser() -> argparse.ArgumentParser:
    p = StrictParser(prog="ditfuse shards", description="Write, build and inspect WebDataset shards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="folder data set -> shards").add_subparsers(dest="kind", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", required=True, help="output folder for {kind}-NNNNNN.tar")
        q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        q.add_argument("--max-shard-bytes", type=_bytes, default=None,
                       help="also start a new shard past this size, e.g. 500MB or 2GB (default: no limit)")
        q.add_argument("--overwrite", action="store_true",
                       help="replace the shards of this kind already in --out (all of them are removed first)")
        q.add_argument("--dataset", help="data set name stored in each sample's json")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")

    f = w.add_parser("fusion", help="paired folders (image1 = visible/far/over, image2 = infrared/near/under)")
    f.add_argument("--task", required=True, choices=FUSION_TASKS)
    f.add_argument("--image1-dir", required=True)
    f.add_argument("--image2-dir", required=True)
    f.add_argument("--target-dir", help="ground truth / reference fused images with the same names")
    f.add_argument("--instruction", help="a fixed instruction stored with every sample")
    f.add_argument("--target-fallback", choices=("mean", "image1", "image2"),
                   help="mff/mef without --target-dir: what the loader trains towards (recorded per sample)")
    common(f)
    m = w.add_parser("m3", help="a folder of clean images (searched recursively)")
    m.add_argument("--images", required=True)
    common(m)
    s = w.add_parser("seg", help="image pairs + label maps + a class-map JSON")
    s.add_argument("--image1-dir", required=True)
    s.add_argument("--image2-dir", required=True)
    s.add_argument("--mask-dir", required=True)
    s.add_argument("--classes", required=True, help='JSON {"1": "car", ...} or ["background", "car", ...]')
    s.add_argument("--overlay-base", choices=("img1", "img2"), default="img1")
    common(s)
    c = w.add_parser("control", help="pre-made triples (target already adjusted) with a subtask")
    c.add_argument("--image1-dir", required=True)
    c.add_argument("--image2-dir", required=True)
    c.add_argument("--target-dir", required=True)
    c.add_argument("--subtask", choices=CONTROL_SUBTASKS, help="one subtask for every triple")
    c.add_argument("--subtask-map", help='JSON {"name": "LIGHT+", ...} (file stem -> subtask)')
    common(c)

    d = sub.add_parser("demo", help="offline demo shards from scikit-image photographs")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--crop", type=int, default=96, help="stored crop size in px (default 96)")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the training sample counts")

    i = sub.add_parser("inspect", help="counts per kind/task, image sizes; fails on a schema violation")
    i.add_argument("path", help="a shard folder (searched recursively) or a tar")
    i.add_argument("--max-samples", type=int, default=0, help="stop after N samples per shard (0: all)")
    return p


def _bytes(text: str) -> float:
    """'500MB' / '2GB' / '1e9' -> bytes."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 2GB)") from None


def _write(a: argparse.Namespace) -> int:
    from datamodules import writers

    common = {"shard_size": a.shard_size, "dataset": a.dataset, "progress": not a.no_progress,
              "max_bytes": a.max_shard_bytes, "overwrite": a.overwrite}
    if a.kind == "fusion":
        report = writers.write_fusion(a.task, a.image1_dir, a.image2_dir, a.out, target_dir=a.target_dir,
                                      instruction=a.instruction, target_fallback=a.target_fallback, **common)
    elif a.kind == "m3":
        report = writers.write_m3(a.images, a.out, **common)
    elif a.kind == "seg":
        report = writers.write_seg(a.image1_dir, a.image2_dir, a.mask_dir, a.classes, a.out,
                                   overlay_base=a.overlay_base, **common)
    else:
        subtasks = json.loads(Path(a.subtask_map).read_text()) if a.subtask_map else None
        report = writers.write_control(a.image1_dir, a.image2_dir, a.target_dir, a.out, subtask=a.subtask,
                                       subtasks=subtasks, **common)
    print(report.summary())
    if report.written == 0:
        print("error: nothing was written; check the folders and the skipped reasons above", file=sys.stderr)
        return 1
    return 0


def _demo(a: argparse.Namespace) -> int:
    from datamodules.demo import build_demo

    written = build_demo(a.out, seed=a.seed, crop=a.crop, scale=a.scale)
    secs = written.pop("seconds")
    for name, n in written.items():
        print(f"{name:<16} {n:>6} samples")
    print(f"demo shards in {a.out} ({secs} s)")
    return 0


def _task_of(kind: str, meta: dict) -> str:
    if kind == "fusion":
        return meta["task"]
    if kind == "control":
        return meta.get("subtask") or "derived"
    return kind


def inspect(path: str | Path, max_samples: int = 0) -> dict:
    """Walk the shards under `path`; raise SchemaError / ShardReadError on the first violation."""
    from datamodules.io import ImageReadError
    from datamodules.schema import SchemaError, check_sample, iter_tar

    path = Path(path)
    tars = [path] if path.is_file() else sorted(path.rglob("*.tar"))
    if not tars:
        raise SchemaError(f"no .tar shards under {path}")
    counts: dict[str, Counter] = defaultdict(Counter)
    sizes: dict[str, Counter] = defaultdict(Counter)
    for tar in tars:
        match = _SHARD_RE.match(tar.name)
        if not match or match["kind"] not in KINDS:
            raise SchemaError(f"{tar}: shard names must be {{kind}}-NNNNNN.tar with kind in {', '.join(KINDS)}")
        kind = match["kind"]
        group = _group(path, tar, kind)
        for n, sample in enumerate(iter_tar(tar)):
            if max_samples and n >= max_samples:
                break
            try:
                meta = check_sample(kind, sample)
                counts[group][_task_of(kind, meta)] += 1
                sizes[group][_sample_size(sample)] += 1
            except (SchemaError, ImageReadError) as e:
                raise SchemaError(f"schema violation in {tar} sample {sample['__key__']}: {e}") from e
    return {"shards": len(tars), "counts": counts, "sizes": sizes}


def _group(root: Path, tar: Path, kind: str) -> str:
    """How a shard's counts are grouped: its folder under root (`train/fusion`), else its kind."""
    if root.is_file() or tar.parent == root:
        return kind
    return tar.parent.relative_to(root).as_posix()


def _sample_size(sample: dict) -> str:
    """'HxW' of the sample's first image (all images of a sample must share it)."""
    from datamodules.io import decode_image
    from datamodules.schema import SchemaError, image_field

    shapes = set()
    for stem in ("img", "img1", "img2", "target", "mask"):
        name = image_field(sample, stem)
        if name:
            shapes.add(decode_image(sample[name], f"{sample['__key__']}.{name}").shape[:2])
    if len(shapes) > 1:
        raise SchemaError(f"images differ in size: {sorted(shapes)}")
    h, w = shapes.pop()
    return f"{h}x{w}"


def _inspect(a: argparse.Namespace) -> int:
    from datamodules.schema import SchemaError, ShardReadError

    try:
        info = inspect(a.path, a.max_samples)
    except (SchemaError, ShardReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{info['shards']} shard(s) under {a.path}")
    for group in sorted(info["counts"]):
        c = info["counts"][group]
        tasks = ", ".join(f"{t}={n}" for t, n in sorted(c.items()))
        top = ", ".join(f"{s} ({n})" for s, n in info["sizes"][group].most_common(3))
        print(f"{group:<16} {sum(c.values()):>7} samples  [{tasks}]  sizes: {top}")
    return 0


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    try:
        return {"write": _write, "demo": _demo, "inspect": _inspect}[a.cmd](a)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
