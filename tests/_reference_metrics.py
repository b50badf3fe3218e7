"""Independent, straightforward numpy/scipy implementation of ../shared/docs/METRICS.md.

Written from the document, sharing no code with ditfuse/eval/metrics.py: float64 everywhere except
SSIM, which the convention defines as scikit-image's float32 computation with data_range 2.
Used by tests/test_metrics.py (agreement to 1e-4) and benchmarks/metrics_speed.py (the plain
implementation the >= 10x speed target is measured against). 2-D images on 0..255.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.signal import convolve2d
from skimage.metrics import structural_similarity

NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "CC", "MSE", "PSNR", "VIF", "Qabf", "SSIM")


def gray_from_bgr(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) BGR -> (H, W) float64 gray: OpenCV float32 BGR2GRAY, then np.round."""
    return np.round(cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2GRAY)).astype(np.float64)


def entropy(f):
    p = np.bincount(np.round(f).astype(np.uint8).ravel(), minlength=256) / f.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def spatial_frequency(f):
    return float(np.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def average_gradient(f):
    gy, gx = np.gradient(f)
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def mutual_information(x, y):
    edges = np.arange(257) - 0.5
    joint, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=[edges, edges])
    p = joint / joint.sum()
    px, py = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / np.outer(px, py)[nz])))


def pearson(x, y):
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])


def mse(a, b, f):
    return float((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2)


def gaussian_window(n):
    """n x n Gaussian, sigma n/5, taps below eps*max zeroed, normalised to sum 1."""
    r = (n - 1) / 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    h = np.exp(-(xx**2 + yy**2) / (2 * (n / 5) ** 2))
    h[h < np.finfo(float).eps * h.max()] = 0
    return h / h.sum()


def vifp(ref, dist):
    eps, sn2 = 1e-10, 2.0
    num = den = 0.0
    for s in range(1, 5):
        win = gaussian_window(2 ** (5 - s) + 1)
        if s > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = np.maximum(convolve2d(ref * ref, win, mode="valid") - mu1**2, 0)
        s2 = np.maximum(convolve2d(dist * dist, win, mode="valid") - mu2**2, 0)
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        m = s1 < eps
        g[m], sv[m], s1[m] = 0, s2[m], 0
        m = s2 < eps
        g[m], sv[m] = 0, 0
        m = g < 0
        sv[m], g[m] = s2[m], 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g**2 * s1 / (sv + sn2)))
        den += np.sum(np.log10(1 + s1 / sn2))
    v = num / den if den != 0 else np.nan
    return 1.0 if np.isnan(v) else float(v)


def _sobel(img):
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
    ky = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    gx = convolve2d(img, kx, mode="same")
    gy = convolve2d(img, ky, mode="same")
    g = np.sqrt(gx**2 + gy**2)
    a = np.full(img.shape, np.pi / 2)
    nz = gx != 0
    a[nz] = np.arctan(gy[nz] / gx[nz])
    return g, a


def _q(gx, ax, gf, af):
    G = np.where(gx > gf, gf / np.where(gx > gf, gx, 1), np.where(gx < gf, gx / np.where(gx < gf, gf, 1), gf))
    A = 1 - np.abs(ax - af) / (np.pi / 2)
    return 0.9994 / (1 + np.exp(-15 * (G - 0.5))) * 0.9879 / (1 + np.exp(-22 * (A - 0.8)))


def qabf(a, b, f):
    (ga, aa), (gb, ab), (gf, af) = _sobel(a), _sobel(b), _sobel(f)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(_q(ga, aa, gf, af) * ga + _q(gb, ab, gf, af) * gb) / np.sum(ga + gb))


def ssim(x, y):
    return float(structural_similarity(x.astype(np.float32), y.astype(np.float32), data_range=2.0))


def all_metrics(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """Every metric of METRICS.md for gray float64 (H, W) sources a, b and fused f."""
    with np.errstate(invalid="ignore", divide="ignore"):
        psnr = float(10 * np.log10(f.max() ** 2 / mse(a, b, f)))
    return {
        "EN": entropy(f),
        "SD": float(np.std(f)),
        "SF": spatial_frequency(f),
        "AG": average_gradient(f),
        "MI": mutual_information(f, a) + mutual_information(f, b),
        "SCD": pearson(a, f - b) + pearson(b, f - a),
        "CC": (pearson(a, f) + pearson(b, f)) / 2,
        "MSE": mse(a, b, f),
        "PSNR": psnr,
        "VIF": vifp(a, f) + vifp(b, f),
        "Qabf": qabf(a, b, f),
        "SSIM": ssim(f, a) + ssim(f, b),
    }
