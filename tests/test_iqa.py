"""CLIPIQA/MANIQA through the real pyiqa code path, with tiny random stand-in weights, offline."""

from __future__ import annotations

import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("pyiqa")

from _tiny_iqa import CLIP_FILE, MANIQA_FILE, TINY_MANIQA, TINY_VIT, make_tiny_iqa_weights

from ditfuse.eval.iqa import (
    IQADownloadBlocked,
    IQAWeightsMissing,
    _maniqa_sizes,
    _no_downloads,
    build_iqa_metrics,
    resolve_iqa_weights,
)

ALL = ("clipiqa", "clipiqa+", "maniqa")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_iqa_weights(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def scorers(tiny_dir):
    return build_iqa_metrics(tiny_dir, names=ALL, maniqa_crops=2)


def _images(seed: int, n: int = 3, h: int = 64, w: int = 80) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))  # (N, 3, H, W)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_scores_shape_finite_deterministic_input_dependent(scorers, name):
    score = scorers[name]
    x = _images(0)
    s1, s2 = score(x), score(x.clone())
    assert s1.shape == (3,) and s1.dtype == torch.float32
    assert torch.isfinite(s1).all()
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert not torch.equal(s1, score(_images(1))), "scores do not depend on the input"
    assert s1.unique().numel() > 1, "images in one batch got the same score"


