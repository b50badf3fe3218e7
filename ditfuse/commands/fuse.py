"""`ditfuse fuse`: fuse one pair, a folder of pairs, or one pair under every prompt of a file.

The command only parses, builds jobs (what to read, which prompt, where to write), and writes
files; the model and the fusion are `ditfuse.pipeline.FusionPipeline`, which notebooks and other
code import directly. Pre/post-processing lives in ditfuse/interop/pairs.py, shared with
`ditfuse predict`.

`--official` writes what the official DiTFuse test.py writes (see OFFICIAL_HELP): its resize rule
and output size, guidance and seed defaults, bf16 with the original's casts, noise on the
device's generator, uint8 by truncation. The negative prompt of the unconditional branch and the
per-row RoPE factors are the original's in both modes.

Each pair's initial noise comes from `--seed` alone, not from its position in a batch, so an
output does not depend on `--batch-size` or on the other pairs of the folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ditfuse.commands.argparsing import StrictParser
from ditfuse.core.images import ImageReadError, read_image, to_tensor, to_uint8
from ditfuse.core.prompts import CONTROL_SUBTASKS, FUSION_TASKS, NEGATIVE_PROMPT
from ditfuse.interop.pairs import (
    DTYPES,
    FuseError,
    PreparedPair,
    _stderr_warning,
    find_pairs,
    make_prompt,
    pair_dirs,
    read_prompt_file,
)
from ditfuse.sampling.sampler import SamplerSettings
from ditfuse.sampling.solvers import SCHEDULES, SOLVERS

if TYPE_CHECKING:
    from ditfuse.pipeline import FusionPipeline

OUTPUT_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PRESETS = ("tiny", "omnigen-v1")


# ---------------------------------------------------------------------------------------------
# Jobs: what to read, which prompt, where to write
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    image1: Path
    image2: Path
    prompt: str
    output: Path


def _output_suffix(path: Path) -> None:
    if path.suffix.lower() not in OUTPUT_EXTS:
        raise FuseError(f"output {path}: unknown image type {path.suffix!r}; use one of {', '.join(OUTPUT_EXTS)}")


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        if args.prompt:
            raise FuseError("give --prompt or --prompt-file, not both")
        return [make_prompt(args.task, line, None, None) for line in read_prompt_file(args.prompt_file)]
    return [make_prompt(args.task, args.prompt, args.control, args.segment)]


def build_jobs(args: argparse.Namespace) -> tuple[list[Job], list[tuple[str, str]]]:
    """(jobs, problems found before reading any image) for the chosen mode."""
    prompts = _prompts(args)
    folder = bool(args.pairs_dir or args.image1_dir or args.image2_dir)
    if folder:
        if args.image1 or args.image2 or args.output:
            raise FuseError("folder mode (--pairs-dir / --image1-dir) writes to --output-dir; drop --image1/--image2/--output")
        if args.prompt_file:
            raise FuseError("--prompt-file fuses one pair (--image1/--image2) under every prompt; not a folder")
        if not args.output_dir:
            raise FuseError("folder mode needs --output-dir DIR")
        pairs, problems = find_pairs(*pair_dirs(args.pairs_dir, args.image1_dir, args.image2_dir))
        if not pairs and not problems:
            raise FuseError("no image pairs found (image1/ and image2/ need files with equal names)")
        out = Path(args.output_dir)
        return [Job(p.name, p.image1, p.image2, prompts[0], out / f"{p.name}.png") for p in pairs], problems
    if not (args.image1 and args.image2):
        raise FuseError("give --image1 A --image2 B (one pair) or --pairs-dir DIR (a folder of pairs)")
    a, b = Path(args.image1), Path(args.image2)
    if args.prompt_file:
        if bool(args.output) == bool(args.output_dir):
            raise FuseError("--prompt-file writes OUT_001.png, ... for --output OUT.png, or DIR/<image1>_001.png "
                            "for --output-dir DIR: give one of them")
        base = Path(args.output) if args.output else Path(args.output_dir) / f"{a.stem}.png"
        return [Job(f"prompt {i}", a, b, p, base.with_name(f"{base.stem}_{i:03d}{base.suffix}"))
                for i, p in enumerate(prompts, 1)], []
    if args.output_dir and not args.output:
        return [Job(a.stem, a, b, prompts[0], Path(args.output_dir) / f"{a.stem}.png")], []
    if not args.output:
        raise FuseError("give --output OUT.png (or --output-dir DIR)")
    return [Job(a.stem, a, b, prompts[0], Path(args.output))], []


def check_outputs(jobs: list[Job], overwrite: bool) -> None:
    seen: set[Path] = set()
    for j in jobs:
        _output_suffix(j.output)
        if j.output in seen:
            raise FuseError(f"two pairs would write {j.output}; rename one of them")
        seen.add(j.output)
    existing = [str(j.output) for j in jobs if j.output.exists()]
    if existing and not overwrite:
        what = f"{existing[0]} and {len(existing) - 1} more outputs already exist" if len(existing) > 1 \
            else f"{existing[0]} already exists"
        raise FuseError(f"{what}; pass --overwrite to replace, or choose another output")


def write_image(path: Path, rgb: np.ndarray, overwrite: bool) -> None:
    """Write an RGB uint8 array; without `overwrite` an existing file is an error (and untouched)."""
    import cv2

    ok, buf = cv2.imencode(path.suffix.lower(), np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise FuseError(f"cannot encode the output as {path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "wb" if overwrite else "xb") as f:  # "xb": never replaces a file
            f.write(buf.tobytes())
    except FileExistsError:
        raise FuseError(f"{path} already exists (created during this run); pass --overwrite to replace it") from None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _read_pair(pipe: FusionPipeline, job: Job, cache: dict) -> PreparedPair:
    key = (job.image1, job.image2)
    if key not in cache:
        cache.clear()  # prompt-file mode reuses one pair; folder mode moves on
        cache[key] = pipe.prepare(read_image(job.image1), read_image(job.image2), job.name)
    return cache[key]


def _batches(pipe: FusionPipeline, jobs: list[Job], batch_size: int, report: RunReport, strict: bool
             ) -> Iterator[list[tuple[Job, object]]]:
    """Batches of (job, prepared pair) of equal padded size, in job order as far as sizes allow."""
    buckets: dict[tuple, list] = {}
    cache: dict = {}
    for job in jobs:
        try:
            item = _read_pair(pipe, job, cache)
        except ImageReadError as e:
            if strict:
                raise FuseError(str(e)) from None
            report.skipped.append((job.name, str(e)))
            pipe.warn(f"skipping pair {job.name}: {e}")
            continue
        key = item.batch_key
        bucket = buckets.setdefault(key, [])
        bucket.append((job, item))
        if len(bucket) == batch_size:
            yield buckets.pop(key)
    yield from buckets.values()


class Progress:
    """Folder-mode progress: a tqdm bar with ETA on an interactive stderr, else one line per output
    with done/total and ETA (logs of batch jobs stay readable)."""

    def __init__(self, total: int, bar: bool) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="pair", file=sys.stderr, dynamic_ncols=True)

    def update(self, output: Path, seconds_per_pair: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total}] {output} ({seconds_per_pair:.2f} s/pair, ETA {_clock(eta)})", flush=True)

    def warn(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(f"warning: {msg}", file=sys.stderr)
        else:
            _stderr_warning(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def run_jobs(pipe: FusionPipeline, jobs: list[Job], batch_size: int = 1, overwrite: bool = False,
             strict: bool = True, progress: Progress | None = None) -> RunReport:
    """Fuse every job; `strict=False` (folder mode) skips unreadable pairs and reports them."""
    report = RunReport()
    progress = progress or Progress(len(jobs), bar=False)
    warn, pipe.warn = pipe.warn, progress.warn if progress.bar is not None else pipe.warn
    try:
        for batch in _batches(pipe, jobs, batch_size, report, strict):
            t0 = time.perf_counter()
            fused = pipe.sample([it for _, it in batch], [j.prompt for j, _ in batch])
            dt = (time.perf_counter() - t0) / len(batch)
            for (job, _), rgb in zip(batch, fused):
                write_image(job.output, rgb, overwrite)
                report.written.append(job.output)
                progress.update(job.output, dt)
    finally:
        pipe.warn = warn
        progress.close()
    return report


# ---------------------------------------------------------------------------------------------
# Contact sheet (--sheet): image 1 | image 2 | output per pair, labelled
# ---------------------------------------------------------------------------------------------
SHEET_ROW = 256  # px: every tile is scaled to this height
SHEET_LABEL = 28  # px: the label strip above each row


def _tile(rgb: np.ndarray, height: int) -> np.ndarray:
    import cv2

    w = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
    return cv2.resize(rgb, (w, height), interpolation=cv2.INTER_AREA)


def _label(width: int, texts: list[tuple[int, str]]) -> np.ndarray:
    import cv2

    strip = np.full((SHEET_LABEL, width, 3), 255, np.uint8)
    for x, text in texts:
        cv2.putText(strip, text, (x + 6, SHEET_LABEL - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def sheet_row(name: str, image1: np.ndarray, image2: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """One labelled row: RGB uint8 tiles of equal height, 4 px white gaps."""
    tiles = [_tile(to_uint8(to_tensor(x)), SHEET_ROW) for x in (image1, image2, fused)]
    gap = np.full((SHEET_ROW, 4, 3), 255, np.uint8)
    row = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
    starts = [0, tiles[0].shape[1] + 4, tiles[0].shape[1] + tiles[1].shape[1] + 8]
    labels = [(starts[0], f"{name}: image 1"), (starts[1], "image 2"), (starts[2], "output")]
    return np.concatenate([_label(row.shape[1], labels), row], axis=0)


def write_sheet(path: Path, jobs: list[Job], written: list[Path], overwrite: bool) -> None:
    """Stack the rows of the written outputs (read back from disk, one pair at a time)."""
    done = set(written)
    rows = [sheet_row(j.name, read_image(j.image1), read_image(j.image2), read_image(j.output))
            for j in jobs if j.output in done]
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    write_image(path, np.concatenate(rows, axis=0), overwrite)


def check_writable(paths: list[Path]) -> None:
    """Each output's folder (or its nearest existing parent) must take a new file: checked before
    the model loads, so a read-only or mistyped --output-dir fails in a second, not after loading."""
    for folder in sorted({p.parent for p in paths}):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise FuseError(f"output folder {folder}: {probe} is a file, not a folder; choose another output")
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            raise FuseError(f"output folder {folder} is not writable ({e.strerror}); choose another "
                            "--output/--output-dir") from None


def _check_inputs(jobs: list[Job]) -> None:
    """Single-pair modes: a missing input is an error before the model loads."""
    for path in {p for j in jobs for p in (j.image1, j.image2)}:
        if not path.is_file():
            raise FuseError(f"input image {path} does not exist")


def _summary(report: RunReport, problems: list[tuple[str, str]]) -> int:
    skipped = problems + report.skipped
    print(f"fused {len(report.written)} pair(s); skipped {len(skipped)}")
    for name, why in skipped:
        print(f"  skipped {name}: {why}")
    return 1 if skipped else 0


def _mode(args: argparse.Namespace) -> str:
    if args.pairs_dir or args.image1_dir or args.image2_dir:
        return "folder"
    return "prompt-file" if args.prompt_file else "single"


# test.py's defaults per mode (its --mode single / batch / prompt): guidance, image guidance, seed
OFFICIAL_DEFAULTS = {"single": (2.0, 1.6, 0), "folder": (2.0, 1.6, 3047), "prompt-file": (2.5, 2.0, 42)}
DEFAULTS = (2.5, 1.6, 0)  # OmniGen's pipeline defaults (guidance 2.5 in its examples), seed 0


def sampler_settings(args: argparse.Namespace) -> SamplerSettings:
    """The sampler for the command line; unset guidance / seed take the mode's defaults."""
    g, ig, seed = OFFICIAL_DEFAULTS[_mode(args)] if args.official else DEFAULTS
    pick = lambda v, default: default if v is None else v
    official = {"noise": "device", "state": "model"} if args.official else {}
    return SamplerSettings(**solver_options(args), guidance_scale=pick(args.guidance_scale, g),
                           img_guidance_scale=pick(args.img_guidance_scale, ig), kv_cache=not args.no_kv_cache,
                           batch_branches=not args.sequential_branches, seed=pick(args.seed, seed),
                           negative_prompt=args.negative_prompt, **official)


