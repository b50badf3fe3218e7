"""`ditfuse eval`: fusion metric table over image1/image2/fused folders.

Images are matched by file stem across the folders and read as OpenCV reads them
(`cv2.imread(IMREAD_COLOR)`, BGR; RoadScene's JPEGs then decode as in published tables), then
scored by `ditfuse.eval.metrics` in the MMIF-CDDFuse convention (docs/METRICS.md), image 1
as source A and image 2 as source B. Output: one row per image, a mean row (NaN propagates, as
in the evaluator's sums), optional baseline rows (pixelwise mean / max fusion of the same gray
pairs: on infrared-visible sets max fusion out-scores published methods on MI, VIF and Qabf),
the convention, and every stem that could not be scored, with the reason.

    ditfuse eval --image1-dir vi --image2-dir ir --fused-dir out --baselines mean,max
    ditfuse eval ... --format json --out metrics.json
    ditfuse eval ... --fused-dir ours=out --fused-dir cddfuse=cdd/ --plot metrics.png

Several `--fused-dir NAME=DIR` give a comparison table across methods (one mean row each, on the
stems every folder has); `--plot FILE` draws one box chart per metric (methods and baselines side
by side; needs matplotlib). A tqdm bar with ETA shows progress in a terminal; with --no-progress
or when stderr is not a terminal, a line every 10 s instead.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ditfuse.commands.argparsing import StrictParser
from ditfuse.eval import metrics as fm

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FORMATS = ("md", "csv", "json")
BASELINES = ("mean", "max")
REF_SUFFIX = "_ref"  # PSNR_ref / SSIM_ref: against --reference-dir
FUSED = "fused"  # the method name of an unnamed --fused-dir
LINE_EVERY_S = 10.0  # progress line period without a bar


class EvalError(Exception):
    """A problem the user fixes by changing an option or a file; printed as one line."""


@dataclass
class Report:
    """Everything `ditfuse eval` prints: rows keyed by stem, then column name."""

    columns: list[str]
    methods: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # name -> stem -> row
    baselines: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # name -> stem -> row
    skipped: dict[str, str] = field(default_factory=dict)  # stem -> reason
    notes: list[str] = field(default_factory=list)

    @property
    def per_image(self) -> dict[str, dict[str, float]]:
        """The first (with one --fused-dir: the only) method's rows."""
        return next(iter(self.methods.values()), {})

    @property
    def n_pairs(self) -> int:
        """Stems scored (fused rows, or baseline rows when there is no fused folder)."""
        return max([0, *(len(r) for r in self.methods.values()), *(len(r) for r in self.baselines.values())])

    def mean(self, rows: dict[str, dict[str, float]]) -> dict[str, float]:
        """Column means over rows; a NaN anywhere makes that column's mean NaN."""
        cols = [c for c in self.columns if any(c in r for r in rows.values())]
        return {c: math.fsum(r.get(c, math.nan) for r in rows.values()) / len(rows) for c in cols} if rows else {}


# --------------------------------------------------------------------------- reading & matching


def index_folder(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """stem -> image path in folder, plus stems that are ambiguous (two image files)."""
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            found.setdefault(p.stem, []).append(p)
    return {s: ps[0] for s, ps in found.items() if len(ps) == 1}, sorted(s for s, ps in found.items() if len(ps) > 1)


def match_stems(folders: dict[str, Path]) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """Stems present (once) in every folder -> {label: path}; the others -> why they are skipped."""
    indexed = {label: index_folder(path) for label, path in folders.items()}
    skipped: dict[str, str] = {}
    for label, (_, dupes) in indexed.items():
        for s in dupes:
            skipped[s] = f"ambiguous in {label} (several image files)"
    every = set().union(*(found for found, _ in indexed.values())) - set(skipped)
    matched: dict[str, dict[str, Path]] = {}
    for stem in sorted(every):
        missing = [label for label, (found, _) in indexed.items() if stem not in found]
        if missing:
            skipped[stem] = "missing in " + ", ".join(missing)
        else:
            matched[stem] = {label: found[stem] for label, (found, _) in indexed.items()}
    return matched, dict(sorted(skipped.items()))


def read_rgb(path: Path) -> Tensor | None:
    """(1, 3, H, W) uint8 RGB, decoded by OpenCV like the evaluator (IMREAD_COLOR), or None."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------- scoring


def baseline_fusions(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Pixelwise mean (rounded half to even) and max of the gray pair: (1, 1, H, W) each."""
    ga, gb = fm.to_gray(a), fm.to_gray(b)  # (1, H, W) float64, integer-valued
    return {"mean": torch.round((ga + gb) / 2)[:, None], "max": torch.maximum(ga, gb)[:, None]}


def _row(values: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v[0]) for k, v in values.items()}


