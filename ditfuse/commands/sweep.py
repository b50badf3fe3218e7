"""`ditfuse sweep`: expand a grid of config overrides into one runnable config per point.

    ditfuse sweep --config configs/demo.yaml \
        --grid data.ratios.m3=0.6,0.75,0.9 --grid data.ratios.fusion=0.05,0.1 --out sweeps/mix [--run]

writes into --out
- `points/<name>.yaml`: the composed config of each point, exactly what `ditfuse fit --config ...
  --KEY=VALUE ...` composes from the same files and grid values (it is composed by the fit CLI
  itself, `--print_config` in this process: a later file replaces a list or mapping, a dotted
  override `--data.ratios.m3=0.6` sets one entry, as jsonargparse does), every default written
  out. Each point logs to TensorBoard under `tb/<name>` (the logger's version is the point
  name), checkpoints under `runs/<name>/checkpoints/`, and
  carries `callbacks.HParamsLogger`, so `tensorboard --logdir <out>/tb` compares the points in
  the HParams view;
- `manifest.json` and `manifest.csv`: the points, their values and paths;
- `sweep.sbatch`: a SLURM array job, task i runs point i (`sbatch <out>/sweep.sbatch`), resuming
  from the newest checkpoint of that point after a preemption.
`--run` then trains the points one after another here, each `ditfuse fit --config <point>` in its
own process.

A grid key names a setting of the composed config; `data.ratios.m3` also finds
`data.init_args.ratios.m3`. A key that is not a setting is an error naming it (with the nearest
valid key), checked before anything is written, with one exception: a new entry inside a
mapping-valued argument (a kind added to `data.ratios`), which the fit CLI then accepts or not. A one-value grid is a plain override (`--grid trainer.max_steps=50`)
and is left out of the point names. `--grid-file` reads axes from YAML: `key: [v1, v2]`, or
`axis: [{key1: a, key2: b, _name: label}, ...]` to move several keys together.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from ditfuse.commands.argparsing import StrictParser

TB_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
HPARAMS_CALLBACK = "callbacks.HParamsLogger"
SECTIONS = ("trainer", "model", "data", "optimizer", "lr_scheduler")  # LightningCLI top level


class SweepError(ValueError):
    """A sweep request that cannot be honoured; the message says what to change."""


@dataclass
class Axis:
    """One dimension of the grid: each value is a {dotted key: value} update and a label."""

    name: str
    updates: list[dict[str, Any]]
    labels: list[str]
    linked: bool = False  # a --grid-file axis of several keys: its labels are complete (`_name`)


@dataclass
class Point:
    index: int
    name: str
    values: dict[str, Any]  # canonical dotted key -> value
    config: DictConfig


# --------------------------------------------------------------------------------------------
# grid parsing
# --------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A grid value as YAML would read it, but `1e-4` is a float (YAML 1.1 reads a string)."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def split_values(text: str) -> list[str]:
    """Split `a,b,[c,d]` on the commas outside brackets/braces/quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}{_fmt(v)}" for k, v in value.items())
    return str(value)


def axis_from_arg(arg: str) -> Axis:
    """`key=v1,v2` or, for keys that move together, `key1,key2=a1:a2,b1:b2`."""
    key, sep, values = arg.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise SweepError(f"--grid {arg!r}: expected KEY=V1,V2,... (e.g. data.ratios.m3=0.6,0.75,0.9)")
    keys = [k.strip() for k in key.split(",")]
    if len(keys) == 1:
        parsed = [parse_value(v) for v in split_values(values)]
        return Axis(keys[0], [{keys[0]: v} for v in parsed], [_fmt(v) for v in parsed])
    updates = []
    for group in split_values(values):
        parts = group.split(":")
        if len(parts) != len(keys):
            raise SweepError(f"--grid {arg!r}: {group!r} has {len(parts)} values for {len(keys)} keys "
                             f"(write one value per key, joined by ':')")
        updates.append({k: parse_value(v) for k, v in zip(keys, parts)})
    # named by the first key; the others follow it
    return Axis(keys[0], updates, [_fmt(u[keys[0]]) for u in updates])