SOLVER_FLAGS = ("steps", "solver", "schedule", "shift", "guidance_interval", "cache_threshold")


def solver_options(args: argparse.Namespace) -> dict:
    """--fast, or the given --steps/--solver/... (unset: today's 50 Euler steps with full guidance)."""
    given = {k: getattr(args, k) for k in SOLVER_FLAGS if getattr(args, k) is not None}
    if args.fast:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise FuseError(f"--fast sets the solver settings itself: drop {flags}, or drop --fast")
        if args.official:
            raise FuseError("--fast and --official exclude each other (--official is the original's 50 Euler steps)")
        return {"preset": "fast"}
    if args.official and set(given) - {"steps"}:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(set(given) - {"steps"}))
        raise FuseError(f"--official runs the original's Euler loop: drop {flags}")
    return {"steps": 50, **given}


def run(args: argparse.Namespace) -> int:
    jobs, problems = build_jobs(args)
    folder = _mode(args) == "folder"
    check_outputs(jobs, args.overwrite)
    sheet = Path(args.sheet) if args.sheet else None
    if sheet is not None:
        _output_suffix(sheet)
        if sheet.exists() and not args.overwrite:
            raise FuseError(f"{sheet} already exists; pass --overwrite to replace, or choose another --sheet")
    check_writable([j.output for j in jobs] + ([sheet] if sheet else []))
    if not folder:
        _check_inputs(jobs)
    for name, why in problems:
        _stderr_warning(f"skipping {name}: {why}")
    if args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        raise FuseError("--batch-size and --steps must be >= 1")
    sampler = sampler_settings(args)  # a bad solver setting fails here, before the model loads
    # the model stack (Lightning, diffusers) loads only once the arguments are good (LAZY)
    from ditfuse.pipeline import FusionPipeline

    pipe = FusionPipeline.load(args.model, args.preset, args.lora, args.checkpoint, args.vae, args.tokenizer,
                               use_ema=not args.no_ema, device=args.device, dtype=args.dtype,
                               max_side=args.max_side, sampler=sampler, official=args.official)
    bar = folder and not args.no_progress and sys.stderr.isatty()
    report = run_jobs(pipe, jobs, args.batch_size, args.overwrite, strict=not folder,
                      progress=Progress(len(jobs), bar))
    if sheet is not None:
        write_sheet(sheet, jobs, report.written, args.overwrite)
        print(f"sheet: {sheet}")
    return _summary(report, problems) if folder else 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