def score_image(
    images: dict[str, Tensor], fused: dict[str, Tensor], names: list[str], iqa: dict[str, Callable[[Tensor], Tensor]],
    baselines: list[str],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """One stem's rows per method and per baseline. images: image1 / image2 / reference;
    fused: method -> image; all (1, 3, H, W) on the compute device."""
    a, b, ref = images["image1"], images["image2"], images.get("reference")

    def row(f: Tensor, with_iqa: bool) -> dict[str, float]:
        r = _row(fm.compute_fusion_metrics(a, b, f, names))
        if ref is not None:
            r.update({k + REF_SUFFIX: v for k, v in _row(fm.reference_metrics(ref, f)).items()})
        if with_iqa:
            r.update({k.upper(): float(fn(f.float() / 255)[0]) for k, fn in iqa.items()})
        return r

    fusions = {name: f for name, f in baseline_fusions(a, b).items() if name in baselines}
    return ({name: row(f, True) for name, f in fused.items()},
            {name: row(f, False) for name, f in fusions.items()})


def _load(paths: dict[str, Path], device: torch.device) -> dict[str, Tensor]:
    images = {}
    for label, path in paths.items():
        img = read_rgb(path)
        if img is None:
            raise EvalError(f"OpenCV cannot read {path}")
        images[label] = img.to(device)
    shapes = {label: tuple(img.shape[-2:]) for label, img in images.items()}
    if len(set(shapes.values())) > 1:
        raise EvalError("sizes differ: " + ", ".join(f"{k} {h}x{w}" for k, (h, w) in shapes.items()))
    return images


def evaluate(args: argparse.Namespace) -> Report:
    """Score every matched stem; unreadable or mismatched images are skipped with a reason."""
    names = fm.resolve_names(args.metrics)
    baselines = _parse_baselines(args.baselines)
    methods = parse_fused_dirs(args.fused_dir)
    labels = {(FUSED if m == FUSED else f"{FUSED}:{m}"): m for m in methods}  # folder label -> method
    folders = {"image1": args.image1_dir, "image2": args.image2_dir, **{lb: methods[m] for lb, m in labels.items()}}
    matched, skipped = match_stems(folders)
    refs, ref_dupes = index_folder(args.reference_dir) if args.reference_dir else ({}, [])
    iqa = _build_iqa(args)
    report = Report(columns=_columns(args, names, iqa), skipped=skipped)
    report.methods = {m: {} for m in methods}
    device = torch.device(args.device)
    for stem, paths in progress(matched.items(), len(matched), bar=args.progress):
        if args.reference_dir is not None:
            if stem in refs:
                paths = {**paths, "reference": refs[stem]}
            else:
                report.notes.append(f"{stem}: no reference image" + (" (ambiguous)" if stem in ref_dupes else ""))
        try:
            images = _load(paths, device)
            fused = {m: images.pop(lb) for lb, m in labels.items()}
            rows, base = score_image(images, fused, names, iqa, baselines)
        except (EvalError, ValueError) as exc:
            report.skipped[stem] = str(exc)
            continue
        for name, row in rows.items():
            report.methods[name][stem] = row
        for name, brow in base.items():
            report.baselines.setdefault(name, {})[stem] = brow
    if not report.n_pairs:
        raise EvalError(f"no image could be scored ({len(report.skipped)} stems skipped: "
                        + "; ".join(f"{s}: {r}" for s, r in list(report.skipped.items())[:5]) + ")")
    return report


def parse_fused_dirs(values: list[str] | None) -> dict[str, Path]:
    """`DIR` (method "fused") or `NAME=DIR`, repeatable -> {name: folder}."""
    methods: dict[str, Path] = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or Path(value).exists() or not name or "/" in name:
            name, folder = FUSED, value
        if name in methods:
            raise EvalError(f"--fused-dir {value}: method {name!r} given twice; name each folder NAME=DIR")
        methods[name] = Path(folder)
    return methods


def progress(items: Iterable, total: int, bar: bool | None) -> Iterator:
    """tqdm with ETA on a terminal; otherwise (or bar=False) a line every LINE_EVERY_S seconds."""
    if bar is None:
        bar = sys.stderr.isatty()
    if bar:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc="ditfuse eval", unit="pair", file=sys.stderr)
        return
    start = last = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        now = time.perf_counter()
        if now - last >= LINE_EVERY_S or i + 1 == total:
            last, rate = now, (i + 1) / max(now - start, 1e-9)
            print(f"ditfuse eval: {i + 1}/{total} pairs, {now - start:.0f} s, ETA {(total - i - 1) / rate:.0f} s",
                  file=sys.stderr, flush=True)


def _columns(args: argparse.Namespace, names: list[str], iqa: dict) -> list[str]:
    cols = list(names)
    if args.reference_dir is not None:
        cols += [n + REF_SUFFIX for n in fm.REFERENCE_NAMES]
    return cols + [k.upper() for k in iqa]


