"""`ditfuse` entry point (the console script `ditfuse = ditfuse.cli:main`, and `python -m ditfuse.cli`).

It only dispatches to ditfuse/commands/: `fit|validate|predict` go to LightningCLI
(`ditfuse.commands.lightning_cli`); the other subcommands are plain argparse tools, each imported
only when asked for so `ditfuse shards ...` does not pay for importing the model stack. This module
itself imports nothing heavy (no torch, no Lightning).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module, function taking argv list, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "shards": ("ditfuse.commands.shards", "main", "write, build (demo) and inspect WebDataset shards"),
    "fuse": ("ditfuse.commands.fuse", "main", "fuse image pairs with a trained model"),
    "eval": ("ditfuse.commands.evaluate", "main", "fusion metric table (and plot) over image1/image2/fused folders"),
    "convert": ("ditfuse.commands.convert", "main", "convert OmniGen / DiTFuse weights between layouts"),
    "sweep": ("ditfuse.commands.sweep", "main", "expand a data-mix grid into configs and a SLURM array"),
}
LIGHTNING = {
    "fit": "train (--config CFG [--section.key=value ...], --ckpt_path last resumes)",
    "validate": "validation metrics of a checkpoint on data.val_shards (--ckpt_path CKPT)",
    "predict": "fuse a folder of pairs on every GPU of the trainer (configs/predict.yaml)",
}
# Lightning's `test` needs a test_step the module does not have; validate is the metrics run
NOT_COMMANDS = {"test": "use `ditfuse validate --config CFG --ckpt_path CKPT` (validation metrics on "
                        "data.val_shards; point them at your test shards)"}


class _ImportNoise(logging.Filter):
    """Drops one known import-time log line of a library below the model stack."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


# logger -> the line it drops. bitsandbytes (a peft and pyiqa dependency) looks up a 4-bit CPU
# GEMM kernel on the Hub when it is imported on a CPU with AVX512-bf16 and says, twice, that it
# could not; ditfuse never runs 4-bit layers. One object each, so adding it again is a no-op.
IMPORT_NOISE = {
    "bitsandbytes.backends.cpu.ops": _ImportNoise("Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": _ImportNoise("Skipping publisher trust check for 'kernels-community/"),
}


def prepare_process() -> None:
    """Before any command imports the model stack. Every weight ditfuse reads comes from a local
    path (configs name folders), so the Hub is switched off unless the caller set HF_HUB_OFFLINE
    itself: huggingface_hub reads it once, at its first import, and bitsandbytes' import-time
    kernel lookup would otherwise ask huggingface.co (from every rank of a job, where a firewall
    that drops packets makes it wait)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for logger, noise in IMPORT_NOISE.items():
        logging.getLogger(logger).addFilter(noise)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ditfuse")
    except PackageNotFoundError:
        from ditfuse import __version__

        return __version__


def _usage() -> str:
    lines = ["usage: ditfuse <command> [options]", "       ditfuse --version", "", "commands:"]
    lines += [f"  {c:<9} {h}" for c, h in LIGHTNING.items()]
    lines += [f"  {c:<9} {h}" for c, (_, _, h) in TOOLS.items()]
    lines += ["", "`ditfuse <command> --help` documents each command."]
    return "\n".join(lines)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"ditfuse {version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING:
        from ditfuse.checkpoint_io import CheckpointWriteError
        from ditfuse.commands.lightning_cli import ConfigError, run_lightning_cli

        try:
            run_lightning_cli([cmd, *rest])
        except ConfigError as exc:
            print(f"ditfuse {cmd}: error: {exc}", file=sys.stderr)
            return 2
        except CheckpointWriteError as exc:  # a full disk is not a bug: one line, no traceback
            print(f"ditfuse {cmd}: error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a rank that died is not a bug of this one: one line
            from ditfuse.commands.lightning_cli import lost_rank_line

            line = lost_rank_line(exc)
            if line is None:
                raise
            print(f"ditfuse {cmd}: error: {line}", file=sys.stderr, flush=True)
            return 1
        except SystemExit as exc:
            # Lightning ends a SIGTERM'd fit with SIGTERMException, a SystemExit without a code
            # (status 0): a stopped run must not look finished to a scheduler or a script
            if type(exc).__name__ == "SIGTERMException":
                return 128 + 15
            raise
        return 0
    if cmd in TOOLS:
        module, func, _ = TOOLS[cmd]
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    hint = NOT_COMMANDS.get(cmd, "")
    print(f"ditfuse: unknown command {cmd!r}{'; ' + hint if hint else ''}\n\n{_usage()}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_process()
    try:
        rc = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler, not at exit
        return rc
    except BrokenPipeError:
        # `ditfuse -h | head`: the reader left; say nothing more (Python docs' recipe: point
        # stdout at devnull so the interpreter's final flush does not raise again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