EPILOG = """\
examples:
  ditfuse fuse --model OmniGen-v1 --lora ditfuse-lora --image1 vis.png --image2 ir.png --task ivif --output fused.png
  ditfuse fuse --model OmniGen-v1 --checkpoint last.ckpt --pairs-dir pairs/ --task mff --output-dir fused/ --batch-size 4
  ditfuse fuse --preset tiny --image1 a.png --image2 b.png --prompt-file prompts.txt --output-dir out/ --steps 2

Inputs: PNG/JPEG/BMP/TIFF, 8 or 16 bit, 1/3/4 channels (alpha dropped, grey replicated). Image 2 is
resized to image 1 when sizes differ (warning). Pairs are scaled down to --max-side and padded to
the token grid; outputs are written at image 1's original size. Image order: image 1 = visible /
far-focus / over-exposed, image 2 = infrared / near-focus / under-exposed.
With --official the size rule is test.py's instead (see --official). Folder mode shows a progress bar
with ETA on a terminal (a line per output otherwise, or with --no-progress).
Exit status: 0 on success; 1 on an error or when folder mode skipped a pair (the summary lists it)."""

OFFICIAL_HELP = ("write what the official DiTFuse test.py writes: long side scaled to --max-side (default 1024) "
                 "up or down, sides floored to multiples of 16 (LANCZOS), output saved at that size; guidance "
                 "2.0 / image guidance 1.6 and seed 0 (folder mode: seed 3047; --prompt-file: 2.5 / 2.0, seed 42); "
                 "--dtype auto = bf16 with the original's casts (Euler state, condition latents, timesteps in "
                 "bf16); noise on the device's generator; uint8 by truncation. Without it: source-size "
                 "output, no upscaling, guidance 2.5 / 1.6, seed 0, fp32 on CPU, rounding")


