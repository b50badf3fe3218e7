"""Shard writers on small generated folder data sets, image IO, and the `ditfuse shards` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ditfuse.commands.shards import inspect
from datamodules.demo import build_demo
from datamodules.io import decode_image, read_image, to_tensor
from datamodules.pipelines import PipelineConfig, collate, process
from datamodules.schema import SchemaError, check_sample, iter_tar
from datamodules.writers import write_control, write_fusion, write_m3, write_seg
from ditfuse.cli import main as ditfuse_main

RNG = np.random.default_rng(0)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def _rgb(h=24, w=32) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _thermal16(h=24, w=32) -> np.ndarray:
    return RNG.integers(7000, 9000, (h, w), dtype=np.uint16)  # a narrow 16-bit range, as cameras give


def _one(kind: str, sample: dict, **kw) -> dict:
    """One processed sample as a batch of one, with the list fields unwrapped."""
    batch = collate([process(kind, sample, PipelineConfig(image_size=16), seed=0, **kw)])
    return {k: v[0] for k, v in batch.items()}


def _samples(out: Path) -> list[dict]:
    return [s for tar in sorted(out.glob("*.tar")) for s in iter_tar(tar)]


@pytest.fixture()
def ivif_folders(tmp_path) -> tuple[Path, Path]:
    vi, ir = tmp_path / "ivif" / "vi", tmp_path / "ivif" / "ir"
    for name in ("00001", "00002", "00003"):
        _save(vi / f"{name}.png", _rgb())
        _save(ir / f"{name}.tiff", _thermal16())  # 16-bit, 1 channel, TIFF
    _save(vi / "00004.jpg", _rgb())  # JPEG visible image ...
    _save(ir / "00004.bmp", _rgb()[:, :, 0])  # ... with an 8-bit BMP infrared one
    _save(vi / "only_visible.png", _rgb())  # unpaired name
    _save(vi / "00005.png", _rgb(24, 30))  # size mismatch
    _save(ir / "00005.png", _rgb(24, 32)[:, :, 0])
    (vi / "00006.png").write_bytes(b"not an image")  # unreadable
    _save(ir / "00006.png", _rgb()[:, :, 0])
    return vi, ir


def test_read_image_keeps_16_bit_and_channels(tmp_path):
    t = _thermal16()
    arr = read_image(_save(tmp_path / "t.tiff", t))
    assert arr.dtype == np.uint16 and arr.shape == t.shape and np.array_equal(arr, t)
    rgba = np.dstack([_rgb(), np.full((24, 32), 255, np.uint8)])
    assert read_image(_save(tmp_path / "a.png", rgba)).shape == (24, 32, 3)
    x = to_tensor(arr, (7000, 9000))
    assert x.shape == (3, 24, 32) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.1  # range kept
    with pytest.raises(ValueError, match="decode"):
        decode_image(b"garbage")


def test_write_fusion_reports_skips_and_keeps_16_bit(ivif_folders, tmp_path):
    vi, ir = ivif_folders
    out = tmp_path / "shards"
    report = write_fusion("ivif", vi, ir, out, shard_size=2, progress=False)
    assert report.written == 4 and len(report.shards) == 2
    assert [p.name for p in report.shards] == ["fusion-000000.tar", "fusion-000001.tar"]
    assert len(report.skipped["unpaired name"]) == 1 and "only_visible" in report.skipped["unpaired name"][0]
    assert len(report.skipped["size mismatch"]) == 1 and len(report.skipped["unreadable image"]) == 1
    assert "skipped 1 (unpaired name)" in report.summary()
    samples = _samples(out)
    for s in samples:
        meta = check_sample("fusion", s)
        assert meta["task"] == "ivif"
    s1 = next(s for s in samples if s["__key__"] == "00001")
    assert decode_image(s1["img2.png"]).dtype == np.uint16  # TIFF re-encoded as 16-bit PNG
    assert json.loads(s1["json"])["ranges"]["img2"][0] >= 7000
    assert "img1.jpg" in next(s for s in samples if s["__key__"] == "00004")  # JPEG stored as is
    row = _one("fusion", s1)
    assert row["meta"]["target_source"] == "fallback:mean_y" and row["images"].shape == (2, 3, 16, 16)


def test_write_fusion_with_targets_and_instruction(tmp_path):
    a, b, t = tmp_path / "A", tmp_path / "B", tmp_path / "GT"
    for n in ("x1", "x2"):
        for d in (a, b, t):
            _save(d / f"{n}.png", _rgb())
    report = write_fusion("mff", a, b, tmp_path / "o", target_dir=t, instruction="Fuse them.", progress=False)
    assert report.written == 2 and not report.skipped
    s = _samples(tmp_path / "o")[0]
    assert "target.png" in s and json.loads(s["json"])["instruction"] == "Fuse them."
    row = _one("fusion", s)
    assert row["prompt"].endswith("Fuse them.") and row["meta"]["target_source"] == "shard"


def test_write_m3_recursive_folder(tmp_path):
    _save(tmp_path / "coco" / "a.jpg", _rgb())
    _save(tmp_path / "coco" / "sub" / "b.png", _rgb()[:, :, 0])
    (tmp_path / "coco" / "broken.png").write_bytes(b"x")
    report = write_m3(tmp_path / "coco", tmp_path / "o", progress=False)
    assert report.written == 2 and len(report.skipped["unreadable image"]) == 1
    keys = sorted(s["__key__"] for s in _samples(tmp_path / "o"))
    assert keys == ["a", "sub__b"]


def test_write_seg_lists_present_classes(tmp_path):
    d = tmp_path / "seg"
    for i, labels in enumerate(([0, 1], [0, 3], [0, 9])):
        m = np.zeros((24, 32), np.uint16)  # uint16 label map
        m[5:15, 5:20] = labels[1]
        _save(d / "vi" / f"{i}.png", _rgb())
        _save(d / "ir" / f"{i}.png", _rgb()[:, :, 0])
        _save(d / "mask" / f"{i}.png", m)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["background", "car", "person", "bike"]))
    report = write_seg(d / "vi", d / "ir", d / "mask", classes, tmp_path / "o", progress=False)
    assert report.written == 2 and report.skipped["no known class in mask"] == ["2"]  # 9 is not in the map
    metas = {s["__key__"]: json.loads(s["json"]) for s in _samples(tmp_path / "o")}
    assert metas["0"]["classes"] == {"0": "background", "1": "car"}
    s = next(s for s in _samples(tmp_path / "o") if s["__key__"] == "0")
    row = _one("seg", s, train=False)
    assert row["meta"]["seg_class"] == "car" and "the car in the image" in row["prompt"]
    assert row["mask"].any()


def test_write_control_needs_a_subtask(tmp_path):
    for d in ("a", "b", "t"):
        _save(tmp_path / d / "p.png", _rgb())
        _save(tmp_path / d / "q.png", _rgb())
    with pytest.raises(ValueError, match="subtask"):
        write_control(tmp_path / "a", tmp_path / "b", tmp_path / "t", tmp_path / "o")
    report = write_control(tmp_path / "a", tmp_path / "b", tmp_path / "t", tmp_path / "o",
                           subtasks={"p": "LIGHT+"}, progress=False)
    assert report.written == 1 and report.skipped["no subtask in map"] == ["q"]
    s = _samples(tmp_path / "o")[0]
    row = _one("control", s)
    assert row["subtask"] == "LIGHT+" and "<LIGHT+>" in row["prompt"]
    assert torch.equal(row["target"], row["control_base"])  # pre-made: the shard target is final


def test_schema_violation_is_named(tmp_path):
    with pytest.raises(SchemaError, match="missing img2"):
        check_sample("fusion", {"__key__": "k", "img1.png": b"", "json": b'{"task": "ivif"}'})
    with pytest.raises(SchemaError, match="task"):
        check_sample("fusion", {"__key__": "k", "img1.png": b"", "img2.png": b"", "json": b'{"task": "hdr"}'})


def test_demo_is_deterministic_and_disjoint(tmp_path):
    a = build_demo(tmp_path / "a", seed=0, scale=0.1)
    build_demo(tmp_path / "b", seed=0, scale=0.1)
    build_demo(tmp_path / "c", seed=1, scale=0.1)
    assert a["train/fusion"] > 0 and a["val/fusion"] == 24
    tar = Path("train/m3/m3-000000.tar")
    assert (tmp_path / "a" / tar).read_bytes() == (tmp_path / "b" / tar).read_bytes()
    assert (tmp_path / "a" / tar).read_bytes() != (tmp_path / "c" / tar).read_bytes()
    info = inspect(tmp_path / "a" / "val")
    assert info["counts"]["fusion"] == {"ivif": 8, "mff": 8, "mef": 8}
    assert inspect(tmp_path / "a")["counts"]["val/m3"] == {"m3": 8}


def test_demo_photos_are_split():
    from datamodules.demo import TRAIN_PHOTOS, VAL_PHOTOS

    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS) and "cat" not in TRAIN_PHOTOS  # cat is chelsea


# ---------------------------------------------------------------------------------------------
# CLI, through the `ditfuse` dispatcher
# ---------------------------------------------------------------------------------------------
def test_cli_write_all_kinds(ivif_folders, tmp_path, capsys):
    vi, ir = ivif_folders
    out = tmp_path / "out"
    assert ditfuse_main(["shards", "write", "fusion", "--task", "ivif", "--image1-dir", str(vi), "--image2-dir",
                         str(ir), "--out", str(out / "fusion"), "--shard-size", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote 4 samples in 2 shard(s)" in text and "unpaired name" in text and "size mismatch" in text
    assert ditfuse_main(["shards", "write", "m3", "--images", str(vi), "--out", str(out / "m3"), "--no-progress"]) == 0
    for d in ("mask",):
        for n in ("00001", "00002"):
            m = np.zeros((24, 32), np.uint8)
            m[2:9, 3:7] = 1
            _save(ir.parent / d / f"{n}.png", m)
    (tmp_path / "c.json").write_text('{"1": "person"}')
    assert ditfuse_main(["shards", "write", "seg", "--image1-dir", str(vi), "--image2-dir", str(ir), "--mask-dir",
                         str(ir.parent / "mask"), "--classes", str(tmp_path / "c.json"), "--out", str(out / "seg"),
                         "--no-progress"]) == 0
    assert ditfuse_main(["shards", "write", "control", "--image1-dir", str(vi), "--image2-dir", str(ir),
                         "--target-dir", str(vi), "--subtask", "CONTRAST+", "--out", str(out / "control"),
                         "--no-progress"]) == 0
    capsys.readouterr()
    assert ditfuse_main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fusion" in text and "seg" in text and "CONTRAST+" in text and "24x32" in text


def test_cli_write_reports_bad_arguments(tmp_path, capsys):
    assert ditfuse_main(["shards", "write", "m3", "--images", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_demo_and_inspect(tmp_path, capsys):
    assert ditfuse_main(["shards", "demo", "--out", str(tmp_path / "demo"), "--scale", "0.1"]) == 0
    assert (tmp_path / "demo" / "val" / "seg" / "seg-000000.tar").exists()
    assert ditfuse_main(["shards", "inspect", str(tmp_path / "demo")]) == 0
    assert "control" in capsys.readouterr().out
    bad = tmp_path / "bad" / "fusion"
    from datamodules.writers import json_bytes, write_samples

    write_samples("fusion", [("k1", {"img1.png": b"x", "json": json_bytes({"task": "ivif"})})], bad)
    assert ditfuse_main(["shards", "inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "schema violation" in err and "fusion-000000.tar" in err and "k1" in err


def test_datamodule_builds_demo_in_prepare_data(tmp_path):
    from datamodules import DiTFuseDataModule

    dm = DiTFuseDataModule(demo_dir=str(tmp_path / "demo"), image_size=32, batch_size=4, num_workers=0,
                           batches_per_epoch=2, m3_block_sizes=[4, 8], val_samples_per_task=2)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 2, 3, 32, 32)
    val = list(dm.val_dataloader())
    assert [b["task"][0] for b in val] == ["ivif", "mff", "mef", "m3", "seg", "control"]
