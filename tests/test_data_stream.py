"""Whole-pass streams, resume, resolution buckets, the mff/mef no-target rule, validation hold-out,
and the `ditfuse shards write` safeguards (issue 9 and the data-side parts of issues 10 and 12)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_data_mixing import SIZE, _keys, make_shards

from datamodules import DiTFuseDataModule
from datamodules.buckets import NoBucketError, choose_bucket, make_buckets
from datamodules.io import encode_png
from datamodules.mixing import BadSampleWarning
from datamodules.pipelines import MissingTargetError, PipelineConfig, process
from datamodules.streams import SourceStream
from datamodules.writers import json_bytes, write_fusion, write_samples

ROOT = Path(__file__).resolve().parents[1]


def _m3_shards(root: Path, shards: int, per_shard: int, hw: list[tuple[int, int]] | None = None) -> str:
    rng = np.random.default_rng(0)
    sizes = hw or [(SIZE, SIZE)]

    def samples():
        for i in range(shards * per_shard):
            h, w = sizes[i % len(sizes)]
            yield f"s{i // per_shard:02d}_{i:05d}", {"img.png": encode_png(rng.integers(0, 256, (h, w, 3), np.uint8)),
                                                     "json": json_bytes({})}
    write_samples("m3", samples(), root, per_shard)
    return str(root / "m3-*.tar")


def _dm(pattern: str, **kw) -> DiTFuseDataModule:
    args = {"shards": {"m3": pattern}, "ratios": {"m3": 1.0}, "image_size": SIZE, "batch_size": 5,
            "num_workers": 0, "batches_per_epoch": 4, "m3_block_sizes": [4], "shuffle_buffer": 8, "open_shards": 2}
    args.update(kw)
    dm = DiTFuseDataModule(**args)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------
# whole passes
# ---------------------------------------------------------------------------------------------
def test_a_pass_covers_every_sample_exactly_once_over_2_ranks_x_2_workers(tmp_path):
    # 8 shards x 30 samples, buffer 8 (< a shard), 4 streams of 2 shards (60 samples) each:
    # 3 batches of 5 per worker per epoch -> 4 epochs are exactly one pass
    pattern = _m3_shards(tmp_path, 8, 30)
    dms = [_dm(pattern, rank=r, world_size=2, num_workers=2, batches_per_epoch=6) for r in (0, 1)]
    loaders = [dm.train_dataloader() for dm in dms]
    epochs = [[_keys(list(loader)) for loader in loaders] for _ in range(4)]
    seen = Counter(k for epoch in epochs for rank in epoch for k in rank)
    assert len(seen) == 240 and set(seen.values()) == {1}  # every sample once: no repeats, no gaps
    # the next epoch starts the second pass, with another order
    second = [_keys(list(loader)) for loader in loaders]
    assert all(len(r) == 30 for r in second) and second != epochs[0]


def test_several_shards_are_open_at_once_and_mixed(tmp_path):
    s = SourceStream("m3", _expand(_m3_shards(tmp_path, 4, 30)), 0, 1, 0, lambda *a: None, buffer=8, open_shards=2)
    first = [next(s)["__key__"] for _ in range(10)]
    assert len({k[:3] for k in first}) == 2  # two shards interleaved: a batch is not a run of one shard
    rest = [next(s)["__key__"] for _ in range(110)]
    assert len(set(first + rest)) == 120 and s.pos.pass_ == 0  # the whole pass, nothing repeated
    assert next(s)["__pos__"][0] == 1  # then the next pass


def _expand(pattern: str) -> list[str]:
    from datamodules.schema import expand_shards

    return expand_shards(pattern)


def test_resume_mid_pass_and_mid_epoch_continues_the_pass(tmp_path):
    # 2 workers = 2 streams of 40 samples; 3 batches of 5 per worker per epoch
    pattern = _m3_shards(tmp_path, 4, 20)
    dm = _dm(pattern, num_workers=2, batches_per_epoch=6)
    first = []
    for i, batch in enumerate(dm.train_dataloader()):
        first.append(batch)
        if i == 2:
            break  # an awkward moment: mid-epoch, both workers mid-window, batches prefetched
    state = json.loads(json.dumps(dm.state_dict()))  # what a checkpoint round trip keeps
    resumed = _dm(pattern, num_workers=2, batches_per_epoch=6)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    rest = list(loader) + list(loader)  # worker 0: 10 + 30 = its 40, worker 1: 5 + 30 of its 40
    keys = _keys(first) + _keys(rest)
    assert len(keys) == 75 and len(set(keys)) == 75  # nothing replayed, nothing restarted
    assert _keys(list(dm.train_dataloader())) == _keys(rest[:6])  # the interrupted module continues alike


def test_lightning_resume_trains_on_exactly_what_the_uninterrupted_run_trains_on(tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.keys: list[str] = []

        def training_step(self, batch, _):
            self.keys += batch["key"]
            return (self.w - batch["images"].mean()).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt: Path | None = None, save: Path | None = None) -> list[str]:
        probe = Probe()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(probe, datamodule=_dm(pattern, batches_per_epoch=5), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return probe.keys

    pattern = _m3_shards(tmp_path, 4, 20)
    whole = fit(8)
    part = fit(3, save=tmp_path / "mid.ckpt")  # stops mid-epoch; Lightning has prefetched batch 4
    rest = fit(8, ckpt=tmp_path / "mid.ckpt")
    assert part + rest == whole and len(set(whole)) == 40


# ---------------------------------------------------------------------------------------------
# buckets
# ---------------------------------------------------------------------------------------------
def test_bucket_shapes_and_nearest_aspect():
    assert make_buckets([[32, 48], [48, 32], [32, 32]], 16) == [(32, 32), (32, 48), (48, 32)]
    for h, w in make_buckets({"max_pixels": 1024 * 1024, "aspect_ratios": [1, 4 / 3, 3 / 4, 16 / 9]}, 16):
        assert h % 16 == 0 and w % 16 == 0 and h * w <= 1024 * 1024 and h * w > 0.85 * 1024 * 1024
    wide = make_buckets({"max_pixels": 1024 * 1024, "aspect_ratios": [16 / 9]}, 16)[0]
    assert abs(wide[1] / wide[0] - 16 / 9) < 0.05
    with pytest.raises(ValueError, match="bucket_multiple=16"):
        make_buckets([[40, 32]], 16)
    assert make_buckets([[36, 20]], 4) == [(36, 20)]  # tiny preset: 4 px per token
    b = [(32, 32), (32, 64), (64, 32), (64, 64)]
    assert b[choose_bucket(100, 210, b, 2.0)] == (32, 64)  # ~1:2 -> 1:2
    assert b[choose_bucket(300, 290, b, 2.0)] == (64, 64)  # square: the largest that fits
    assert b[choose_bucket(40, 40, b, 1.0)] == (32, 32)  # 64 would upscale 1.6x > max_upscale
    with pytest.raises(NoBucketError, match="max_upscale"):
        choose_bucket(10, 10, b, 2.0)


def test_one_bucket_per_batch_and_ratios_hold_per_batch(tmp_path):
    s = make_shards(tmp_path / "s", n=24, shard_size=6)
    m3 = _m3_shards(tmp_path / "m3b", 4, 12, hw=[(16, 32), (32, 16), (24, 24)])

    def run(**kw) -> list[dict]:
        dm = DiTFuseDataModule(shards={**s, "m3": m3}, ratios={"fusion": 0.25, "m3": 0.5, "seg": 0.125, "control": 0.125},
                               batch_size=8, num_workers=0, batches_per_epoch=6, m3_block_sizes=[4], image_size=16, **kw)
        dm.setup("fit")
        return list(dm.train_dataloader())

    bucketed = run(buckets=[[16, 32], [32, 16], [16, 16]], max_upscale=2.0)
    shapes = Counter(tuple(b["images"].shape[-2:]) for b in bucketed)
    for batch in bucketed:
        assert batch["target"].shape[-2:] == batch["images"].shape[-2:] == batch["mask"].shape[-2:]
    assert len(shapes) >= 2 and set(shapes) <= {(16, 32), (32, 16), (16, 16)}
    # the kinds of every batch are the mix schedule's, exactly as without buckets
    assert [b["kind"] for b in bucketed] == [b["kind"] for b in run()]
    wide = [m for b in bucketed for m, k in zip(b["meta"], b["kind"]) if k == "m3" and b["images"].shape[-1] == 32]
    assert wide  # wide m3 images (16x32) trained at their own aspect


def test_validation_drops_images_no_bucket_fits_and_says_so(tmp_path):
    pattern = _m3_shards(tmp_path, 1, 4, hw=[(32, 32), (8, 8)])  # 8 px needs 4x for the 32 px bucket
    with pytest.warns(BadSampleWarning, match="skipped 2 sample"):
        dm = _dm(pattern, buckets=[[32, 32]], bucket_multiple=16, max_upscale=2.0, val_shards={"m3": pattern},
                 val_batch_size=4)
    assert dm.val_set.task_counts == {"m3": 2}
    assert [b["images"].shape[-2:] for b in dm.val_dataloader()] == [(32, 32)]


def test_square_image_size_still_crops_without_resizing(tmp_path):
    pattern = _m3_shards(tmp_path, 1, 4, hw=[(40, 64)])
    batch = next(iter(_dm(pattern, batch_size=2, batches_per_epoch=1).train_dataloader()))
    assert batch["images"].shape == (2, 2, 3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# mff/mef without a target
# ---------------------------------------------------------------------------------------------
def _pair(task: str, **meta) -> dict:
    rng = np.random.default_rng(1)
    img = lambda: encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    return {"__key__": "k1", "__shard__": "fusion-000007.tar", "img1.png": img(), "img2.png": img(),
            "json": json_bytes({"task": task, **meta})}


@pytest.mark.parametrize("task", ["mff", "mef"])
def test_no_target_pairs_need_an_explicit_fallback(task):
    cfg = PipelineConfig(image_size=SIZE)
    with pytest.raises(MissingTargetError, match=rf"data\.target_fallback\.{task}.*") as e:
        process("fusion", _pair(task), cfg, seed=0)
    assert "fusion-000007.tar" in str(e.value) and "\n" not in str(e.value)
    row = process("fusion", _pair(task), PipelineConfig(image_size=SIZE, target_fallback={task: "mean"}), seed=0)
    assert row["meta"]["target_source"] == "fallback:mean"
    assert torch.allclose(row["target"], (row["image1"] + row["image2"]) / 2)
    row = process("fusion", _pair(task, target_fallback="image2"), cfg, seed=0)  # the writer's recorded choice
    assert torch.equal(row["target"], row["image2"])
    assert process("fusion", _pair("ivif"), cfg, seed=0)["meta"]["target_source"] == "fallback:mean_y"


def test_missing_target_stops_a_training_stream_instead_of_skipping(tmp_path):
    files = {k: v for k, v in _pair("mff").items() if not k.startswith("__")}
    write_samples("fusion", [(f"k{i}", files) for i in range(4)], tmp_path)
    dm = DiTFuseDataModule(shards={"fusion": str(tmp_path)}, ratios={"fusion": 1}, image_size=SIZE, batch_size=2,
                           num_workers=0, batches_per_epoch=1, m3_block_sizes=[4])
    dm.setup("fit")
    with pytest.raises(MissingTargetError, match="target_fallback.mff"):
        list(dm.train_dataloader())


def test_writer_refuses_mff_without_targets_unless_told(tmp_path):
    for d in ("near", "far"):
        (tmp_path / d).mkdir()
        cv2.imwrite(str(tmp_path / d / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="--target-fallback"):
        write_fusion("mff", tmp_path / "far", tmp_path / "near", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()  # refused before any work
    write_fusion("mff", tmp_path / "far", tmp_path / "near", tmp_path / "o", target_fallback="image1", progress=False)
    from datamodules.schema import read_shard

    (sample,) = list(read_shard(str(tmp_path / "o" / "fusion-000000.tar")))
    assert json.loads(sample["json"])["target_fallback"] == "image1"


# ---------------------------------------------------------------------------------------------
# validation: hold-out, coverage check, none at all
# ---------------------------------------------------------------------------------------------
def test_val_holdout_is_never_trained_on(tmp_path):
    s = make_shards(tmp_path, n=60, shard_size=15)
    dm = DiTFuseDataModule(shards=s, image_size=SIZE, batch_size=8, num_workers=0, batches_per_epoch=30,
                           m3_block_sizes=[4], val_holdout=2, val_holdout_every=5, val_shards={})
    dm.setup("fit")
    val_keys = {k for b in dm.val_dataloader() for k in b["key"]}
    assert dm.val_set.task_counts == {t: 2 for t in ("ivif", "mff", "mef", "m3", "seg", "control")}
    train_keys = set(_keys(dm.train_dataloader()))
    assert len(train_keys) > 100 and not train_keys & val_keys
    assert all(not dm.holdout.held(k) for k in train_keys)


def test_a_training_kind_without_validation_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"data\.val_shards\.seg or data\.val_holdout"):
        DiTFuseDataModule(shards={"m3": "a.tar", "seg": "b.tar"}, ratios={"m3": 1, "seg": 1}, val_shards={"m3": "c.tar"})


def test_no_validation_data_warns_and_setup_lists_the_shards(tmp_path, capsys):
    pattern = _m3_shards(tmp_path, 3, 2)
    with pytest.warns(UserWarning, match="no validation data"):
        dm = _dm(pattern)
    assert dm.val_dataloader() == []
    out = capsys.readouterr().out
    assert f"data: train m3: 3 shard(s) from {pattern}" in out


# ---------------------------------------------------------------------------------------------
# `ditfuse shards write` safeguards
# ---------------------------------------------------------------------------------------------
def test_shards_write_refuses_old_shards_unless_overwrite(tmp_path, capsys):
    from ditfuse.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        cv2.imwrite(str(imgs / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
    out = tmp_path / "out"
    args = ["shards", "write", "m3", "--images", str(imgs), "--out", str(out), "--no-progress"]
    assert main([*args, "--shard-size", "1"]) == 0 and len(list(out.glob("m3-*.tar"))) == 5
    assert main([*args, "--shard-size", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--shard-size", "2", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("m3-*.tar")) == ["m3-000000.tar", "m3-000001.tar", "m3-000002.tar"]
    (tmp_path / "ro").mkdir(mode=0o500)
    if not __import__("os").access(tmp_path / "ro", __import__("os").W_OK):  # root writes anywhere
        assert main(["shards", "write", "m3", "--images", str(imgs), "--out", str(tmp_path / "ro")]) == 2
        assert "not writable" in capsys.readouterr().err


def test_max_shard_bytes_splits_shards(tmp_path):
    from datamodules.writers import TarShardWriter

    with TarShardWriter(tmp_path, "m3", shard_size=100, max_bytes=2500) as w:
        for i in range(7):
            w.write(f"k{i}", {"img.png": bytes(1000)})
    assert len(w.paths) == 3  # 1000-byte samples: 3 + 3 + 1 (a new shard once one holds >= 2500 bytes)


def test_shards_help_is_fast_and_imports_nothing_heavy():
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ditfuse.cli", "shards", "--help"], cwd=ROOT, capture_output=True, check=False,
                         text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and "inspect" in res.stdout and time.perf_counter() - t < 2.0
    code = ("import sys, ditfuse.commands.shards, datamodules.schema as s; assert ditfuse.commands.shards.KINDS == s.KINDS; "
            "print(sorted(m for m in ('torch', 'lightning', 'cv2', 'webdataset') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout.strip() == "[]", res.stderr