def parser() -> argparse.ArgumentParser:
    p = StrictParser(prog="ditfuse fuse", description="Fuse image pairs with a DiTFuse/OmniGen model.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="OmniGen-v1 folder, diffusers layout (transformer/, vae/, "
                   "tokenizer/) or original layout (config.json + model.safetensors); never downloads")
    g.add_argument("--preset", choices=PRESETS, help="model preset (default: omnigen-v1 with --model, the "
                   "checkpoint's with --checkpoint); 'tiny' without --model is a random-init demo model")
    g.add_argument("--lora", metavar="DIR", help="LoRA adapter folder: this framework's or the official DiTFuse "
                   "one (fused qkv_proj/o_proj), detected and converted automatically, merged into the weights")
    g.add_argument("--checkpoint", metavar="CKPT", help="Lightning checkpoint of `ditfuse fit` (EMA weights when "
                   "it holds them); the base comes from its hyper-parameters or --model")
    g.add_argument("--no-ema", action="store_true", help="with --checkpoint: use the raw weights, not the EMA ones")
    g.add_argument("--vae", metavar="DIR", help="SDXL VAE folder (default: MODEL/vae)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model's; builtin for tiny)")

    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--image1", metavar="A", help="first image (visible / far-focus / over-exposed)")
    g.add_argument("--image2", metavar="B", help="second image (infrared / near-focus / under-exposed)")
    g.add_argument("--output", metavar="OUT", help="output image (.png, .jpg, .bmp, .tif); with --prompt-file "
                   "OUT_001.png, OUT_002.png, ...")
    g.add_argument("--pairs-dir", metavar="DIR", help="folder mode: DIR/image1/ and DIR/image2/ with equal file "
                   "names; unreadable or unpaired files are reported and skipped")
    g.add_argument("--image1-dir", metavar="DIR", help="folder mode: the image-1 folder (with --image2-dir)")
    g.add_argument("--image2-dir", metavar="DIR", help="folder mode: the image-2 folder (with --image1-dir)")
    g.add_argument("--output-dir", metavar="DIR", help="folder for the outputs (<image1 name>.png; with "
                   "--prompt-file <image1 name>_001.png, ...)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse, exit 1, "
                   "leave them untouched)")
    g.add_argument("--sheet", metavar="FILE", help="also write a side-by-side sheet: image 1 | image 2 | output "
                   "per pair, labelled (.png, .jpg, ...)")
    g.add_argument("--no-progress", action="store_true", help="folder mode: no progress bar (a line per output "
                   "with done/total and ETA, as when stderr is not a terminal)")

    g = p.add_argument_group("prompt")
    g.add_argument("--task", choices=FUSION_TASKS, help="fusion task: ivif (infrared-visible), mff (multi-focus), "
                   "mef (multi-exposure); the published DiTFuse instruction")
    g.add_argument("--prompt", metavar="TEXT", help="free instruction (placed in the DiTFuse template, tagged "
                   "as --task or [FUSION]), or a full prompt with <img><|image_1|></img> and <img><|image_2|></img>")
    g.add_argument("--prompt-file", metavar="FILE", help="one prompt per line (as --prompt; '#' comments): one "
                   "output per line for the pair --image1/--image2")
    g.add_argument("--control", choices=CONTROL_SUBTASKS, help="[CONTROL] prompt: brightness (LIGHT++ strong up, "
                   "LIGHT+ slight up, LIGHT- slight down, LIGHT-- strong down) or contrast (CONTRAST+/-) of the "
                   "fused result; the base instruction is --task's (M3's when absent)")
    g.add_argument("--segment", metavar="CLASS", help="[SEG] prompt: paint the CLASS mask in blue over the image")
    g.add_argument("--negative-prompt", metavar="TEXT", default=NEGATIVE_PROMPT, help="text of the "
                   "unconditional guidance branch, no images (default: OmniGen's default negative prompt, "
                   "'low quality, jpeg artifacts, ugly, ...')")

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, help="solver steps (default: 50; Heun and midpoint evaluate twice per "
                   "step)")
    g.add_argument("--fast", action="store_true", help="the fast preset (sampler.preset: fast; "
                   "docs/performance.md, 'Fewer evaluations'): fewer transformer evaluations, chosen by "
                   "benchmarks/nfe_quality.py; excludes --steps/--solver/--schedule/--shift/--guidance-interval/"
                   "--cache-threshold")
    g.add_argument("--solver", choices=SOLVERS, help="ODE solver (default: euler, OmniGen's)")
    g.add_argument("--schedule", choices=SCHEDULES, help="time grid: uniform (default, OmniGen's) or shifted "
                   "(t / (t + shift (1 - t)))")
    g.add_argument("--shift", type=float, help="with --schedule shifted: > 1 puts steps near the noise "
                   "(default: 1)")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"), help="run the guidance "
                   "branches only for t in [T_LO, T_HI] (t = 1 is the image; one evaluation instead of three "
                   "outside; default: 0 1 = every step)")
    g.add_argument("--cache-threshold", type=float, help="step caching: skip a step's transformer blocks while "
                   "their input changed by less than this (relative L1, accumulated); default: off")
    g.add_argument("--official", action="store_true", help=OFFICIAL_HELP)
    g.add_argument("--guidance-scale", type=float, help="text guidance s_txt (default: 2.5, OmniGen; "
                   "--official: test.py's)")
    g.add_argument("--img-guidance-scale", type=float, help="image guidance s_img (default: 1.6, OmniGen; "
                   "--official: test.py's); 1 and 1 run the conditional branch only")
    g.add_argument("--seed", type=int, help="initial-noise seed, the same for every pair (default: 0; "
                   "--official: test.py's)")
    g.add_argument("--max-side", type=int, help="processing resolution: long side in pixels, a multiple of the "
                   "model's token size (16 for OmniGen-v1); larger inputs are scaled down, never up (default: "
                   "1024); with --official the long side is set to it, up or down")
    g.add_argument("--batch-size", type=int, default=1, help="pairs sampled together (same processed size; "
                   "default: 1); outputs do not depend on it")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the condition tokens at every step "
                   "(same output, slower; for checking)")
    g.add_argument("--sequential-branches", action="store_true", help="run the guidance branches one after "
                   "another (less memory, slower)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto = cuda if present)")
    g.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="transformer precision "
                   "(default: auto = bf16 on CUDA, fp32 on CPU; bf16 everywhere with --official); the VAE "
                   "stays fp32")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (FuseError, FileNotFoundError, ImageReadError, ValueError) as e:
        print(f"ditfuse fuse: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
