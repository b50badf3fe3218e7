"""The mixing DataModule: ratios, determinism, rank/worker splitting, bad data, validation, config."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import DiTFuseDataModule
from datamodules.io import encode_png
from datamodules.mixing import BadSampleWarning, TooManyBadSamples, kind_schedule
from datamodules.writers import json_bytes, write_samples

SIZE = 16  # tiny images keep 2,000-sample streams to seconds


def _img(rng: np.random.Generator, channels: int = 3) -> bytes:
    shape = (SIZE, SIZE, channels) if channels == 3 else (SIZE, SIZE)
    return encode_png(rng.integers(0, 256, shape, dtype=np.uint8))


def _samples(kind: str, n: int, rng: np.random.Generator, prefix: str):
    for i in range(n):
        key = f"{prefix}{kind}_{i:04d}"
        if kind == "fusion":
            task = ("ivif", "mff", "mef")[i % 3]
            files = {"img1.png": _img(rng), "img2.png": _img(rng, 1), "json": json_bytes({"task": task})}
            if task != "ivif":
                files["target.png"] = _img(rng)
        elif kind == "m3":
            files = {"img.png": _img(rng), "json": json_bytes({})}
        elif kind == "seg":
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[4:10, 3:12] = 2
            files = {"img1.png": _img(rng), "img2.png": _img(rng), "mask.png": encode_png(mask),
                     "json": json_bytes({"classes": {"0": "background", "2": "car"}})}
        else:
            files = {"img1.png": _img(rng), "img2.png": _img(rng), "target.png": _img(rng), "json": json_bytes({})}
        yield key, files


def make_shards(root: Path, n: int = 24, shard_size: int = 6, prefix: str = "") -> dict[str, str]:
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("fusion", "m3", "seg", "control"):
        write_samples(kind, _samples(kind, n, rng, prefix), root / kind, shard_size)
        out[kind] = str(root / kind / f"{kind}-*.tar")
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def _dm(shards, **kw) -> DiTFuseDataModule:
    args = {"shards": shards, "image_size": SIZE, "batch_size": 8, "num_workers": 0, "batches_per_epoch": 4,
                "m3_block_sizes": [4, 8], "val_shards": shards, "val_samples_per_task": 4}
    args.update(kw)
    dm = DiTFuseDataModule(**args)
    dm.setup("fit")
    return dm


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batch_follows_the_contract(shards):
    batch = next(iter(_dm(shards).train_dataloader()))
    b = 8
    assert batch["images"].shape == (b, 2, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["target"].shape == (b, 3, SIZE, SIZE) and batch["control_base"].shape == (b, 3, SIZE, SIZE)
    assert batch["mask"].shape == (b, SIZE, SIZE) and batch["mask"].dtype == torch.bool
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    for name in ("kind", "task", "prompt", "subtask", "key", "meta"):
        assert len(batch[name]) == b
    for kind, task, prompt, sub in zip(batch["kind"], batch["task"], batch["prompt"], batch["subtask"]):
        assert "<img><|image_1|></img>" in prompt and "<img><|image_2|></img>" in prompt
        assert (sub is not None) == (kind == "control")
        assert task == kind or kind == "fusion"


def test_realized_ratios_of_a_four_kind_mix(shards):
    ratios = {"fusion": 0.5, "m3": 0.25, "seg": 0.15, "control": 0.10}
    dm = _dm(shards, ratios=ratios, batch_size=25, batches_per_epoch=80)  # 2,000 samples
    batches = list(dm.train_dataloader())
    assert sum(len(b["kind"]) for b in batches) == 2000
    shares = dm.mix_shares()
    for k, p in ratios.items():
        assert abs(shares[k] - p) <= 0.03, (k, shares[k], p)
    # the stratified schedule alone over many draws, with unnormalised weights
    draws = Counter(next(s) for s in [kind_schedule({"a": 2, "b": 1, "c": 0, "d": 1}, __import__("random").Random(0))]
                    for _ in range(4000))
    assert draws["c"] == 0 and abs(draws["a"] / 4000 - 0.5) < 0.01


def test_zero_ratio_disables_a_kind(shards):
    dm = _dm(shards, ratios={"fusion": 1, "m3": 0, "seg": 1, "control": 0})
    kinds = {k for b in dm.train_dataloader() for k in b["kind"]}
    assert kinds == {"fusion", "seg"}


def test_same_seed_same_batches_other_seed_other_batches(shards):
    a = list(_dm(shards, seed=1).train_dataloader())
    b = list(_dm(shards, seed=1).train_dataloader())
    c = list(_dm(shards, seed=2).train_dataloader())
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["images"], y["images"]) and x["prompt"] == y["prompt"] for x, y in zip(a, b))
    assert _keys(a) != _keys(c)


def test_next_epoch_continues_the_streams_and_a_loaded_state_resumes_them(shards):
    # changed with issue 9: an epoch no longer restarts the streams from a seed of (epoch, step);
    # it continues every stream's pass where the previous epoch stopped (positions in state_dict)
    dm = _dm(shards, batches_per_epoch=2)
    loader = dm.train_dataloader()
    e0 = list(loader)
    state = dm.state_dict()
    e1 = list(loader)
    assert len(e0) == len(e1) == 2 and not set(_keys(e0)) & set(_keys(e1))  # one pass: nothing twice
    assert sum(state["mix_counts"].values()) == 16 and state["stream_positions"]
    dm2 = _dm(shards, batches_per_epoch=2)
    dm2.load_state_dict(state)
    resumed = list(dm2.train_dataloader())
    assert _keys(resumed) == _keys(e1)  # the same continuation, crops and prompts included
    assert all(torch.equal(a["images"], b["images"]) and a["prompt"] == b["prompt"] for a, b in zip(resumed, e1))
    assert dm2.mix_counts == dm.mix_counts


def test_two_ranks_split_the_data_and_yield_equal_batches(shards):
    # 4 shards per kind: each rank reads its own shards
    r0 = list(_dm(shards, rank=0, world_size=2, batches_per_epoch=5).train_dataloader())
    r1 = list(_dm(shards, rank=1, world_size=2, batches_per_epoch=5).train_dataloader())
    assert len(r0) == len(r1) == 5
    assert not set(_keys(r0)) & set(_keys(r1))


def test_ranks_split_samples_when_shards_are_fewer_than_streams(tmp_path):
    few = make_shards(tmp_path, n=24, shard_size=24)  # one shard per kind, 4 streams
    seen = [set(_keys(_dm(few, rank=r, world_size=4, batches_per_epoch=3).train_dataloader())) for r in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not seen[i] & seen[j]


def test_workers_split_and_count_exactly(shards):
    dm = _dm(shards, num_workers=2, batches_per_epoch=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and sum(dm.mix_counts.values()) == 40
    keys = _keys(batches)
    # two workers, disjoint shard parts: a key only repeats once its own stream has cycled
    per_worker = [set(_keys(batches[i::2])) for i in range(2)]
    assert not per_worker[0] & per_worker[1]
    assert len(keys) == 40


def test_lightning_does_not_warn_that_the_exact_length_may_be_wrong(shards, recwarn):
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.data import has_len_all_ranks

    loader = _dm(shards, num_workers=2, batches_per_epoch=5).train_dataloader()
    assert has_len_all_ranks(loader, SingleDeviceStrategy(torch.device("cpu")))  # what fit calls
    assert not [w for w in recwarn if "__len__" in str(w.message)]


def test_a_process_whose_loader_was_not_shut_down_still_exits():
    """Workers ignore SIGTERM (a job step's signal is for the main process), which is what
    multiprocessing's exit sends its daemonic children before joining them: a loader left
    iterating (an exception inside a validation within fit leaves the training iterator so)
    made the exit wait forever. end_workers_at_exit kills them at exit instead."""
    code = ("import torch.utils.data as tud\n"
            "from datamodules.workers import end_workers_at_exit, ignore_stop_signals\n"
            "class Endless(tud.IterableDataset):\n"
            "    def __iter__(self):\n"
            "        while True:\n"
            "            yield 1\n"
            "loader = tud.DataLoader(Endless(), batch_size=None, num_workers=1, worker_init_fn=ignore_stop_signals)\n"
            "end_workers_at_exit()\n"
            "it = iter(loader)\n"
            "assert next(it) == 1\n"
            "print('exiting with a live worker', flush=True)\n")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert res.returncode == 0 and "exiting with a live worker" in res.stdout, res.stderr[-2000:]


def test_validation_is_finite_deterministic_one_task_per_batch_round_robin(shards):
    dm = _dm(shards, val_batch_size=3)
    v1, v2 = list(dm.val_dataloader()), list(dm.val_dataloader())
    tasks = [b["task"] for b in v1]
    assert all(len(set(t)) == 1 for t in tasks)  # one task per batch
    # changed with issue 10: tasks interleave round-robin, so the first 6 batches hold every task
    order = [t[0] for t in tasks]
    assert order == ["ivif", "mff", "mef", "m3", "seg", "control"] * 2
    assert all(b["key"] == [str(k) for k in b["key"]] for b in v1) and len({k for b in v1 for k in b["key"]}) == 24
    assert Counter(t for b in v1 for t in b["task"]) == {t: 4 for t in ("ivif", "mff", "mef", "m3", "seg", "control")}
    assert all(torch.equal(a["images"], b["images"]) and a["prompt"] == b["prompt"] for a, b in zip(v1, v2))
    train = next(iter(dm.train_dataloader()))
    assert set(v1[0]) == set(train)
    assert all(torch.isfinite(b["images"]).all() and torch.isfinite(b["target"]).all() for b in v1)


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not a tar file at all" * 50)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _with_bad_image(path: Path) -> None:
    """Rewrite a tar so its second sample's img1 is not an image."""
    src = path.read_bytes()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(src)) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        members = [m for m in tin.getmembers() if m.isfile()]
        second_key = sorted({m.name.split(".")[0] for m in members})[1]
        for m in members:
            data = tin.extractfile(m).read()
            if m.name == f"{second_key}.img1.png":
                data = b"\x89PNG garbage"
                m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def test_corrupt_shards_are_skipped_counted_and_warned(tmp_path):
    s = make_shards(tmp_path, n=24, shard_size=6)
    _garbage(tmp_path / "m3" / "m3-000001.tar")
    _truncate(tmp_path / "seg" / "seg-000002.tar")
    _with_bad_image(tmp_path / "fusion" / "fusion-000000.tar")
    dm = _dm(s, max_bad_fraction=0.5, batches_per_epoch=12)
    with pytest.warns(BadSampleWarning, match="m3-000001.tar|seg-000002.tar|fusion-000000.tar"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 12 and all(len(b["key"]) == 8 for b in batches)
    assert "fusion_0001" not in _keys(batches)  # the undecodable sample never reaches a batch


def test_too_many_bad_samples_stop_naming_the_shard(tmp_path):
    s = make_shards(tmp_path, n=24, shard_size=6)
    for i in range(3):
        _garbage(tmp_path / "m3" / f"m3-00000{i}.tar")
    dm = _dm(s, ratios={"fusion": 0, "m3": 1, "seg": 0, "control": 0}, max_bad_fraction=0.05, batches_per_epoch=20)
    with pytest.warns(BadSampleWarning), pytest.raises(TooManyBadSamples, match=r"m3-00000\d\.tar"):
        list(dm.train_dataloader())


def test_a_source_with_only_garbage_stops_with_its_shards(tmp_path):
    s = make_shards(tmp_path, n=6, shard_size=6)
    _garbage(tmp_path / "seg" / "seg-000000.tar")
    dm = _dm(s, ratios={"seg": 1}, max_bad_fraction=1.0)
    with pytest.warns(BadSampleWarning), pytest.raises(TooManyBadSamples, match="seg-000000.tar"):
        list(dm.train_dataloader())


@pytest.mark.parametrize("kwargs, setting", [
    ({"ratios": {"fusion": -1.0}}, "ratios"),
    ({"ratios": {"fusion": 0.0, "m3": 0.0}}, "ratios"),
    ({"ratios": {"video": 1.0}}, "ratios"),
    ({"shards": {"fusion": "x.tar"}, "ratios": {"fusion": 1.0, "seg": 1.0}}, "shards.seg"),
    ({"image_size": 40}, "image_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"m3_both_fraction": 2.0}, "both_fraction"),
    ({"control_subtasks": {"SHARP+": 1.0}}, "control_subtasks"),
    ({"max_bad_fraction": -0.1}, "max_bad_fraction"),
])
def test_invalid_config_fails_before_work_naming_the_setting(kwargs, setting):
    args = {"shards": {k: "none.tar" for k in ("fusion", "m3", "seg", "control")}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=setting):
        DiTFuseDataModule(**args)


def test_missing_shard_files_name_the_setting(tmp_path):
    dm = DiTFuseDataModule(shards={"m3": str(tmp_path / "nothing-*.tar")}, ratios={"m3": 1.0}, image_size=16)
    with pytest.raises(FileNotFoundError, match="shards.m3"):
        dm.setup("fit")


def test_control_rows_carry_the_pre_op_base(shards):
    from datamodules.targets import control_op

    dm = _dm(shards, ratios={"control": 1.0}, batches_per_epoch=1)
    batch = next(iter(dm.train_dataloader()))
    for i, sub in enumerate(batch["subtask"]):
        base, target = (batch["control_base"][i] + 1) / 2, (batch["target"][i] + 1) / 2
        assert torch.allclose(control_op(base, sub), target, atol=1e-5)
    assert dm.normalized_ratios == {"control": 1.0}


def test_m3_blocks_larger_than_the_crop_are_not_drawn():
    from datamodules.m3 import M3Config, m3_pair

    r = m3_pair(torch.rand(3, 16, 16), M3Config(block_sizes=(4, 64)), seed=0, key="k")
    assert r.block_size == 4


def test_lightning_trainer_reseeds_each_epoch_and_counts(shards):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.keys: list[list[str]] = []

        def training_step(self, batch, _):
            self.keys.append(list(batch["key"]))
            return (self.w - batch["images"].mean()).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _dm(shards, batches_per_epoch=2)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.keys) == 4 and probe.keys[:2] != probe.keys[2:]
    assert sum(dm.mix_counts.values()) == 32
