"""ditfuse.eval.metrics against hand-computable cases and the independent reference
(tests/_reference_metrics.py: numpy/scipy, written from METRICS.md, no shared code)."""

from __future__ import annotations

import math

import _reference_metrics as ref
import cv2
import numpy as np
import pytest
import torch

from ditfuse.eval.metrics import (
    CONVENTION,
    METRIC_NAMES,
    REFERENCE_CONVENTION,
    compute_fusion_metrics,
    reference_metrics,
    resolve_names,
    to_gray,
)

RTOL = 1e-4  # METRICS.md: reproduce the evaluator to 1e-4 relative


pytestmark = pytest.mark.usefixtures("one_thread")


def _t(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) BGR uint8 -> (1, 3, H, W) RGB tensor; (H, W) -> (1, 1, H, W)."""
    if img.ndim == 2:
        return torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)[None]


def _triple(seed: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic BGR uint8 sources and fusion with smooth areas, noise, flat and clipped patches."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ir = 120 + 80 * np.sin(6 * xx + seed) * np.cos(4 * yy) + rng.normal(0, 8, (h, w))
    ir[h // 4 : h // 2, w // 4 : w // 2] = 17  # flat block: exercises VIF's eps masks
    vis = np.stack([60 + 150 * yy, 200 * xx, 90 + 40 * np.sin(9 * yy)], -1) + rng.normal(0, 12, (h, w, 3))
    vis[: h // 5, -w // 5 :] = 255  # saturated corner
    fused = 0.6 * ir[..., None] + 0.5 * vis + rng.normal(0, 3, (h, w, 3))
    to8 = lambda x: np.clip(np.round(x), 0, 255).astype(np.uint8)
    return to8(np.repeat(ir[..., None], 3, -1)), to8(vis), to8(fused)


def _ours(a, b, f, metrics=None) -> dict[str, float]:
    return {k: float(v[0]) for k, v in compute_fusion_metrics(_t(a), _t(b), _t(f), metrics).items()}


def _theirs(a, b, f) -> dict[str, float]:
    return ref.all_metrics(*(ref.gray_from_bgr(x) if x.ndim == 3 else x.astype(float) for x in (a, b, f)))


def _assert_match(got: dict[str, float], want: dict[str, float], tag: str = "") -> None:
    for name in METRIC_NAMES:
        g, w = got[name], want[name]
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=RTOL, abs=1e-9), (tag, name, g, w)


# --------------------------------------------------------------------------- hand-computable


def test_constants_and_names():
    assert CONVENTION == "mmif-cddfuse" and REFERENCE_CONVENTION == "gray-peak255"
    assert METRIC_NAMES == ("EN", "SD", "SF", "AG", "MI", "SCD", "CC", "MSE", "PSNR", "VIF", "Qabf", "SSIM")
    assert resolve_names("qabf, en") == ["EN", "Qabf"] and resolve_names(None) == list(METRIC_NAMES)


def test_constant_fused_image_has_zero_entropy_and_spread():
    a, b, _ = _triple(0, 48, 64)
    f = np.full_like(a, 100)
    got = _ours(a, b, f, ["EN", "SD", "SF", "AG", "CC"])
    assert got["EN"] == 0 and got["SD"] == 0 and got["SF"] == 0 and got["AG"] == 0
    assert math.isnan(got["CC"])  # r(A, F) undefined for a constant F: NaN, no crash


def test_identical_images():
    a, _, _ = _triple(1, 48, 64)
    got = _ours(a, a, a)
    assert got["SSIM"] == pytest.approx(2.0, abs=1e-12)  # ssim(F,A) + ssim(F,B), each exactly 1
    assert got["CC"] == pytest.approx(1.0) and got["MSE"] == 0 and got["PSNR"] == math.inf
    assert math.isnan(got["SCD"])  # F - B == 0: its correlation is undefined
    # MI = 2 H(F) in nats; VIF = 2 (each VIFp is 1); Qabf uses G = gF where gA == gF (quirk)
    assert got["MI"] == pytest.approx(2 * got["EN"] * math.log(2), rel=1e-12)
    assert got["VIF"] == pytest.approx(2.0, rel=1e-9)
    _assert_match(got, _theirs(a, a, a))
    # textbook Qabf of F == A == B is the per-pixel Q at G = 1, Aa = 1; the quirk's G = gF >= 1 is higher
    textbook = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert got["Qabf"] > textbook * 1.0003


def test_mutual_information_known_histograms():
    h = w = 64
    left = np.zeros((h, w), np.uint8)
    left[:, w // 2 :] = 255  # two equally likely levels: H = 1 bit = ln 2 nats
    top = np.zeros((h, w), np.uint8)
    top[h // 2 :] = 255  # independent of `left`: MI(left, top) = 0
    got = _ours(left, top, left, ["MI", "EN"])
    assert got["EN"] == pytest.approx(1.0, abs=1e-12)
    assert got["MI"] == pytest.approx(math.log(2), abs=1e-12)  # MI(F,A) = ln 2, MI(F,B) = 0
    quads = left // 255 + 2 * (top // 255)  # four equally likely levels 0..3, H = ln 4
    assert _ours(quads, quads, quads, ["MI"])["MI"] == pytest.approx(2 * math.log(4), abs=1e-12)
    assert _ours(quads, left, quads, ["MI"])["MI"] == pytest.approx(math.log(4) + math.log(2), abs=1e-12)


def test_constant_sources_give_vif_one_each():
    _, _, f = _triple(2, 48, 64)
    flat = np.full((48, 64), 90, np.uint8)
    got = _ours(flat, flat + 40, f, ["VIF", "SCD"])
    assert got["VIF"] == 2.0  # 0/0 per source -> 1 (evaluator)
    assert math.isnan(got["SCD"])


def test_fused_equal_to_source_gives_nan_scd_not_a_crash():
    a, b, _ = _triple(3, 48, 64)
    got = _ours(a, b, a)
    assert math.isnan(got["SCD"]) and not math.isnan(got["CC"])
    assert all(not math.isnan(v) for k, v in got.items() if k != "SCD")


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed,h,w", [(0, 48, 64), (1, 61, 75), (2, 96, 80), (3, 41, 123)])
def test_matches_independent_reference(seed, h, w):
    a, b, f = _triple(seed, h, w)
    _assert_match(_ours(a, b, f), _theirs(a, b, f), f"seed {seed}")


def test_gray_conversion_matches_cv2_on_ties():
    v = np.arange(256, dtype=np.float32)
    r, g, b = np.meshgrid(v, v, np.array([0, 1, 2, 3, 37, 128, 254, 255], np.float32), indexing="ij")
    bgr = np.stack([b, g, r], -1).reshape(256, -1, 3)  # 524288 colours
    want = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert (want - np.floor(want) == 0.5).sum() > 400  # exact .5 ties are present
    naive = np.round(0.299 * r + 0.587 * g + 0.114 * b.astype(np.float64)).reshape(want.shape)
    assert (naive != np.round(want)).any()  # float64 arithmetic gets some of them wrong
    got = to_gray(_t(bgr.astype(np.uint8)))[0].numpy()
    np.testing.assert_array_equal(got, np.round(want))


def test_gray_input_passes_through_and_rgb_equals_its_gray():
    a, b, f = _triple(4, 48, 64)
    gray = [ref.gray_from_bgr(x).astype(np.uint8) for x in (a, b, f)]
    np.testing.assert_array_equal(to_gray(_t(gray[0]))[0].numpy(), gray[0])
    rgb, g1 = _ours(a, b, f), _ours(*gray)
    assert all(rgb[k] == g1[k] or (math.isnan(rgb[k]) and math.isnan(g1[k])) for k in METRIC_NAMES)


def test_batched_equals_one_by_one():
    triples = [_triple(s, 52, 70) for s in (5, 6, 7)]
    a, b, f = (torch.cat([_t(t[i]) for t in triples]) for i in range(3))
    batched = compute_fusion_metrics(a, b, f)
    assert all(v.shape == (3,) and v.dtype == torch.float64 for v in batched.values())
    for i, t in enumerate(triples):
        one = _ours(*t)
        for k in METRIC_NAMES:
            assert float(batched[k][i]) == pytest.approx(one[k], rel=1e-10, abs=1e-12), (i, k)


def test_float_and_uint8_inputs_agree():
    a, b, f = (_t(x) for x in _triple(8, 48, 64))
    u8 = compute_fusion_metrics(a, b, f)
    fl = compute_fusion_metrics(a.float(), b.double(), f.float())
    assert all(torch.equal(u8[k], fl[k]) or torch.isnan(u8[k]).all() for k in METRIC_NAMES)


def test_input_errors_name_the_problem():
    a, b, f = (_t(x) for x in _triple(9, 48, 64))
    with pytest.raises(ValueError, match="unknown metric.*NIQE"):
        compute_fusion_metrics(a, b, f, ["EN", "NIQE"])
    with pytest.raises(ValueError, match="share N, H, W"):
        compute_fusion_metrics(a, b[..., :40], f)
    with pytest.raises(ValueError, match="VIF needs images of at least 41x41"):
        compute_fusion_metrics(a[..., :40], b[..., :40], f[..., :40])
    assert set(compute_fusion_metrics(a[..., :40], b[..., :40], f[..., :40], "EN,SSIM")) == {"EN", "SSIM"}


def test_reference_metrics_against_skimage():
    from skimage.metrics import structural_similarity

    a, _, f = _triple(10, 48, 64)
    ga, gf = ref.gray_from_bgr(a), ref.gray_from_bgr(f)
    got = reference_metrics(_t(a), _t(f))
    psnr = 10 * np.log10(255.0**2 / np.mean((ga - gf) ** 2))
    ssim = structural_similarity(gf.astype(np.float32), ga.astype(np.float32), data_range=255.0)
    assert float(got["PSNR"][0]) == pytest.approx(psnr, rel=1e-12)
    assert float(got["SSIM"][0]) == pytest.approx(ssim, rel=1e-6)
    same = reference_metrics(_t(a), _t(a))
    assert float(same["PSNR"][0]) == math.inf and float(same["SSIM"][0]) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- real pairs


def _real_triple(ivif_dir, dataset: str, stem: str, fusion: str):
    def read(folder):
        (path,) = (ivif_dir / dataset / folder).glob(f"{stem}.*")
        return cv2.imread(str(path), cv2.IMREAD_COLOR)

    return read("ir"), read("vi"), read(fusion)


@pytest.mark.parametrize("dataset,stem", [("TNO", "01"), ("RoadScene", "FLIR_00211")])
@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_real_baselines_match_reference(ivif_dir, dataset, stem, fusion):
    a, b, f = _real_triple(ivif_dir, dataset, stem, fusion)
    _assert_match(_ours(a, b, f), _theirs(a, b, f), f"{dataset}/{stem}/{fusion}")


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["TNO", "RoadScene"])
def test_real_baselines_match_reference_more_images(ivif_dir, dataset):
    stems = sorted(p.stem for p in (ivif_dir / dataset / "ir").iterdir())[1:6]
    for stem in stems:
        for fusion in ("mean", "max"):
            a, b, f = _real_triple(ivif_dir, dataset, stem, fusion)
            _assert_match(_ours(a, b, f), _theirs(a, b, f), f"{dataset}/{stem}/{fusion}")