def axes_from_file(path: Path) -> list[Axis]:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data:
        raise SweepError(f"--grid-file {path}: expected a mapping of key: [values] or axis: [{{key: value}}, ...]")
    axes = []
    for name, values in data.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"--grid-file {path}: {name!r} needs a non-empty list of values")
        if all(isinstance(v, dict) for v in values):  # linked axis: several keys move together
            updates = [{k: v for k, v in entry.items() if k != "_name"} for entry in values]
            labels = [str(entry.get("_name", "_".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in upd.items())))
                      for entry, upd in zip(values, updates)]
            if any(not upd for upd in updates):
                raise SweepError(f"--grid-file {path}: an entry of axis {name!r} sets no key")
            axes.append(Axis(str(name), updates, labels, linked=True))
        else:
            axes.append(Axis(str(name), [{str(name): v} for v in values], [_fmt(v) for v in values]))
    return axes


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------
def resolve_key(cfg: DictConfig, key: str, complete: bool = False, allow_new: bool = True) -> str:
    """The dotted path of `key` in `cfg`, stepping into `init_args` where the key skips it.

    Raises SweepError naming the key and the keys that do exist where the walk stopped.
    `complete`: cfg holds every setting (printed by the CLI), not just what the YAML sets.
    `allow_new`: accept a new last key inside a mapping-valued argument (see below).
    """
    node: Any = cfg
    path: list[str] = []
    parts = key.split(".")
    for i, part in enumerate(parts):
        init_args = node.get("init_args") if isinstance(node, DictConfig) else None
        if isinstance(node, DictConfig) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(init_args, DictConfig) and part in init_args:
            path += ["init_args", part]
            node = init_args[part]
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            path.append(part)
            node = node[int(part)]
        elif allow_new and isinstance(node, DictConfig) and i == len(parts) - 1 and len(path) >= 2 \
                and path[-1] != "init_args":
            # a new entry of a mapping-valued argument (a kind added to data.ratios); a section
            # (`trainer`) or a class's init_args never take unknown keys here
            path.append(part)
        else:
            raise SweepError(_unknown_key_message(key, part, path, node, complete))
    return ".".join(path)