@pytest.mark.parametrize("name", ALL)
def test_batched_equals_one_by_one(scorers, name):
    x = _images(2)
    one_by_one = torch.cat([scorers[name](x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(scorers[name](x), one_by_one, rtol=1e-4, atol=1e-6)


def test_input_is_clamped_and_checked(scorers):
    x = _images(3)
    over = x * 1.02 - 0.01  # slight overshoot, as sampler outputs have
    torch.testing.assert_close(scorers["clipiqa"](over), scorers["clipiqa"](over.clamp(0, 1)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        scorers["clipiqa"](x[:, :1])


def test_maniqa_stays_in_eval_and_uses_crops(tiny_dir, scorers):
    score = scorers["maniqa"]
    assert score.metric.net.test_sample == 2
    x = _images(4, h=256, w=300)
    before = score(x)
    score.metric.train()  # e.g. a parent module's .train(); random crops + dropout otherwise
    torch.testing.assert_close(score(x), before, rtol=0, atol=0)
    assert build_iqa_metrics(tiny_dir, names=("maniqa",))["maniqa"].metric.net.test_sample == 20


def test_clipiqa_plus_loads_the_learned_prompts(tiny_dir, scorers):
    ctx = torch.load(tiny_dir / "pyiqa/CLIP-IQA+_learned_prompts-603f3273.pth")
    torch.testing.assert_close(scorers["clipiqa+"].metric.net.prompt_learner.ctx.data, ctx)


# ---------------------------------------------------------------------------------------------
# Files: resolution, fail-fast, optional
# ---------------------------------------------------------------------------------------------
def test_resolve_from_cache_layout_and_explicit_files(tiny_dir, tmp_path):
    found = resolve_iqa_weights(tiny_dir, names=ALL)
    assert found["clipiqa"]["backbone"] == tiny_dir / CLIP_FILE
    assert set(found["clipiqa+"]) == {"backbone", "prompts"}
    assert found["maniqa"]["checkpoint"] == tiny_dir / MANIQA_FILE
    # a TORCH_HOME-style folder holding hub/
    (tmp_path / "hub").symlink_to(tiny_dir)
    assert resolve_iqa_weights(tmp_path)["maniqa"]["checkpoint"].is_file()
    # explicit files, no weights_dir needed
    explicit = resolve_iqa_weights(tmp_path / "empty", files={
        "clipiqa": tiny_dir / CLIP_FILE, "maniqa": str(tiny_dir / MANIQA_FILE)})
    assert explicit["clipiqa"]["backbone"] == tiny_dir / CLIP_FILE


def test_default_dir_follows_torch_home_after_pyiqa_import(tiny_dir, tmp_path, monkeypatch):
    import pyiqa  # noqa: F401  (already imported: its own cache dir is frozen; ours is not)

    (tmp_path / "hub").symlink_to(tiny_dir)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert resolve_iqa_weights()["clipiqa"]["backbone"] == tmp_path / "hub" / CLIP_FILE


def test_missing_file_fails_fast_with_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(IQAWeightsMissing) as info:
        build_iqa_metrics(tmp_path, names=("maniqa",))
    assert time.perf_counter() - start < 5, "no retry loop"
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and "\n" not in msg
    assert "maniqa" in msg and "ckpt_koniq10k.pt" in msg and str(tmp_path) in msg
    assert "huggingface.co/chaofengc/IQA-PyTorch-Weights" in msg

    with pytest.raises(IQAWeightsMissing, match=r"clipiqa: backbone file .*nope\.pt.*RN50\.pt"):
        resolve_iqa_weights(files={"clipiqa": tmp_path / "nope.pt"}, names=("clipiqa",))


def test_missing_second_file_of_clipiqa_plus(tiny_dir, tmp_path):
    with pytest.raises(IQAWeightsMissing, match=r"clipiqa\+: missing pyiqa/CLIP-IQA\+_learned"):
        resolve_iqa_weights(tmp_path, files={"clipiqa+": tiny_dir / CLIP_FILE}, names=("clipiqa+",))


def test_optional_metric_warns_once_and_is_dropped(tiny_dir, tmp_path):
    files = {"clipiqa": tiny_dir / CLIP_FILE}  # no MANIQA checkpoint anywhere
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build_iqa_metrics(tmp_path, files=files, required=False)
    assert list(built) == ["clipiqa"]
    ours = [w for w in caught if "dropped" in str(w.message)]
    assert len(ours) == 1 and "maniqa" in str(ours[0].message)
    assert "\n" not in str(ours[0].message)


def test_pyiqa_import_failure_is_one_line(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import pyiqa -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'ditfuse\[iqa\]'.*setuptools<82"):
        build_iqa_metrics(tiny_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build_iqa_metrics(tiny_dir, required=False) == {}
    assert len(caught) == 1 and "pyiqa" in str(caught[0].message)
    assert "\n" not in str(caught[0].message)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_backbone_must_be_torchscript(tiny_dir, tmp_path):
    from pyiqa.archs.clip_model import load

    plain = tmp_path / "RN50.pt"
    torch.save(load(str(tiny_dir / CLIP_FILE), "cpu").state_dict(), plain)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        build_iqa_metrics(files={"clipiqa": plain}, names=("clipiqa",))
    truncated = tmp_path / "partial.pt"
    truncated.write_bytes((tiny_dir / CLIP_FILE).read_bytes()[:1000])  # an interrupted download
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        build_iqa_metrics(files={"clipiqa": truncated}, names=("clipiqa",))


def test_bad_names_and_keys_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="musiq"):
        resolve_iqa_weights(tmp_path, names=("musiq",))
    with pytest.raises(ValueError, match="clipiqa.prompt"):
        resolve_iqa_weights(tmp_path, files={"clipiqa.prompt": "x"})
    with pytest.raises(ValueError, match="maniqa_crops"):
        build_iqa_metrics(tmp_path, maniqa_crops=0)


# ---------------------------------------------------------------------------------------------
# Never the network
# ---------------------------------------------------------------------------------------------
def test_build_works_with_every_download_path_broken(tiny_dir, monkeypatch):
    """Break downloads at the bottom (urllib, requests, sockets are already blocked by conftest);
    the build still succeeds, so it never reaches for them."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("network call attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(requests.sessions.Session, "request", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    built = build_iqa_metrics(tiny_dir, names=ALL, maniqa_crops=1)
    assert set(built) == set(ALL)


def test_guard_makes_every_download_raise_at_once():
    import clip
    import huggingface_hub
    import timm
    from pyiqa.archs import arch_util, clip_model
    from pyiqa.utils import download_util

    calls = {
        "pyiqa load_file_from_url": lambda: arch_util.load_file_from_url("https://x/y.pth"),
        "pyiqa download_util": lambda: download_util.load_file_from_url("https://x/y.pth"),
        "pyiqa clip _download": lambda: clip_model._download("https://x/RN50.pt", "/tmp"),
        "clip.load RN50": lambda: clip.load("RN50", device="cpu", download_root="/nonexistent"),
        "timm pretrained": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=True),
        "hf_hub_download": lambda: huggingface_hub.hf_hub_download("a/b", "c"),
        "torch.hub": lambda: torch.hub.load_state_dict_from_url("https://x/y.pth"),
        "urllib": lambda: urllib.request.urlopen("https://example.com"),
    }
    urlopen = urllib.request.urlopen
    with _no_downloads():
        for what, call in calls.items():
            start = time.perf_counter()
            with pytest.raises(IQADownloadBlocked):
                call()
            assert time.perf_counter() - start < 5, what
    assert urllib.request.urlopen is urlopen, "guard not undone"


def test_maniqa_sizes_read_off_the_checkpoint(tiny_dir):
    state = torch.load(tiny_dir / MANIQA_FILE)
    maniqa, vit = _maniqa_sizes(state)
    assert vit == TINY_VIT
    assert maniqa == {k: v for k, v in TINY_MANIQA.items() if k != "scale"}
    shallow = {k: v for k, v in state.items() if not k.startswith("vit.blocks.9.")}
    with pytest.raises(ValueError, match="blocks 6-9"):
        _maniqa_sizes(shallow)
