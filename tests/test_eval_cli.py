"""`ditfuse eval`: stem matching, table layouts, baselines, no-overwrite, the IQA hook."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ditfuse import cli
from ditfuse.commands import evaluate
from ditfuse.eval.metrics import CONVENTION, METRIC_NAMES, compute_fusion_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(seed: int, h: int = 48, w: int = 64, gray: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 90 * np.sin(xx / (5 + seed) + yy / 9) + rng.normal(0, 10, (h, w))
    img = np.clip(base if gray else np.stack([base, base[::-1], base[:, ::-1]], -1), 0, 255)
    return img.astype(np.uint8)


@pytest.fixture()
def folders(tmp_path: Path) -> dict[str, Path]:
    """ir (gray PNG), vi (colour PNG/JPEG), fused: stems a, b, c; 'extra' only in ir, 'c' not fused."""
    dirs = {k: tmp_path / k for k in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for i, stem in enumerate(["a", "b", "c"]):
        cv2.imwrite(str(dirs["ir"] / f"{stem}.png"), _img(i, gray=True))
        cv2.imwrite(str(dirs["vi"] / f"{stem}.{'jpg' if stem == 'b' else 'png'}"), _img(10 + i))
        if stem != "c":
            cv2.imwrite(str(dirs["fused"] / f"{stem}.png"), _img(20 + i))
    cv2.imwrite(str(dirs["ir"] / "extra.png"), _img(5, gray=True))
    return dirs


def _args(d: dict[str, Path], *extra: str) -> list[str]:
    return ["--image1-dir", str(d["ir"]), "--image2-dir", str(d["vi"]), "--fused-dir", str(d["fused"]), *extra]


def _direct(d: dict[str, Path], stem: str) -> dict[str, float]:
    def read(folder: Path) -> torch.Tensor:
        (p,) = folder.glob(f"{stem}.*")
        return torch.from_numpy(cv2.imread(str(p))[..., ::-1].copy()).permute(2, 0, 1)[None]

    return {k: float(v[0]) for k, v in compute_fusion_metrics(read(d["ir"]), read(d["vi"]), read(d["fused"])).items()}


def test_json_layout_values_and_skipped_stems(folders, tmp_path):
    out = tmp_path / "m.json"
    assert cli.main(["eval", *_args(folders, "--out", str(out))]) == 0  # format from the suffix
    rep = json.loads(out.read_text())
    assert rep["convention"] == CONVENTION == "mmif-cddfuse"
    assert set(rep["per_image"]) == {"a", "b"} and rep["n_images"] == 2
    assert rep["skipped"] == {"c": "missing in fused", "extra": "missing in image2, fused"}
    for stem in ("a", "b"):
        direct = _direct(folders, stem)
        assert list(rep["per_image"][stem]) == list(METRIC_NAMES)
        assert all(rep["per_image"][stem][k] == pytest.approx(direct[k], rel=1e-12) for k in METRIC_NAMES)
    for k in METRIC_NAMES:
        assert rep["mean"][k] == pytest.approx((rep["per_image"]["a"][k] + rep["per_image"]["b"][k]) / 2)


def test_markdown_and_csv(folders, capsys):
    assert evaluate.main(_args(folders, "--metrics", "en,SSIM,Qabf")) == 0
    md = capsys.readouterr().out
    assert f"Convention: {CONVENTION}" in md and "| image | EN | Qabf | SSIM |" in md
    assert md.count("\n| a |") == 1 and "| **mean** |" in md and "- c: missing in fused" in md
    assert evaluate.main(_args(folders, "--metrics", "EN,SD", "--format", "csv")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# convention={CONVENTION}" and lines[1] == "image,EN,SD"
    assert [ln.split(",")[0] for ln in lines[2:]] == ["a", "b", "mean"]
    assert float(lines[2].split(",")[1]) == pytest.approx(_direct(folders, "a")["EN"], rel=1e-9)


def test_out_is_never_overwritten_without_flag(folders, tmp_path, capsys):
    out = tmp_path / "table.md"
    out.write_text("keep me")
    assert evaluate.main(_args(folders, "--out", str(out))) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert evaluate.main(_args(folders, "--out", str(out), "--overwrite", "--metrics", "EN")) == 0
    assert out.read_text().startswith(f"Convention: {CONVENTION}")


def test_nan_stays_nan(folders, tmp_path):
    for stem in ("a", "b"):  # fused == image 1: SCD's r(B, F - A) is undefined
        (folders["fused"] / f"{stem}.png").write_bytes((folders["ir"] / f"{stem}.png").read_bytes())
    out = tmp_path / "m.json"
    assert evaluate.main(_args(folders, "--out", str(out), "--metrics", "SCD,CC")) == 0
    rep = json.loads(out.read_text())
    assert math.isnan(rep["per_image"]["a"]["SCD"]) and math.isnan(rep["mean"]["SCD"])
    assert not math.isnan(rep["mean"]["CC"])


def test_baselines_rows_and_baseline_only_mode(folders, tmp_path):
    out = tmp_path / "m.json"
    assert evaluate.main(_args(folders, "--baselines", "max,mean", "--out", str(out), "--metrics", "EN,MI")) == 0
    rep = json.loads(out.read_text())
    assert set(rep["baselines"]) == {"mean", "max"} and set(rep["baselines"]["max"]) == {"EN", "MI"}
    # a max-fusion folder scores exactly like the max baseline row
    maxdir = folders["fused"].parent / "maxfused"
    maxdir.mkdir()
    for stem in ("a", "b"):
        a = cv2.imread(str(folders["ir"] / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        b = np.round(cv2.cvtColor(cv2.imread(str(next(folders["vi"].glob(f"{stem}.*")))).astype(np.float32),
                                  cv2.COLOR_BGR2GRAY)).astype(np.uint8)
        cv2.imwrite(str(maxdir / f"{stem}.png"), np.maximum(a, b))
    out2 = tmp_path / "m2.json"
    args = ["--image1-dir", str(folders["ir"]), "--image2-dir", str(folders["vi"]), "--fused-dir", str(maxdir)]
    assert evaluate.main([*args, "--out", str(out2), "--metrics", "EN,MI"]) == 0
    assert json.loads(out2.read_text())["mean"] == pytest.approx(rep["baselines"]["max"], rel=1e-12)
    out3 = tmp_path / "m3.json"  # no fused folder: baselines over the matched pairs only
    assert evaluate.main([*args[:4], "--baselines", "mean", "--out", str(out3)]) == 0
    rep3 = json.loads(out3.read_text())
    assert rep3["per_image"] == {} and set(rep3["baselines"]) == {"mean"} and rep3["n_pairs"] == 3  # c has no fused image, but a pair


def test_reference_dir_columns(folders, tmp_path):
    out = tmp_path / "m.json"
    assert evaluate.main(_args(folders, "--reference-dir", str(folders["fused"]), "--metrics", "EN",
                               "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    assert rep["columns"] == ["EN", "PSNR_ref", "SSIM_ref"] and rep["reference_convention"] == "gray-peak255"
    assert rep["per_image"]["a"]["PSNR_ref"] == math.inf and rep["per_image"]["a"]["SSIM_ref"] == pytest.approx(1.0)


def test_bad_options_are_one_line_errors(folders, capsys):
    assert evaluate.main(_args(folders, "--metrics", "EN,NIQE")) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert evaluate.main(_args(folders, "--baselines", "median")) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert evaluate.main(["--image1-dir", str(folders["ir"]), "--image2-dir", str(folders["vi"])]) == 2
    assert "--fused-dir" in capsys.readouterr().err
    empty = folders["fused"].parent / "empty"
    empty.mkdir()
    assert evaluate.main(_args({**folders, "fused": empty})) == 2
    assert "no image could be scored" in capsys.readouterr().err


def test_size_mismatch_is_skipped_not_fatal(folders, tmp_path):
    cv2.imwrite(str(folders["fused"] / "b.png"), _img(3, h=50))
    out = tmp_path / "m.json"
    assert evaluate.main(_args(folders, "--metrics", "EN", "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    assert set(rep["per_image"]) == {"a"} and "sizes differ" in rep["skipped"]["b"]


def test_iqa_hook_calls_ditfuse_iqa(folders, tmp_path, monkeypatch):
    calls = {}

    def build_iqa_metrics(weights_dir, names, required, device, **kw):
        calls.update(weights_dir=weights_dir, names=names, required=required, device=device, **kw)
        return {n: (lambda x: x.mean((1, 2, 3))) for n in names}  # (N, 3, H, W) in [0, 1] -> (N,)

    monkeypatch.setitem(sys.modules, "ditfuse.eval.iqa", types.SimpleNamespace(build_iqa_metrics=build_iqa_metrics))
    out = tmp_path / "m.json"
    assert evaluate.main(_args(folders, "--metrics", "EN", "--iqa-weights", str(tmp_path), "--maniqa-crops", "2",
                               "--out", str(out))) == 0
    rep = json.loads(out.read_text())
    assert calls == dict(weights_dir=tmp_path, names=("clipiqa", "maniqa"), required=True, device="cpu",
                         maniqa_crops=2)
    fused = cv2.imread(str(folders["fused"] / "a.png")).astype(np.float64) / 255
    assert rep["columns"] == ["EN", "CLIPIQA", "MANIQA"]
    assert rep["per_image"]["a"]["MANIQA"] == pytest.approx(fused.mean(), rel=1e-6)


def test_iqa_hook_reports_a_missing_module_in_one_line(folders, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ditfuse.eval.iqa", None)  # import fails
    assert evaluate.main(_args(folders, "--iqa-weights", "/nonexistent")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--iqa-weights needs ditfuse.eval.iqa" in err


def test_real_roadscene_pairs_max_baseline_equals_max_folder(ivif_dir, tmp_path):
    """Two RoadScene pairs (JPEG, decoded by OpenCV): the shared max/ folder scores like --baselines max."""
    root = ivif_dir / "RoadScene"
    stems = sorted(p.stem for p in (root / "ir").iterdir())[:2]
    dirs = {}
    for sub in ("ir", "vi", "max"):
        dirs[sub] = tmp_path / sub
        dirs[sub].mkdir()
        for stem in stems:
            (src,) = (root / sub).glob(f"{stem}.*")
            (dirs[sub] / src.name).symlink_to(src)
    out = tmp_path / "m.json"
    assert evaluate.main(["--image1-dir", str(dirs["ir"]), "--image2-dir", str(dirs["vi"]), "--fused-dir",
                          str(dirs["max"]), "--baselines", "max", "--metrics", "EN,SD,SF,MI,SCD,Qabf,SSIM",
                          "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["n_images"] == 2 and rep["mean"] == pytest.approx(rep["baselines"]["max"], rel=1e-12)


# --------------------------------------------------------------------------- several methods, plot, progress


def test_several_fused_dirs_give_one_comparison_row_per_method(folders, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for stem in ("a", "b"):
        cv2.imwrite(str(other / f"{stem}.png"), _img(40, gray=True))
    base = ["--image1-dir", str(folders["ir"]), "--image2-dir", str(folders["vi"]), "--metrics", "EN,SF"]
    out = tmp_path / "cmp.json"
    assert evaluate.main([*base, "--fused-dir", f"ours={folders['fused']}", "--fused-dir", f"other={other}",
                          "--baselines", "max", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["methods"]) == {"ours", "other"}
    single = tmp_path / "single.json"
    assert evaluate.main([*base, "--fused-dir", str(other), "--out", str(single)]) == 0
    assert rep["methods"]["other"] == pytest.approx(json.loads(single.read_text())["mean"], rel=1e-12)
    assert evaluate.main([*base, "--fused-dir", f"ours={folders['fused']}", "--fused-dir", f"other={other}",
                          "--baselines", "max", "--no-progress"]) == 0
    md = capsys.readouterr().out
    assert "| method:ours |" in md and "| method:other |" in md and "| baseline:max |" in md
    assert "| a |" not in md  # the comparison table has one row per method, not per image


def test_plot_writes_a_png_with_methods_and_baselines(folders, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plots" / "m.png"
    assert evaluate.main([*_args(folders, "--baselines", "mean,max", "--metrics", "EN,SD,MI"), "--plot", str(png)]) == 0
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 300
    assert evaluate.main([*_args(folders, "--baselines", "max"), "--plot", str(png)]) == 2  # no overwrite


def test_plot_without_matplotlib_is_a_one_line_error_before_scoring(folders, monkeypatch, capsys):
    real = evaluate.importlib.util.find_spec
    monkeypatch.setattr(evaluate.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(evaluate, "evaluate", lambda args: pytest.fail("scored before checking --plot"))
    assert evaluate.main([*_args(folders), "--plot", str(folders["fused"].parent / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "matplotlib" in err


def test_unwritable_out_fails_before_scoring(folders, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(evaluate, "evaluate", lambda args: pytest.fail("scored before checking --out"))
    for flag in ("--out", "--plot"):
        assert evaluate.main([*_args(folders), flag, str(blocker / "sub" / "m.json")]) == 2
        err = capsys.readouterr().err
        assert f"{flag}: cannot write" in err and "Traceback" not in err


def test_progress_lines_without_a_terminal(folders, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "LINE_EVERY_S", 0.0)
    assert evaluate.main(_args(folders, "--metrics", "EN", "--no-progress")) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "pairs," in ln]
    assert lines[-1].startswith("ditfuse eval: 2/2 pairs") and "ETA" in lines[-1]
