"""`ditfuse fit|validate|predict`: LightningCLI over DiTFuseModule + DiTFuseDataModule.

- Configs compose the LightningCLI way: `--config a.yaml --config b.yaml`, dotted overrides
  (`--model.pretrained=/path`, `--data.ratios.m3=0.8`), `--print_config`.
- The data-mix ratios are `data.ratios` in every shipped config (what `ditfuse sweep` grids over).
- Settings are checked before anything expensive: model paths exist and have a known layout,
  LoRA / optimizer / flow / sampler settings are valid, the DataModule's own checks run and the
  run folder is writable, all before the backbone is built or a shard is read. A bad setting is
  one line naming it (`ConfigError`, printed by `ditfuse.cli`), an unknown key suggests the
  nearest valid one.
- One run folder: `trainer.default_root_dir`. TensorBoard/CSV loggers with an empty `save_dir`
  (the shipped configs: `save_dir: ""`) log there, so checkpoints (`<log dir>/checkpoints`), events and config.yaml all move
  with `--trainer.default_root_dir DIR`.
- `--ckpt_path last` continues the newest run: the logger gets the version folder holding the
  newest checkpoint, so the resumed run appends to the same curves and checkpoint folder
  (Lightning alone would open a new version_N and find no last.ckpt there).
- `trainer.precision: null` follows the device: bf16-mixed on CUDA, 32-true elsewhere.
- Checkpoints are written to a temporary name and renamed (ditfuse.checkpoint_io): a failed
  write leaves the previous last.ckpt loadable.
- The saved config overwrites its previous copy, so a rerun or a SLURM requeue into the same
  log dir does not fail.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from datamodules.datamodule import DiTFuseDataModule
from datamodules.pairs import PairsDataModule
from ditfuse.checkpoint_io import with_atomic_checkpoints
from ditfuse.interop.convert import check_pretrained
from ditfuse.model.backbone import detect_layout
from ditfuse.model.config import ModelConfig
from ditfuse.model.lora import LoraSettings
from ditfuse.module import BASE_DTYPES, DiTFuseModule, FlowSettings, OptimizerSettings
from ditfuse.sampling.sampler import SamplerSettings

FILE_LOGGERS = ("TensorBoardLogger", "CSVLogger")  # loggers whose save_dir / version we manage


class ConfigError(Exception):
    """A setting that cannot work; the message names it. `ditfuse.cli` prints it as one line."""


def _as_dict(ns: Any) -> Any:
    if hasattr(ns, "as_dict"):
        return ns.as_dict()
    return ns


def check_model_config(model: dict[str, Any]) -> None:
    """Fail fast (before building anything) on model settings that cannot work."""
    ModelConfig.from_name(model.get("preset", "tiny"), **(model.get("model_overrides") or {}))
    if model.get("pretrained"):
        detect_layout(model["pretrained"])  # raises a FileNotFoundError naming the path
        # whole files, config vs weights, host RAM: from the headers, before gigabytes are read
        check_pretrained(model["pretrained"], BASE_DTYPES.get(model.get("base_dtype")) if model.get("lora") else None)
    for key in ("vae_path", "tokenizer"):
        value = model.get(key)
        if value and value != "builtin" and not Path(value).exists():
            raise FileNotFoundError(f"model.{key}={value} does not exist (local paths only; nothing is downloaded)")
    for key, cls in (("lora", LoraSettings), ("optimizer", OptimizerSettings), ("flow", FlowSettings),
                     ("val_sampler", SamplerSettings)):
        value = model.get(key)
        if isinstance(value, dict):
            cls(**value)


# --------------------------------------------------------------------------------------------
# parse errors: one line, with the nearest valid key
# --------------------------------------------------------------------------------------------
def _known_keys(parser: Any) -> list[str]:
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", "")
        if dest and dest not in ("help", "config", "print_config"):
            keys.append(dest)
        sub = getattr(action, "_name_parser_map", None)  # subcommands
        for subparser in (sub or {}).values():
            keys += _known_keys(subparser)
    return sorted(set(keys))


def suggest_key(bad: str, known: list[str]) -> str | None:
    """`data.ratio.m3` -> `data.ratios.m3`: the longest prefix of `bad` with a close known key,
    the rest of `bad` kept."""
    parts = bad.split(".")
    for n in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:n]), parts[n:]
        if n > 1 and head in known:
            return None  # the prefix is valid: the problem is deeper, nothing to guess
        same_depth = [k for k in known if k.count(".") == n - 1]  # data.ratio -> data.ratios, not deeper
        close = difflib.get_close_matches(head, same_depth, n=1, cutoff=0.75)
        if close:
            return ".".join([close[0], *rest])
    return None


def one_line_error(message: str, known: list[str]) -> str:
    text = " ".join(str(message).split())
    unknown = re.findall(r"--([\w.\-]+)", text) if "nrecognized" in text else []
    unknown += re.findall(r'[Kk]ey "([\w.\-]+)" is not expected', text)
    unknown += re.findall(r"does not accept option '([\w.\-]+)'", text)  # a key in a --config file
    hints = [f"--{s}" for s in (suggest_key(k, known) for k in unknown) if s]
    if hints:
        text += f" (did you mean {', '.join(dict.fromkeys(hints))}?)"
    return text if len(text) <= 400 else text[:400] + " ..."


class DiTFuseParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (no 100-line usage dump)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active  # jsonargparse's own switch

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {one_line_error(message, _known_keys(parser))}\n"
                         f"(`{prog} --help` lists every setting)\n")
        self.exit(2)


# --------------------------------------------------------------------------------------------
# run folder, resume, precision
# --------------------------------------------------------------------------------------------
def _file_loggers(trainer: Any) -> list[Any]:
    """The TensorBoard/CSV logger entries (jsonargparse Namespaces) of the trainer config."""
    logger = trainer.get("logger")
    entries = logger if isinstance(logger, list) else [logger]
    return [lg for lg in entries if hasattr(lg, "get") and str(lg.get("class_path", "")).endswith(FILE_LOGGERS)]


def _root_dir(trainer: Any) -> str:
    return str(trainer.get("default_root_dir") or os.getcwd())


def route_loggers(trainer: Any) -> None:
    """Loggers with an empty save_dir log into trainer.default_root_dir (one folder per run).
    (Empty, not null: the logger classes require the argument, so the parser rejects null.)"""
    for lg in _file_loggers(trainer):
        if lg.get("init_args") is not None and lg.init_args.get("save_dir") in (None, ""):
            lg.init_args.save_dir = _root_dir(trainer)


def newest_version(root: Path) -> str | None:
    """The `version_*` folder under root whose newest checkpoint is the newest (None: none)."""
    newest: tuple[float, str] | None = None
    for version in root.glob("version_*"):
        stamps = [p.stat().st_mtime for p in version.glob("checkpoints/*.ckpt")]
        if stamps and (newest is None or max(stamps) > newest[0]):
            newest = (max(stamps), version.name)
    return None if newest is None else newest[1]


def continue_newest_run(trainer: Any) -> str | None:
    """For `--ckpt_path last`: point loggers with an automatic version at the newest run."""
    for lg in _file_loggers(trainer):
        init = lg.init_args
        if init.get("version") is not None:
            continue
        root = Path(init.save_dir) / (init.get("name") or "")
        version = newest_version(root)
        if version is not None:
            init.version = version
            return str(root / version)
    return None


def resolve_precision(trainer: Any) -> None:
    """precision null -> bf16-mixed on CUDA, else 32-true (CPU autocast to bf16 breaks the model)."""
    if trainer.get("precision") is not None:
        return
    import torch

    on_gpu = str(trainer.get("accelerator") or "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    trainer.precision = "bf16-mixed" if on_gpu else "32-true"


def check_writable(folder: str | Path, setting: str) -> None:
    """Create `folder` and write a probe file in it, so a read-only disk fails before any work."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}={folder} is not writable ({exc.strerror or exc}); choose another folder "
                          f"with --{setting}=DIR") from None


