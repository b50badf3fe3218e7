"""`ditfuse convert {model,lora,merge,export-official}`: offline weight conversion between layouts.

The command parses, stages the output in a sibling temp folder and moves it to --out; the
conversions themselves are ditfuse/interop/convert.py (layouts, adapter formats, merging).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ditfuse.commands.argparsing import StrictParser
from ditfuse.interop.convert import (
    TOKENIZER_FILES,
    TRANSFORMER_WEIGHTS,
    _adapter_files,
    _check_keys,
    _empty_transformer,
    _model_config,
    _read_original,
    _save_tensors,
    detect_adapter_format,
    detect_layout,
    export_official_lora,
    load_adapter_state,
    load_transformer,
    lora_scale,
    merge_lora,
    save_adapter,
)


class OutputExistsError(Exception):
    """--out is a non-empty folder and --overwrite was not given."""


def _copy_extras(src: Path, dst: Path) -> list[str]:
    """Copy vae/, tokenizer/, scheduler/ (and model_index.json) of a model folder; the original
    OmniGen-v1 layout keeps its tokenizer files at the top level, they go to tokenizer/."""
    copied = []
    for sub in ("vae", "tokenizer", "scheduler"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub)
            copied.append(sub)
    loose = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if loose and "tokenizer" not in copied:
        (dst / "tokenizer").mkdir(parents=True)
        for f in loose:
            shutil.copy2(f, dst / "tokenizer" / f.name)
        copied.append("tokenizer")
    if (src / "model_index.json").is_file() and (src / "transformer").is_dir():
        shutil.copy2(src / "model_index.json", dst / "model_index.json")
    return copied


def _cmd_model(args: argparse.Namespace, out: Path) -> str:
    if detect_layout(args.src) == "diffusers":
        raise ValueError(f"{args.src} is already in diffusers layout; nothing to convert")
    config, sd, weights = _read_original(args.src)
    model = _empty_transformer(config, buffers=True)
    _check_keys(model, sd, weights)
    model.save_config(str(out / "transformer"))
    _save_tensors(sd, out / "transformer" / TRANSFORMER_WEIGHTS)
    extras = _copy_extras(args.src, out)
    return f"transformer/ ({len(sd)} tensors)" + "".join(f", {e}/" for e in extras)


def _cmd_lora(args: argparse.Namespace, out: Path) -> str:
    if detect_adapter_format(args.src) != "official":
        raise ValueError(f"{args.src} is already in this framework's adapter format (to_q/to_k/to_v)")
    model_config = _model_config(args.model) if args.model else None
    sd, config = load_adapter_state(args.src, model_config)
    save_adapter(out, sd, config)
    return f"adapter ({len(sd)} tensors, r={config['r']}, lora_alpha={config['lora_alpha']})"


def _cmd_merge(args: argparse.Namespace, out: Path) -> str:
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    _adapter_files(args.lora)  # fail on a bad --lora before loading gigabytes
    model = load_transformer(args.model, dtype)
    sd, config = load_adapter_state(args.lora, dict(model.config))
    merge_lora(model, sd, config)
    model.save_pretrained(str(out / "transformer"), safe_serialization=True)
    extras = _copy_extras(args.model, out)
    return f"merged transformer/ (scale {lora_scale(config):g})" + "".join(f", {e}/" for e in extras)


def _cmd_export(args: argparse.Namespace, out: Path) -> str:
    if detect_adapter_format(args.lora) != "ditfuse":
        raise ValueError(f"{args.lora} is already an official (qkv_proj/o_proj) adapter")
    sd, config = export_official_lora(*load_adapter_state(args.lora))
    save_adapter(out, sd, config)
    return f"official adapter (r={config['r']}, lora_alpha={config['lora_alpha']})"


_COMMANDS = {"model": _cmd_model, "lora": _cmd_lora, "merge": _cmd_merge, "export-official": _cmd_export}


def _parser() -> argparse.ArgumentParser:
    p = StrictParser(prog="ditfuse convert", description="Convert OmniGen / DiTFuse weights "
                     "offline (local folders only, transformer-only inputs allowed).")
    sub = p.add_subparsers(dest="command", required=True, metavar="{model,lora,merge,export-official}")
    m = sub.add_parser("model", help="original OmniGen-v1 folder -> diffusers layout "
                       "(OUT/transformer/, plus vae/ and tokenizer/ when the source has them)")
    m.add_argument("--src", type=Path, required=True, help="original layout: config.json + model.safetensors")
    lo = sub.add_parser("lora", help="official DiTFuse/OmniGen adapter (qkv_proj/o_proj) -> this framework's")
    lo.add_argument("--src", type=Path, required=True, help="official peft adapter folder")
    lo.add_argument("--model", type=Path, help="optional model folder for the q/k/v split (default: thirds)")
    g = sub.add_parser("merge", help="model (either layout) + adapter (either format) -> merged diffusers model")
    g.add_argument("--model", type=Path, required=True, help="model folder, diffusers or original layout")
    g.add_argument("--lora", type=Path, required=True, help="adapter folder, either format")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (auto: as stored)")
    e = sub.add_parser("export-official", help="this framework's adapter -> official qkv_proj/o_proj format")
    e.add_argument("--lora", type=Path, required=True, help="this framework's adapter folder")
    for s in (m, lo, g, e):
        s.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _check_out(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    for name in ("src", "model", "lora"):
        src = getattr(args, name, None)
        if src is not None and (out == src.resolve() or out in src.resolve().parents):
            raise ValueError(f"--out {args.out} would overwrite the input --{name} {src}; pick another folder")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {args.out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise OutputExistsError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")


def _write_staged(args: argparse.Namespace) -> str:
    """Run the command into a sibling temp folder, then move it to --out (no half-written output)."""
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _COMMANDS[args.command](args, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return summary
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main(argv: list[str] | None = None) -> int:
    """`ditfuse convert {model,lora,merge,export-official} ...`; exit 2 on a user error."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed by argparse
        return int(stop.code or 0)
    try:
        _check_out(args)
        summary = _write_staged(args)
    except (FileNotFoundError, ValueError, OutputExistsError) as err:
        print(f"ditfuse convert {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"ditfuse convert {args.command}: wrote {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
