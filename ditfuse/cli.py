"""`ditfuse` entry point.

`fit|validate|test|predict` go to LightningCLI (`ditfuse.lightning_cli`); the other subcommands
are plain argparse tools, each imported only when asked for so `ditfuse shards ...` does not pay
for importing the model stack.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv list, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "shards": ("datamodules.cli", "main", "write, build (demo) and inspect WebDataset shards"),
    "fuse": ("ditfuse.inference", "main", "fuse image pairs with a trained model"),
    "eval": ("ditfuse.evaluate", "main", "fusion metric table over image1/image2/fused folders"),
    "convert": ("ditfuse.convert", "main", "convert OmniGen / DiTFuse weights between layouts"),
    "sweep": ("ditfuse.sweep", "main", "expand a data-mix grid into configs and a SLURM array"),
}
LIGHTNING = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: ditfuse <command> [options]", "", "commands:"]
    lines += [f"  {c:<9} LightningCLI {c} (--config CFG [--section.key=value ...])" for c in LIGHTNING]
    lines += [f"  {c:<9} {h}" for c, (_, _, h) in TOOLS.items()]
    lines += ["", "`ditfuse <command> --help` documents each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING:
        from ditfuse.lightning_cli import run_lightning_cli

        run_lightning_cli([cmd, *rest])
        return 0
    if cmd in TOOLS:
        module, func, _ = TOOLS[cmd]
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    print(f"ditfuse: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