def _unknown_key_message(key: str, part: str, path: list[str], node: Any, complete: bool) -> str:
    where = ".".join(p for p in path if p != "init_args") or "the top level"
    if not isinstance(node, DictConfig):
        return f"--grid key {key!r} is not in the config: {where} is a value ({node!r}), not a mapping"
    have = [str(k) for k in node.keys() if k != "init_args"]
    if isinstance(node.get("init_args"), DictConfig):
        have += [str(k) for k in node.init_args.keys()]
    close = difflib.get_close_matches(part, have, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    tail = "" if complete else (" (Settings left at their default are found through `ditfuse fit "
                                "--print_config`, which failed or is not available here.)")
    return (f"--grid key {key!r} is not a setting: {where} has no {part!r} "
            f"(it has {', '.join(sorted(have)) or 'nothing'}).{hint}{tail}")


# --------------------------------------------------------------------------------------------
# composing the points: by the fit CLI itself, so a point is what `ditfuse fit` would run
# --------------------------------------------------------------------------------------------
Composer = Callable[[list[str]], DictConfig]


def cli_composer(configs: list[Path]) -> Composer:
    """overrides -> the config `ditfuse fit --config C... OVERRIDES --print_config` prints."""
    for c in configs:
        if not c.is_file():
            raise SweepError(f"--config {c}: no such file")
    files = [a for c in configs for a in ("--config", str(c))]
    return lambda overrides: print_config(["fit", *files, *overrides])


def print_config(args: list[str]) -> DictConfig:
    """Run the fit CLI's --print_config here (no subprocess: Lightning is imported once)."""
    # imported here, not at the top: `ditfuse sweep --help` and a bad --grid answer in 0.3 s
    # instead of the ~5 s Lightning and the model stack take (tests/test_layout.py, LAZY)
    from ditfuse.commands.lightning_cli import run_lightning_cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_lightning_cli([*args, "--print_config"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    if code:
        lines = [ln for ln in err.getvalue().splitlines() if "error" in ln.lower()] or err.getvalue().splitlines()
        raise SweepError(f"`ditfuse {shlex.join(args)}` rejects it: {' '.join(lines[-2:]).strip()}")
    return OmegaConf.create(yaml.safe_load(out.getvalue()))


def point_label(axes: list[Axis], combo: tuple[int, ...]) -> str:
    """`m3=0.6_fusion=0.05`: the varying axes only (one-value axes are plain overrides)."""
    varying = [(a, i) for a, i in zip(axes, combo) if len(a.updates) > 1]
    shorts = _short_names([a.name for a, _ in varying])
    label = "_".join(a.labels[i] if a.linked else f"{s}={a.labels[i]}" for s, (a, i) in zip(shorts, varying))
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", label) or "base"


def _short_names(keys: list[str]) -> list[str]:
    """The shortest dotted suffix of each key that no other key shares (`m3` for data.ratios.m3)."""
    split = [[p for p in k.split(".") if p != "init_args"] for k in keys]
    out = []
    for parts in split:
        for n in range(1, len(parts) + 1):
            if n == len(parts) or sum(other[-n:] == parts[-n:] for other in split) == 1:
                out.append(".".join(parts[-n:]))
                break
    return out


def resolve_keys(full: DictConfig, keys: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(key -> dotted path in the composed config, key -> a did-you-mean hint for the keys that
    add a new entry to a mapping: the fit CLI decides whether that entry is valid)."""
    resolved: dict[str, str] = {}
    added: dict[str, str] = {}
    for key in dict.fromkeys(keys):
        try:
            resolved[key] = resolve_key(full, key, complete=True, allow_new=False)
        except SweepError:
            resolved[key] = path = resolve_key(full, key, complete=True)
            parent, _, last = path.rpartition(".")
            close = difflib.get_close_matches(last, [str(k) for k in OmegaConf.select(full, parent)], n=1)
            added[key] = f" Did you mean {parent}.{close[0]!r}?" if close else ""
    return resolved, added


def cli_override(path: str, value: Any) -> str | None:
    """`--data.ratios.m3=0.6` as fit takes it; None for a list element (`...callbacks.0...`),
    which fit's command line cannot address."""
    if any(part.isdigit() for part in path.split(".")):
        return None
    # a string as is (jsonargparse keeps a str-typed value verbatim: JSON quotes would stay in
    # the value); anything else as JSON, which is YAML, so jsonargparse reads it back typed
    return f"--{path}={value if isinstance(value, str) else json.dumps(value)}"


def compose_point(compose: Composer, updates: dict[str, Any], added: dict[str, str]) -> DictConfig:
    overrides = {p: cli_override(p, v) for p, v in updates.items()}
    try:
        cfg = compose([o for o in overrides.values() if o])
    except SweepError as e:
        hints = "" if "did you mean" in str(e).lower() else "".join(added.values())
        raise SweepError(f"{e}{hints}") from None
    for path, value in updates.items():
        if overrides[path] is None:
            OmegaConf.update(cfg, path, value, merge=False, force_add=True)
    return cfg


def build_points(compose: Composer, axes: list[Axis], out: Path, sweep_name: str,
                 metrics: list[str] | None) -> list[Point]:
    # resolve every key once, against every setting the CLI knows, so a typo fails first
    resolved, added = resolve_keys(compose([]), [key for a in axes for upd in a.updates for key in upd])
    points = []
    for index, combo in enumerate(itertools.product(*(range(len(a.updates)) for a in axes))):
        values = {resolved[k]: v for axis, i in zip(axes, combo) for k, v in axis.updates[i].items()}
        cfg = compose_point(compose, values, added)
        name = f"p{index:03d}_{point_label(axes, combo)}"
        _route_outputs(cfg, out, sweep_name, name, metrics)
        points.append(Point(index, name, values, cfg))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise SweepError("two grid points got the same name; give linked axes distinct `_name`s")
    return points


def _route_outputs(cfg: DictConfig, out: Path, sweep_name: str, name: str, metrics: list[str] | None) -> None:
    """Point the logger, default_root_dir and checkpoint dirs of one point into `out`."""
    run_dir = (out / "runs" / name).resolve()
    if not isinstance(cfg.get("trainer"), DictConfig):
        cfg.trainer = {}
    trainer = cfg.trainer
    trainer.default_root_dir = str(run_dir)  # Lightning's SLURM hpc_ckpt_*.ckpt land here
    tb = {"class_path": TB_LOGGER, "init_args": {"save_dir": str(out.resolve()), "name": "tb",
                                                 "version": name, "default_hp_metric": False}}
    logger = trainer.get("logger")
    if logger is False:
        raise SweepError("the base config sets trainer.logger: false; a sweep needs a TensorBoard logger")
    loggers = list(logger) if isinstance(logger, ListConfig) else [logger] if isinstance(logger, DictConfig) else []
    kept = [lg for lg in loggers if not str(lg.get("class_path", "")).endswith("TensorBoardLogger")]
    for lg in kept:  # other loggers (CSV, ...) get the point's name too, so runs stay apart
        if not isinstance(lg.get("init_args"), DictConfig):
            lg.init_args = {}
        init = lg.init_args
        if "save_dir" in init:
            init.save_dir = str(out.resolve() / "logs")
        init.version = name
    trainer.logger = [tb, *kept] if kept else tb

    callbacks = trainer.get("callbacks")
    callbacks = list(callbacks) if isinstance(callbacks, ListConfig) else [callbacks] if callbacks else []
    for cb in callbacks:
        cls = str(cb.get("class_path", ""))
        init = cb.get("init_args") or {}
        if cls.endswith("ModelCheckpoint"):  # sweep.sbatch resumes from run_dir's last.ckpt
            init.dirpath = str(run_dir / (Path(str(init.dirpath)).name if init.get("dirpath") else "checkpoints"))
    if not any(str(cb.get("class_path", "")).endswith("HParamsLogger") for cb in callbacks):
        callbacks.append({"class_path": HPARAMS_CALLBACK, "init_args": {"metrics": metrics}})
    trainer.callbacks = callbacks


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def check_out_writable(out: Path) -> None:
    """Fail before composing anything when --out cannot be created or written."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SweepError(f"--out {out} is not writable ({probe} is {'not a folder' if not probe.is_dir() else 'read-only'}); "
                         "choose another --out")


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SweepError(f"--out {out} exists and is not empty; pass --overwrite to replace it "
                             f"or choose another --out")
        if not (out / "manifest.json").is_file():
            raise SweepError(f"--out {out} is not a sweep directory (no manifest.json); --overwrite only "
                             f"replaces earlier sweeps, choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_points(points: list[Point], out: Path, header: str) -> list[Path]:
    (out / "points").mkdir(parents=True, exist_ok=True)
    paths = []
    for p in points:
        path = out / "points" / f"{p.name}.yaml"
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in p.values.items()) or "base config"
        path.write_text(f"{header}# point {p.index}: {values}\n" + OmegaConf.to_yaml(p.config, resolve=False))
        paths.append(path)
    return paths


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    keys = sorted({k for p in manifest["points"] for k in p["values"]})
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "config", "log_dir", *keys, "status"])
        for p in manifest["points"]:
            w.writerow([p["index"], p["name"], p["config"], p["log_dir"],
                        *(p["values"].get(k, "") for k in keys), p.get("status", "")])


def _trainer_value(cfg: DictConfig, key: str, default: Any) -> Any:
    value = OmegaConf.select(cfg, f"trainer.{key}", default=default)
    return default if value is None else value


def sbatch_script(points: list[Point], paths: list[Path], out: Path, sweep_name: str,
                  extra: list[str], workdir: Path) -> str:
    cfg = points[0].config
    nodes = _trainer_value(cfg, "num_nodes", 1)
    devices_cfg = _trainer_value(cfg, "devices", 1)
    devices = devices_cfg if isinstance(devices_cfg, int) else 1
    gpu = str(_trainer_value(cfg, "accelerator", "auto")) in ("gpu", "cuda", "auto")
    lines = [
        "#!/bin/bash",
        f"# Sweep {sweep_name!r}: {len(points)} points, one array task each (written by `ditfuse sweep`).",
        f"# Submit: sbatch {out.resolve() / 'sweep.sbatch'}    Compare: tensorboard --logdir {out.resolve() / 'tb'}",
        "# One task per device (Lightning's SLURMEnvironment reads the srun layout); SIGUSR1 90 s before",
        "# the time limit makes every rank save runs/<point>/hpc_ckpt_*.ckpt at one step and rank 0",
        "# requeue the task (callbacks.interrupt.InterruptCheckpoint, in the shipped fit configs).",
        *([f"# trainer.devices is {devices_cfg!r}: one task is requested per node; set trainer.devices (and these",
           "# lines) to the GPUs per node, or add --config configs/cluster/ddp_a100.yaml"]
          if devices_cfg != devices else []),
        f"#SBATCH --job-name={sweep_name}",
        f"#SBATCH --array=0-{len(points) - 1}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={devices}",
    ]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={devices}")
    lines += [
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={out.resolve() / 'slurm'}/%A_%a.out",
        *(f"#SBATCH --{e.lstrip('-')}" for e in extra),
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "# (activate the environment that provides `ditfuse` here if the job does not inherit it)",
        "CONFIGS=(",
        *(f"  {shlex.quote(str(p.resolve()))}" for p in paths),
        ")",
        "NAMES=(" + " ".join(shlex.quote(p.name) for p in points) + ")",
        'CFG=${CONFIGS[$SLURM_ARRAY_TASK_ID]}',
        f'RUN_DIR={shlex.quote(str((out / "runs").resolve()))}/${{NAMES[$SLURM_ARRAY_TASK_ID]}}',
        "# Resume from the newest of Lightning's preemption checkpoint and ModelCheckpoint's last.ckpt.",
        "CKPT=$(find \"$RUN_DIR\" \\( -name 'hpc_ckpt_*.ckpt' -o -name 'last*.ckpt' \\) -print0 2>/dev/null \\",
        "       | xargs -0 -r ls -t | head -n 1 || true)",
        'echo "point $SLURM_ARRAY_TASK_ID: $CFG ${CKPT:+(resuming from $CKPT)}"',
        'srun ditfuse fit --config "$CFG" ${CKPT:+--ckpt_path "$CKPT"}',
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def run_points(manifest: dict[str, Any], out: Path) -> int:
    failures = 0
    for p in manifest["points"]:
        cmd = [sys.executable, "-m", "ditfuse.cli", "fit", "--config", p["config"]]
        print(f"[sweep] point {p['index']} {p['name']}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=manifest["workdir"])
        p["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
        p["seconds"] = round(time.perf_counter() - start, 1)
        failures += rc != 0
        write_manifest(out, manifest)
    print(f"[sweep] {len(manifest['points']) - failures}/{len(manifest['points'])} points finished; "
          f"tensorboard --logdir {manifest['tb_dir']}")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = StrictParser(
        prog="ditfuse sweep",
        description="Expand a grid of config overrides into one config per point, a manifest and a "
                    "SLURM array script; optionally run the points here one after another.",
        epilog="example: ditfuse sweep --config configs/demo.yaml --grid data.ratios.m3=0.6,0.75,0.9 "
               "--grid data.ratios.fusion=0.05,0.1 --out sweeps/mix --run")
    p.add_argument("--config", action="append", required=True, type=Path,
                   help="base config; repeat to compose (later files override earlier ones)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one grid axis over a dotted config key; repeat for a cartesian product. "
                        "Keys that move together: K1,K2=a1:a2,b1:b2 (one ':'-joined value per key)")
    p.add_argument("--grid-file", action="append", default=[], type=Path,
                   help="YAML file of axes (key: [values], or axis: [{key: value, ...}, ...])")
    p.add_argument("--out", type=Path, help="output folder (default sweeps/<config name>)")
    p.add_argument("--name", help="sweep name for SLURM (default: the --out folder's name)")
    p.add_argument("--metrics", nargs="+",
                   help="validation metric tags for the HParams view (default: every val/* metric)")
    p.add_argument("--slurm", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra #SBATCH line, e.g. --slurm partition=gpu --slurm time=24:00:00")
    p.add_argument("--run", action="store_true", help="run the points here, one after another")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep in --out")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _sweep(args, argv)
    except SweepError as e:
        print(f"ditfuse sweep: error: {e}", file=sys.stderr)
        return 2


def _sweep(args: argparse.Namespace, argv: list[str]) -> int:
    out: Path = args.out or Path("sweeps") / args.config[-1].stem
    sweep_name = args.name or out.resolve().name
    axes = [axis_from_arg(g) for g in args.grid] + [a for f in args.grid_file for a in axes_from_file(f)]
    check_out_writable(out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        prepare_out(out, overwrite=False)  # the refusal, before minutes of composing
    points = build_points(cli_composer(args.config), axes, out, sweep_name, args.metrics)  # validates every key
    prepare_out(out, args.overwrite)
    header = (f"# Sweep {sweep_name!r}, written by: ditfuse sweep "
              f"{shlex.join(argv)}\n"
              f"# from {', '.join(str(c) for c in args.config)}\n")
    paths = write_points(points, out, header)
    workdir = Path.cwd().resolve()
    manifest = {
        "sweep": sweep_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base_configs": [str(c.resolve()) for c in args.config],
        "workdir": str(workdir),
        "tb_dir": str((out / "tb").resolve()),
        "axes": {a.name: a.labels for a in axes},
        "points": [{"index": p.index, "name": p.name, "config": str(path.resolve()),
                    "log_dir": str((out / "tb" / p.name).resolve()),
                    "run_dir": str((out / "runs" / p.name).resolve()), "values": p.values}
                   for p, path in zip(points, paths)],
    }
    write_manifest(out, manifest)
    (out / "slurm").mkdir(exist_ok=True)  # SLURM does not create the --output folder
    script = out / "sweep.sbatch"
    script.write_text(sbatch_script(points, paths, out, sweep_name, args.slurm, workdir))
    script.chmod(0o755)
    print(f"[sweep] {len(points)} points -> {out}/points/; manifest {out}/manifest.json; "
          f"SLURM array: sbatch {script}")
    return run_points(manifest, out) if args.run else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