def _parse_baselines(value: str | None) -> list[str]:
    chosen = [v.strip().lower() for v in (value or "").split(",") if v.strip()]
    unknown = [v for v in chosen if v not in BASELINES]
    if unknown:
        raise EvalError(f"unknown baseline(s) {unknown}; choose from {','.join(BASELINES)}")
    return [b for b in BASELINES if b in chosen]


def _build_iqa(args: argparse.Namespace) -> dict[str, Callable[[Tensor], Tensor]]:
    """CLIPIQA/MANIQA scorers from --iqa-weights through ditfuse.eval.iqa (imported only when asked)."""
    if args.iqa_weights is None:
        return {}
    try:
        from ditfuse.eval.iqa import build_iqa_metrics
    except ImportError as exc:
        raise EvalError(f"--iqa-weights needs ditfuse.eval.iqa and pyiqa (pip install 'ditfuse[iqa]'): {exc}") from exc
    kwargs = {} if args.maniqa_crops is None else {"maniqa_crops": args.maniqa_crops}
    names = tuple(n.strip().lower() for n in args.iqa_names.split(",") if n.strip())
    try:
        return build_iqa_metrics(weights_dir=args.iqa_weights, names=names, required=True, device=args.device, **kwargs)
    except (OSError, ImportError, RuntimeError, ValueError) as exc:
        raise EvalError(f"IQA metrics: {exc}") from exc


# --------------------------------------------------------------------------- rendering


def to_json(report: Report, args: argparse.Namespace) -> str:
    """{"convention", "per_image": {stem: {metric: v}}, "mean", "baselines": {name: mean row}, ...}.

    NaN and inf are written as JSON's NaN / Infinity literals (Python's json reads them back).
    """
    out = {
        "convention": fm.CONVENTION,
        "columns": report.columns,
        "per_image": report.per_image,
        "mean": report.mean(report.per_image),
        "methods": {name: report.mean(rows) for name, rows in report.methods.items()},
        "methods_per_image": report.methods if len(report.methods) > 1 else {},
        "baselines": {name: report.mean(rows) for name, rows in report.baselines.items()},
        "n_images": len(report.per_image),
        "n_pairs": report.n_pairs,
        "skipped": report.skipped,
        "notes": report.notes,
        "folders": {k: str(v) for k, v in _folders(args).items()},
    }
    if args.reference_dir is not None:
        out["reference_convention"] = fm.REFERENCE_CONVENTION
    return json.dumps(out, indent=2) + "\n"


def _summary_rows(report: Report) -> list[tuple[str, dict[str, float]]]:
    """One method: its per-image rows and their mean; several: one mean row per method (the
    comparison table). Then the baselines' means."""
    if len(report.methods) > 1:
        rows = [(f"method:{name}", report.mean(r)) for name, r in report.methods.items()]
    else:
        rows = list(report.per_image.items())
        if report.per_image:
            rows.append(("mean", report.mean(report.per_image)))
    rows += [(f"baseline:{name}", report.mean(r)) for name, r in report.baselines.items()]
    return rows


def to_csv(report: Report) -> str:
    """A '# convention=...' comment line, a header, one row per image, mean and baseline rows."""
    buf = io.StringIO()
    buf.write(f"# convention={fm.CONVENTION}\n")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *report.columns])
    for label, row in _summary_rows(report):
        writer.writerow([label, *(format(row[c], ".10g") if c in row else "" for c in report.columns)])
    return buf.getvalue()


