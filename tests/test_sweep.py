"""`ditfuse sweep` (grid -> configs, manifest, SLURM array, local runs) and HParamsLogger."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ditfuse.commands.sweep as sweep_mod
from callbacks.hparams import HParamsLogger
from ditfuse.commands.lightning_cli import run_lightning_cli
from ditfuse.commands.sweep import main as sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

BASE = """\
seed_everything: 3
trainer:
  max_steps: 10
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpts, save_last: true}
model:
  optimizer: {lr: 5e-4}
data:
  ratios: {fusion: 0.05, m3: 0.7, seg: 0.15, control: 0.1}
  batch_size: 4
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A small base YAML (the fit CLI fills in every other setting)."""
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


needs_demo = needs_demo_file = pytest.mark.skipif(not DEMO.is_file(), reason="configs/demo.yaml is not there yet")


def _print_config(*args: str) -> dict:
    """What `ditfuse fit ARGS --print_config` prints, run in this process (as the command parses)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        run_lightning_cli(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()[-3000:]
    return yaml.safe_load(out.getvalue())


def _run(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = sweep(args)
    return rc, err.getvalue()


# ------------------------------------------------------------------------------------------------
# writing a sweep
# ------------------------------------------------------------------------------------------------
def test_sweep_writes_one_config_per_point(base, tmp_path):
    out = tmp_path / "sw"
    rc, _ = _run(["--config", str(base), "--grid", "data.ratios.m3=0.6,0.75,0.9",
                  "--grid", "data.ratios.fusion=0.05,0.1", "--grid", "model.optimizer.lr=1e-4", "--out", str(out)])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    points = manifest["points"]
    assert [p["name"] for p in points][:2] == ["p000_m3=0.6_fusion=0.05", "p001_m3=0.6_fusion=0.1"]
    assert len(points) == 6 and len({p["name"] for p in points}) == 6
    combos = {(p["values"]["data.ratios.m3"], p["values"]["data.ratios.fusion"]) for p in points}
    assert combos == {(m, f) for m in (0.6, 0.75, 0.9) for f in (0.05, 0.1)}
    assert (out / "manifest.csv").read_text().count("\n") == 7

    for p in points:
        cfg = yaml.safe_load(Path(p["config"]).read_text())
        assert cfg["data"]["ratios"]["m3"] == p["values"]["data.ratios.m3"]
        assert cfg["data"]["ratios"]["seg"] == 0.15  # untouched keys keep the base value
        assert cfg["model"]["optimizer"]["lr"] == 1e-4  # a float, not YAML 1.1's string
        logger = cfg["trainer"]["logger"]["init_args"]
        assert logger["version"] == p["name"] and logger["default_hp_metric"] is False
        assert Path(logger["save_dir"]) / logger["name"] / p["name"] == Path(p["log_dir"])
        assert cfg["trainer"]["default_root_dir"] == p["run_dir"]
        ckpt, hp = cfg["trainer"]["callbacks"]
        assert ckpt["init_args"]["dirpath"] == str(Path(p["run_dir"]) / "ckpts")  # no two points share it
        assert hp["class_path"] == "callbacks.HParamsLogger"

    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5" in script and "#SBATCH --signal=SIGUSR1@90" in script
    assert "#SBATCH --requeue" in script and "${CONFIGS[$SLURM_ARRAY_TASK_ID]}" in script
    assert all(p["config"] in script for p in points)
    assert subprocess.run(["bash", "-n", str(out / "sweep.sbatch")]).returncode == 0


def test_sweep_unknown_key_fails_before_writing(base, tmp_path):
    out = tmp_path / "sw"
    rc, err = _run(["--config", str(base), "--grid", "data.ratio.m3=0.5,0.6", "--out", str(out)])
    assert rc == 2
    assert "'data.ratio.m3'" in err and "Did you mean 'ratios'" in err
    assert not out.exists()
    rc, err = _run(["--config", str(base), "--grid", "data.batchsize=8", "--out", str(out)])
    assert rc == 2 and "'data.batchsize'" in err and "batch_size" in err
    rc, err = _run(["--config", str(base), "--grid", "trainer.max_step=8", "--out", str(out)])
    assert rc == 2 and "'trainer.max_step'" in err and not out.exists()


def test_sweep_string_values_arrive_verbatim(base, tmp_path):
    out = tmp_path / "sw"
    rc, err = _run(["--config", str(base), "--grid", f"data.demo_dir={tmp_path / 'd1'},{tmp_path / 'd2'}",
                    "--grid", "data.m3_block_sizes=[8, 16]", "--out", str(out)])
    assert rc == 0, err
    cfgs = [yaml.safe_load(c.read_text())["data"] for c in sorted((out / "points").glob("*.yaml"))]
    assert [c["demo_dir"] for c in cfgs] == [str(tmp_path / "d1"), str(tmp_path / "d2")]  # no quotes kept
    assert all(c["m3_block_sizes"] == [8, 16] for c in cfgs)


def test_sweep_may_add_a_kind_to_a_mapping_argument(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data:\n  ratios: {m3: 1.0}\n")
    assert _run(["--config", str(base), "--grid", "data.ratios.fusion=0.0,0.1", "--out", str(tmp_path / "o")])[0] == 0
    cfgs = sorted((tmp_path / "o" / "points").glob("*.yaml"))
    assert [yaml.safe_load(c.read_text())["data"]["ratios"] for c in cfgs] == [
        {"m3": 1.0, "fusion": 0.0}, {"m3": 1.0, "fusion": 0.1}]


def test_sweep_refuses_an_unwritable_out_before_composing(base, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _run(["--config", str(base), "--grid", "data.ratios.m3=0.6,0.9", "--out", str(blocker / "sw")])
    assert rc == 2 and "is not writable" in err and "--out" in err


@needs_demo_file
@pytest.mark.slow
def test_sweep_point_is_the_config_fit_composes(tmp_path):
    """A later file replaces the `ratios` mapping (fit does; OmegaConf.merge would keep seg and
    control from demo.yaml), a dotted grid key then sets one entry: the point equals what a
    separate `ditfuse fit ... --print_config` process prints for the same arguments."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("data:\n  ratios: {fusion: 0.5, m3: 0.5}\n  m3_block_sizes: [8]\n")
    out = tmp_path / "sw"
    rc, err = _run(["--config", str(DEMO), "--config", str(exp), "--grid", "data.ratios.m3=0.6,0.9",
                    "--out", str(out)])
    assert rc == 0, err
    point = json.loads((out / "manifest.json").read_text())["points"][0]
    swept = yaml.safe_load(Path(point["config"]).read_text())
    fit = _print_config("--config", str(DEMO), "--config", str(exp), "--data.ratios.m3=0.6")
    assert swept["data"]["ratios"] == fit["data"]["ratios"] == {"fusion": 0.5, "m3": 0.6}
    # the sweep only re-routes outputs (run folder, logger, checkpoint dirs) and adds HParamsLogger
    routed = ("default_root_dir", "logger", "callbacks")
    assert {k: v for k, v in swept["trainer"].items() if k not in routed} == \
        {k: v for k, v in fit["trainer"].items() if k not in routed}
    assert {k: v for k, v in swept.items() if k != "trainer"} == {k: v for k, v in fit.items() if k != "trainer"}
    strip = lambda cbs: [(c["class_path"], {k: v for k, v in (c.get("init_args") or {}).items() if k != "dirpath"})
                         for c in cbs if not c["class_path"].endswith("HParamsLogger")]  # noqa: E731
    assert strip(swept["trainer"]["callbacks"]) == strip(fit["trainer"]["callbacks"])


def test_sweep_never_overwrites_without_flag(base, tmp_path):
    out = tmp_path / "sw"
    args = ["--config", str(base), "--grid", "data.ratios.m3=0.6,0.9", "--out", str(out)]
    assert _run(args)[0] == 0
    marker = out / "points" / "keep.txt"
    marker.write_text("x")
    rc, err = _run(args)
    assert rc == 2 and "--overwrite" in err and marker.exists()
    assert _run([*args, "--overwrite"])[0] == 0
    assert not marker.exists() and len(list((out / "points").glob("*.yaml"))) == 2
    other = tmp_path / "not_a_sweep"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    rc, err = _run(["--config", str(base), "--out", str(other), "--overwrite"])
    assert rc == 2 and "not a sweep directory" in err and (other / "precious.txt").exists()


def test_sweep_linked_axis_on_the_command_line(base, tmp_path):
    out = tmp_path / "sw"
    rc, _ = _run(["--config", str(base), "--grid", "data.ratios.fusion,data.ratios.m3=0:0.75,0.025:0.725",
                  "--out", str(out)])
    assert rc == 0
    points = json.loads((out / "manifest.json").read_text())["points"]
    assert [p["name"] for p in points] == ["p000_fusion=0", "p001_fusion=0.025"]
    assert points[1]["values"] == {"data.ratios.fusion": 0.025, "data.ratios.m3": 0.725}
    rc, err = _run(["--config", str(base), "--grid", "data.ratios.fusion,data.ratios.m3=0:0.75,0.1",
                    "--out", str(tmp_path / "bad")])
    assert rc == 2 and "'0.1' has 1 values for 2 keys" in err


def test_sweep_linked_axis_from_grid_file(base, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("share:\n"
                    "  - {_name: fusion0, data.ratios.fusion: 0.0, data.ratios.m3: 0.75}\n"
                    "  - {_name: fusion10, data.ratios.fusion: 0.1, data.ratios.m3: 0.65}\n"
                    "data.batch_size: [2, 8]\n")
    out = tmp_path / "sw"
    assert _run(["--config", str(base), "--grid-file", str(grid), "--out", str(out)])[0] == 0
    names = [p["name"] for p in json.loads((out / "manifest.json").read_text())["points"]]
    assert names == ["p000_fusion0_batch_size=2", "p001_fusion0_batch_size=8",
                     "p002_fusion10_batch_size=2", "p003_fusion10_batch_size=8"]
    cfg = yaml.safe_load((out / "points" / f"{names[2]}.yaml").read_text())
    assert cfg["data"]["ratios"] == {"fusion": 0.1, "m3": 0.65, "seg": 0.15, "control": 0.1}


# ------------------------------------------------------------------------------------------------
# HParamsLogger on a toy run: what TensorBoard's HParams view reads
# ------------------------------------------------------------------------------------------------
def read_hparams(log_dir: Path) -> tuple[dict, set[str], dict[str, list[float]]]:
    """(hparams of the session, declared metric tags, scalar tag -> values) of a TB run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value if v.HasField("string_value")
               else v.bool_value for k, v in start.hparams.items()}
    scalars = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    return hparams, {m.name.tag for m in exp.metric_infos}, scalars


class _ToyDM(pl.LightningDataModule):
    def __init__(self, ratios: dict[str, float], batch_size: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.ratios, self.batch_size = ratios, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=self.batch_size)


class _Toy(pl.LightningModule):
    def __init__(self, preset: str = "toy", optimizer: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/m3/psnr", 20.0 + self.current_epoch)
        self.log("val/loss", self.net(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("metrics", [["val/m3/psnr", "val/loss"], None])
def test_hparams_logger_declares_metrics_and_logs_ratios(tmp_path, metrics):
    logger = TensorBoardLogger(tmp_path, name="tb", version="run", default_hp_metric=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[HParamsLogger(metrics=metrics, extra={"sweep": "t"})])
    trainer.fit(_Toy(optimizer={"lr": 0.1}), datamodule=_ToyDM({"m3": 3.0, "fusion": 1.0}))

    hparams, declared, scalars = read_hparams(Path(logger.log_dir))
    assert declared == {"val/m3/psnr", "val/loss"}
    assert hparams["data.ratios.m3"] == 3.0 and hparams["data.share.fusion"] == 0.25
    assert hparams["model.preset"] == "toy" and hparams["model.optimizer.lr"] == 0.1
    assert hparams["data.batch_size"] == 2 and hparams["trainer.global_batch"] == 2
    assert hparams["sweep"] == "t"
    assert scalars["val/m3/psnr"] == [20.0, 21.0]  # the real values only: nothing fake at fit start
    assert "hp_metric" not in scalars


def test_hparams_logger_rejects_an_empty_metric_list():
    with pytest.raises(ValueError, match="at least one tag"):
        HParamsLogger(metrics=[])


# ------------------------------------------------------------------------------------------------
# with the real CLI and the demo config
# ------------------------------------------------------------------------------------------------
def _demo_sweep(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "demo_sweep"
    rc, err = _run(["--config", str(DEMO), "--grid", "data.ratios.m3=0.5,0.9", *extra, "--out", str(out)])
    assert rc == 0, err
    return json.loads((out / "manifest.json").read_text())




@needs_demo
@pytest.mark.slow
def test_sweep_checks_keys_the_yaml_leaves_at_their_default(tmp_path):
    """A key the YAML does not set is looked up among every setting the CLI knows."""
    out = tmp_path / "sw"
    rc, err = _run(["--config", str(DEMO), "--grid", "model.flow.t_shift=1.0,3.0", "--out", str(out)])
    assert rc == 0, err
    cfg = yaml.safe_load(next((out / "points").glob("p001_*.yaml")).read_text())
    assert cfg["model"]["flow"]["t_shift"] == 3.0
    rc, err = _run(["--config", str(DEMO), "--grid", "model.flow.t_shfit=1.0,3.0", "--out", str(tmp_path / "x")])
    assert rc == 2 and "--model.flow.t_shfit=1.0" in err and "did you mean --model.flow.t_shift?" in err
    assert not (tmp_path / "x").exists()


@needs_demo
@pytest.mark.slow
def test_sweep_configs_parse_with_print_config(tmp_path):
    manifest = _demo_sweep(tmp_path)
    for p in manifest["points"]:
        printed = _print_config("--config", p["config"])
        data = printed["data"].get("init_args", printed["data"])
        assert data["ratios"]["m3"] == p["values"]["data.ratios.m3"]


@pytest.mark.slow
def test_sweep_commands_in_experiment_headers_work(tmp_path, monkeypatch):
    """Every `ditfuse sweep ...` line in a configs/ header comment writes its points."""
    import shlex

    monkeypatch.chdir(ROOT)
    commands = [line.split("ditfuse sweep", 1)[1] for cfg in sorted((ROOT / "configs").rglob("*.yaml"))
                for line in cfg.read_text().splitlines() if line.startswith("#") and "ditfuse sweep " in line]
    assert len(commands) >= 3
    for i, cmd in enumerate(commands):
        args = shlex.split(cmd)
        args[args.index("--out") + 1] = str(tmp_path / f"s{i}")
        rc, err = _run(args)
        assert rc == 0, f"{cmd}\n{err}"
        points = json.loads((tmp_path / f"s{i}" / "manifest.json").read_text())["points"]
        assert len(points) >= 2
    fusion = next(i for i, c in enumerate(commands) if "fusion_share" in c)
    shares = []
    for p in json.loads((tmp_path / f"s{fusion}" / "manifest.json").read_text())["points"]:
        ratios = yaml.safe_load(Path(p["config"]).read_text())["data"]["ratios"]
        shares.append(round(ratios["fusion"] / sum(ratios.values()), 4))
    assert shares == [0.0, 0.025, 0.05, 0.1]  # the weights are the real-fusion shares


@needs_demo
@pytest.mark.slow
def test_local_two_point_sweep_logs_hparams_with_final_metrics(tmp_path, monkeypatch):
    from datamodules.demo import build_demo

    monkeypatch.chdir(ROOT)
    demo = tmp_path / "demo"
    build_demo(demo)
    short = ["trainer.max_steps=4", "data.batches_per_epoch=2", f"data.demo_dir={demo}", "data.num_workers=0",
             "data.batch_size=4", "data.val_samples_per_task=1", "model.val_sampler.steps=2"]
    manifest = _demo_sweep(tmp_path, *(a for s in short for a in ("--grid", s)), "--run")
    assert [p["status"] for p in manifest["points"]] == ["ok", "ok"]
    for p in manifest["points"]:
        hparams, declared, scalars = read_hparams(Path(p["log_dir"]))
        assert hparams["data.ratios.m3"] == p["values"]["data.ratios.m3"]
        assert abs(sum(v for k, v in hparams.items() if k.startswith("data.share.")) - 1) < 1e-6
        assert hparams["model.preset"] == "tiny" and hparams["data.image_size"] == 32
        assert {"val/m3/psnr", "val/m3/psnr_mean", "val/loss"} <= declared
        assert all(tag in scalars for tag in declared)  # each declared tag has values to show
        assert len(scalars["val/m3/psnr"]) == 2  # both validations (2 epochs of 2 batches)