# what a collective raises when a peer process is gone (gloo: the socket closes; NCCL / a stuck
# peer: the process-group timeout, trainer.strategy.timeout, expires)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
             "NCCL communicator was aborted")
BACKENDS = ("gloo", "NCCL", "c10d", "ProcessGroup")  # ... raised by a collective, not, say, by a data read


def lost_rank_line(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank died, else None.

    The lost rank is named when the world has two ranks (the other one); with more, the failed
    collective does not say which (its peer address is in the message)."""
    import torch.distributed as dist

    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    hit = next((x for x in chain if any(p in str(x) for p in PEER_LOST) and any(b in str(x) for b in BACKENDS)),
               None)
    if hit is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    lost = f"rank {1 - rank}" if world == 2 else "another rank"
    first = str(hit).strip().splitlines()[0][:200]
    return (f"{lost} of {world} was lost (its process died or stopped answering); rank {rank} stopped when a "
            f"collective failed ({first}). Resume with the same command and --ckpt_path last")


def global_batch_line(trainer: Any, datamodule: Any) -> str:
    world, bs = trainer.world_size, getattr(datamodule, "batch_size", None)
    accum = trainer.accumulate_grad_batches
    if bs is None:
        return f"world size {world}, accumulate_grad_batches {accum}"
    return (f"global batch {world * bs * accum} (world size {world} x data.batch_size {bs} x "
            f"accumulate_grad_batches {accum})")


class DiTFuseCLI(LightningCLI):
    resumed_run: str | None = None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        self.parser_class = DiTFuseParser
        return super().init_parser(**kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Checkpoints are written atomically (ditfuse.checkpoint_io) unless trainer.plugins
        chooses a CheckpointIO."""
        if self.subcommand != "predict":
            kwargs.setdefault("plugins", with_atomic_checkpoints(self._get(self.config_init, "trainer",
                                                                           default={}).get("plugins")))
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        try:
            self._check(cfg)
        except ConfigError:
            raise
        except (ValueError, TypeError, FileNotFoundError, KeyError, MemoryError) as exc:
            raise ConfigError(str(exc).strip("'\"")) from exc

    def _check(self, cfg: Any) -> None:
        check_model_config(_as_dict(cfg.get("model")) or {})
        data = _as_dict(cfg.get("data"))
        if isinstance(data, dict):
            # DataModule __init__ only checks settings (no I/O): run it once now, before the
            # backbone (GBs for omnigen-v1) is built, so a bad data setting fails in seconds
            self.datamodule_class(**data)
        trainer = cfg.trainer
        resolve_precision(trainer)
        if self.subcommand == "predict":
            return
        route_loggers(trainer)
        check_writable(_root_dir(trainer), "trainer.default_root_dir")
        for lg in _file_loggers(trainer):
            if lg.init_args.save_dir != _root_dir(trainer):
                check_writable(lg.init_args.save_dir, "trainer.logger.init_args.save_dir")
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            self.resumed_run = continue_newest_run(trainer)

    def before_fit(self) -> None:
        """Say where the run writes and how big a step is, before the first batch."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir
        ckpt = next((cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)), None)
        lines = [f"[ditfuse] run folder: {log_dir} (checkpoints: {ckpt or Path(log_dir) / 'checkpoints'})",
                 f"[ditfuse] {global_batch_line(trainer, self.datamodule)}"]
        if self.resumed_run:
            lines.append(f"[ditfuse] --ckpt_path last: continuing the newest run, {self.resumed_run}")
        print("\n".join(lines), flush=True)


def datamodule_for(subcommand: str | None):
    """`predict` reads folders of pairs (datamodules.pairs.PairsDataModule, configs/predict.yaml);
    fit/validate read shards (datamodules.datamodule.DiTFuseDataModule)."""
    if subcommand == "predict":
        return PairsDataModule
    return DiTFuseDataModule


def run_lightning_cli(args: list[str]) -> DiTFuseCLI:
    args = list(args)
    # `ditfuse fit ...` passes sys.argv[1:] explicitly; LightningCLI warns when both are set
    cli_args = None if args == sys.argv[1:] else args
    subcommand = args[0] if args else None
    # fit/validate save the resolved config next to the logs (overwritten on a requeue);
    # predict has no log folder, and a config.yaml dropped into the working directory helps nobody
    save_config = {} if subcommand == "predict" else {"save_config_kwargs": {"overwrite": True}}
    return DiTFuseCLI(
        DiTFuseModule,
        datamodule_for(subcommand),
        args=cli_args,
        seed_everything_default=0,
        save_config_callback=None if subcommand == "predict" else SaveConfigCallback,
        **save_config,
        # allow_abbrev=False: argparse would take `--trainer.max_step=5` as max_steps, silently
        parser_kwargs={"default_env": False, "prog": "ditfuse", "allow_abbrev": False},
    )