def to_markdown(report: Report, args: argparse.Namespace) -> str:
    fmt = lambda v: "nan" if math.isnan(v) else f"{v:.4f}"  # noqa: E731
    lines = [f"Convention: {fm.CONVENTION} (docs/METRICS.md); {report.n_pairs} pairs; "
             + ", ".join(f"{k}={v}" for k, v in _folders(args).items()), ""]
    lines += ["| image | " + " | ".join(report.columns) + " |", "|---|" + "---:|" * len(report.columns)]
    for label, row in _summary_rows(report):
        label = f"**{label}**" if label == "mean" else label
        lines.append(f"| {label} | " + " | ".join(fmt(row[c]) if c in row else "-" for c in report.columns) + " |")
    if args.reference_dir is not None:
        lines += ["", f"*{REF_SUFFIX}: against --reference-dir, convention {fm.REFERENCE_CONVENTION}"]
    if report.skipped:
        lines += ["", f"Skipped ({len(report.skipped)}):"] + [f"- {s}: {r}" for s, r in report.skipped.items()]
    lines += [f"- note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _folders(args: argparse.Namespace) -> dict[str, Path]:
    keys = ("image1_dir", "image2_dir", "reference_dir")
    out = {k.removesuffix("_dir"): getattr(args, k) for k in keys if getattr(args, k) is not None}
    methods = parse_fused_dirs(args.fused_dir)
    if list(methods) == [FUSED]:
        out["fused"] = methods[FUSED]
    out.update({f"fused:{m}": d for m, d in methods.items() if m != FUSED or len(methods) > 1})
    return out


# --------------------------------------------------------------------------- plot


def plot(report: Report, path: Path) -> None:
    """One box chart per metric: each method's and baseline's per-image values, the mean marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    groups = {**{m: rows for m, rows in report.methods.items()},
              **{f"{b} (baseline)": rows for b, rows in report.baselines.items()}}
    cols = [c for c in report.columns if any(c in r for rows in groups.values() for r in rows.values())]
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, col in zip(axes.flat, cols):
        names = [g for g in groups if any(col in r for r in groups[g].values())]
        data = [[r[col] for r in groups[g].values() if col in r and math.isfinite(r[col])] for g in names]
        box = ax.boxplot(data, showmeans=True, patch_artist=True, widths=0.6)
        for patch, name in zip(box["boxes"], names):
            patch.set_facecolor("#dddddd" if name.endswith("(baseline)") else colors[names.index(name) % len(colors)])
        ax.set_xticks(range(1, len(names) + 1), [n.replace(" (baseline)", "\n(baseline)") for n in names], fontsize=7)
        ax.set_title(col, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.suptitle(f"ditfuse eval: {report.n_pairs} pairs, {fm.CONVENTION} convention (triangle: mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = StrictParser(prog="ditfuse eval", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image1-dir", type=Path, required=True,
                   help="image 1, the visible image (as in fuse and shards); source A of the metrics")
    p.add_argument("--image2-dir", type=Path, required=True, help="image 2, e.g. infrared; source B of the metrics")
    p.add_argument("--fused-dir", action="append", metavar="[NAME=]DIR",
                   help="fused images (optional with --baselines); repeat NAME=DIR to compare methods")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="box chart per metric, methods and baselines side by side (needs matplotlib)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no tqdm bar: a progress line every 10 s (also the default when stderr is not a terminal)")
    p.add_argument("--metrics", help=f"comma list from {','.join(fm.METRIC_NAMES)} (default: all)")
    p.add_argument("--format", choices=FORMATS, help="default: from --out's suffix, else md")
    p.add_argument("--out", type=Path, help="write here instead of stdout (never overwritten without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--reference-dir", type=Path, help="ground truth: adds PSNR_ref/SSIM_ref columns")
    p.add_argument("--baselines", help="comma list from mean,max: rows for those fusions of the same pairs")
    p.add_argument("--iqa-weights", type=Path, help="pyiqa-style weights folder: adds CLIPIQA/MANIQA columns")
    p.add_argument("--iqa-names", default="clipiqa,maniqa", help="IQA metrics with --iqa-weights")
    p.add_argument("--maniqa-crops", type=int, help="MANIQA crops per image (pyiqa default 20; cost is linear)")
    p.add_argument("--device", default="cpu", help="torch device for the metrics (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on a busy shared CPU)")
    return p


def _check_args(args: argparse.Namespace) -> str:
    """Validate before any work; returns the output format."""
    if args.fused_dir is None and not args.baselines:
        raise EvalError("give --fused-dir, or --baselines to score only baseline fusions")
    fm.resolve_names(args.metrics)  # unknown names fail here, not after reading images
    _parse_baselines(args.baselines)
    parse_fused_dirs(args.fused_dir)
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise EvalError(f"{args.out} exists; pass --overwrite to replace it or choose another --out")
    if args.plot is not None:
        if args.plot.exists() and not args.overwrite:
            raise EvalError(f"{args.plot} exists; pass --overwrite to replace it or choose another --plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise EvalError("--plot needs matplotlib: pip install matplotlib (or drop --plot)")
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            check_writable(path.parent, flag)
    suffix = args.out.suffix.lower().lstrip(".") if args.out is not None else ""
    return args.format or (suffix if suffix in FORMATS else "md")


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` and write a probe file there before minutes of scoring."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise EvalError(f"{flag}: cannot write into {folder} ({exc.strerror or exc}); choose another {flag}") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        fmt = _check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        report = evaluate(args)
    except (EvalError, ValueError) as exc:
        print(f"ditfuse eval: {exc}", file=sys.stderr)
        return 2
    text = {"md": lambda: to_markdown(report, args), "csv": lambda: to_csv(report),
            "json": lambda: to_json(report, args)}[fmt]()
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w" if args.overwrite else "x") as fh:
            fh.write(text)
        print(f"ditfuse eval: wrote {args.out} ({report.n_pairs} pairs scored, {len(report.skipped)} skipped)",
              file=sys.stderr)
    if args.plot is not None:
        plot(report, args.plot)
        print(f"ditfuse eval: wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
