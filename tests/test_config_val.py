"""Every shipped fit config validates every task it trains: stand-in shards (the demo's, copied to
the paths each config names) give a non-empty validation loader covering the trained tasks, from
its val_shards or from the hold-out split of its training shards."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import pytest
import yaml

from datamodules import DiTFuseDataModule
from ditfuse.core.prompts import FUSION_TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASES = ("demo.yaml", "omnigen_lora.yaml")
# overrides composed after omnigen_lora.yaml (later --config files win key by key)
OVERLAYS = sorted(str(p.relative_to(CONFIGS)) for p in [*CONFIGS.glob("experiments/*.yaml"),
                                                          *CONFIGS.glob("cluster/*.yaml")])
COMPOSED = [(b,) for b in BASES] + [("omnigen_lora.yaml", o) for o in OVERLAYS]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _data_section(files: tuple[str, ...]) -> dict:
    data: dict = {}
    for f in files:
        data = _merge(data, yaml.safe_load((CONFIGS / f).read_text()).get("data") or {})
    return data


def _stand_in(pattern: str, source: Path, root: Path) -> str:
    """Copy the demo tars of one kind to where `pattern` points (re-rooted under `root`)."""
    target = root / pattern.lstrip("/")
    folder = target.parent if glob.has_magic(target.name) or target.suffix == ".tar" else target
    folder.mkdir(parents=True, exist_ok=True)
    for tar in source.glob("*.tar"):
        shutil.copy(tar, folder / tar.name)
    assert glob.glob(str(target)) or folder.is_dir(), f"stand-in tars do not match {pattern}"
    return str(target)


def _trained_tasks(ratios: dict) -> set[str]:
    kinds = {k for k, w in ratios.items() if float(w) > 0}
    return ({*FUSION_TASKS} if "fusion" in kinds else set()) | (kinds - {"fusion"})


@pytest.mark.parametrize("files", COMPOSED, ids=["+".join(f) for f in COMPOSED])
def test_shipped_config_validates_every_trained_task(files, tmp_path, demo_dir):
    data = _data_section(files)
    if "demo_dir" in data:
        data["demo_dir"] = str(demo_dir)
    for key, split in (("shards", "train"), ("val_shards", "val")):
        if data.get(key):
            data[key] = {kind: _stand_in(p, demo_dir / split / kind, tmp_path) for kind, p in data[key].items()}
    assert data.get("val_shards") or data.get("val_holdout") or data.get("demo_dir"), \
        f"{'+'.join(files)}: no data.val_shards, data.val_holdout or data.demo_dir"
    if data.get("val_holdout") and not data.get("val_shards"):
        # the demo stand-ins hold ~10 samples per task where a real kind holds thousands: hold out
        # 1 in 2 instead of 1 in 100 so the hold-out scan finds samples of every task
        data["val_holdout_every"] = 2
    if data.get("buckets"):
        data["max_upscale"] = 16.0  # the stand-ins are 96 px crops; real data reaches the 1024 px buckets
    data["num_workers"] = 0
    dm = DiTFuseDataModule(**data)
    dm.setup("fit")
    assert len(dm.val_dataloader()) > 0, f"{'+'.join(files)}: empty validation loader"
    missing = _trained_tasks(data["ratios"]) - set(dm.val_set.task_counts)
    assert not missing, f"{'+'.join(files)} trains {sorted(missing)} but validates none of them"
