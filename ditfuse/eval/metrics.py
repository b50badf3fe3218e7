"""Fusion metrics in the MMIF-CDDFuse evaluator convention (docs/METRICS.md).

Published IVIF/MFF/MEF tables come from MMIF-CDDFuse `utils/Evaluator.py`; this module reproduces
it to 1e-4 relative, quirks included (PSNR peak = max(F), SSIM with data_range 2 in float32,
Qabf's "gF itself where equal", VIF NaN -> 1), as batched torch on any device.

    a, b, f: (N, 3, H, W) RGB or (N, 1, H, W) gray, values on 0..255 (never scaled to [0, 1])
    compute_fusion_metrics(a, b, f) -> {"EN": (N,), "SD": (N,), ...}  float64, on f's device

Pure math: no project imports, no Lightning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as tnf
from torch import Tensor

CONVENTION = "mmif-cddfuse"
METRIC_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "CC", "MSE", "PSNR", "VIF", "Qabf", "SSIM")
# reference_metrics(): PSNR with peak 255, SSIM as skimage defaults with data_range=255 (gray).
REFERENCE_CONVENTION = "gray-peak255"
REFERENCE_NAMES = ("PSNR", "SSIM")

# OpenCV's BGR2GRAY weights (docs/METRICS.md "Inputs"), applied as float32 values.
_W_R, _W_G, _W_B = (float(torch.tensor(w, dtype=torch.float32)) for w in (0.299, 0.587, 0.114))
_LEVELS = 256  # docs/METRICS.md: MI and EN use 256 integer levels, no binning
# VIFp constants (docs/METRICS.md "VIFp"; Evaluator.compare_viff): sigma_n^2 = 2, eps = 1e-10,
# window sizes N = 2^(5-s)+1 for s = 1..4.
_VIF_SIGMA_NSQ, _VIF_EPS, _VIF_SIZES = 2.0, 1e-10, (17, 9, 5, 3)
VIF_MIN_SIDE = 41  # smallest side for which all four 'valid' scales are non-empty (17/9/5/3)
# Qabf constants (docs/METRICS.md "Qabf"; Evaluator.Qabf_getQabf): Tg, kg, Dg, Ta, ka, Da.
_TG, _KG, _DG, _TA, _KA, _DA = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
# SSIM (docs/METRICS.md "SSIM"; skimage structural_similarity defaults): 7x7 uniform window,
# sample covariance 49/48, K1 = 0.01, K2 = 0.03; the evaluator's data_range is 2.0.
_SSIM_WIN, _SSIM_K1, _SSIM_K2, _SSIM_RANGE = 7, 0.01, 0.03, 2.0
# Per-pixel work runs in blocks of rows on the CPU so a block's temporaries stay in cache
# (about 2x faster than whole-image ops); accelerators take the whole image at once.
_CPU_BLOCK_ROWS = 32


# --------------------------------------------------------------------------- inputs


def to_gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) RGB or (N, 1, H, W) gray on 0..255 -> (N, H, W) float64 gray.

    RGB goes through OpenCV's float32 BGR2GRAY, t = G*0.587; t = fma(B, 0.114, t);
    y = fma(R, 0.299, t), then round half to even (docs/METRICS.md "Inputs"). torch has no fma, so
    each step is computed in float64, where for 8-bit values the product and sum are exact, and
    rounded to float32 once, which is what fma does. 1-channel input passes through.
    """
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected an (N, 1, H, W) or (N, 3, H, W) image, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x[:, 0].to(torch.float64)
    r, g, b = x.to(torch.float32).to(torch.float64).unbind(1)  # cv2 sees the image as float32
    t = _to_f32(g * _W_G)
    t = _to_f32(b * _W_B + t)
    y = (r * _W_R + t).to(torch.float32)
    return torch.round(y).to(torch.float64)  # torch.round is half-to-even, like np.round


def _row_blocks(h: int, device: torch.device) -> list[tuple[int, int]]:
    """[(r0, r1), ...] covering range(h): blocks of _CPU_BLOCK_ROWS on CPU, one block elsewhere."""
    step = _CPU_BLOCK_ROWS if device.type == "cpu" else max(h, 1)
    return [(r, min(r + step, h)) for r in range(0, h, step)]


def _to_f32(x: Tensor) -> Tensor:
    """Round a float64 tensor to float32 and back: one IEEE rounding."""
    return x.to(torch.float32).to(torch.float64)


def _levels(x: Tensor) -> Tensor:
    """(N, H, W) gray -> (N, H*W) int64 levels 0..255 (rounded half to even, clamped)."""
    return torch.round(x).clamp(0, _LEVELS - 1).to(torch.int64).flatten(1)


# --------------------------------------------------------------------------- simple metrics


def _entropy(f: Tensor) -> Tensor:
    """EN: Shannon entropy in bits of F's 256-bin histogram. (N, H, W) -> (N,)"""
    n = f.shape[0]
    idx = _levels(f) + _LEVELS * torch.arange(n, device=f.device)[:, None]  # (N, HW)
    hist = torch.bincount(idx.flatten(), minlength=n * _LEVELS).view(n, _LEVELS)
    p = hist.to(torch.float64) / idx.shape[1]
    return -(p * torch.log2(torch.where(p > 0, p, 1.0))).sum(1)


def _std(f: Tensor) -> Tensor:
    """SD: population standard deviation. (N, H, W) -> (N,)"""
    return f.flatten(1).std(dim=1, correction=0)


def _spatial_frequency(f: Tensor) -> Tensor:
    """SF: sqrt(mean dx^2 + mean dy^2), each mean over its own count. (N, H, W) -> (N,)"""
    dx = f[:, :, 1:] - f[:, :, :-1]  # (N, H, W-1)
    dy = f[:, 1:, :] - f[:, :-1, :]  # (N, H-1, W)
    return torch.sqrt((dx * dx).mean((1, 2)) + (dy * dy).mean((1, 2)))


def _average_gradient(f: Tensor) -> Tensor:
    """AG: mean of sqrt((Gx^2 + Gy^2) / 2), gradients as numpy.gradient. (N, H, W) -> (N,)"""
    gy, gx = torch.gradient(f, dim=(1, 2))  # central inside, one-sided at the borders
    return torch.sqrt((gx * gx + gy * gy) / 2).mean((1, 2))


def _mutual_information(x: Tensor, y: Tensor) -> Tensor:
    """MI(x, y) in nats from the 256x256 joint histogram. (N, H, W) x2 -> (N,)"""
    n = x.shape[0]
    offset = _LEVELS * _LEVELS * torch.arange(n, device=x.device)[:, None]
    idx = _levels(x) * _LEVELS + _levels(y) + offset  # (N, HW)
    joint = torch.bincount(idx.flatten(), minlength=n * _LEVELS**2).view(n, _LEVELS, _LEVELS)
    p = joint.to(torch.float64) / idx.shape[1]  # (N, 256, 256)
    outer = p.sum(2, keepdim=True) * p.sum(1, keepdim=True)  # p(x) p(y), (N, 256, 256)
    ratio = torch.where(p > 0, p / torch.where(p > 0, outer, 1.0), 1.0)
    # sklearn's mutual_info_score (used by the evaluator) clips the sum at 0
    return (p * torch.log(ratio)).sum((1, 2)).clamp_min(0.0)


def _corr(x: Tensor, y: Tensor) -> Tensor:
    """Pearson r per sample; NaN when either side is constant. (N, H, W) x2 -> (N,)"""
    xc = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    yc = y.flatten(1) - y.flatten(1).mean(1, keepdim=True)
    return (xc * yc).sum(1) / torch.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))


def _mse(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """MSE: mean of the two source MSEs. (N, H, W) x3 -> (N,)"""
    return (((a - f) ** 2).mean((1, 2)) + ((b - f) ** 2).mean((1, 2))) / 2


def _psnr(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """PSNR with peak max(F), not 255 (Evaluator.PSNR). (N, H, W) x3 -> (N,)"""
    peak = f.amax((1, 2))
    return 10 * torch.log10(peak * peak / _mse(a, b, f))


# --------------------------------------------------------------------------- VIF


def _gauss_1d(n: int, device: torch.device) -> Tensor:
    """(n,) float64: 1-D factor of the evaluator's normalised n x n Gaussian, sigma = n/5.

    The evaluator zeroes taps below eps*max of the 2-D window; for n in (17, 9, 5, 3) the
    smallest tap is exp(-5.5) * max, so nothing is zeroed and the window is separable.
    """
    x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
    h = torch.exp(-x * x / (2 * (n / 5.0) ** 2))
    return h / h.sum()


@functools.lru_cache(maxsize=64)
def _band(n: int, rows: int, stride: int, device: torch.device) -> Tensor:
    """(rows, stride*(rows-1)+n) banded matrix: row i holds the n-tap window at columns
    stride*i .. stride*i+n-1. Cached: the filters below reuse it for every block."""
    g = _gauss_1d(n, device)
    cols = stride * (rows - 1) + n
    t = torch.zeros(rows * cols, dtype=g.dtype, device=device)
    i = torch.arange(rows, device=device)[:, None]
    t[(i * cols + stride * i + torch.arange(n, device=device)).flatten()] = g.repeat(rows)
    return t.view(rows, cols)


@functools.lru_cache(maxsize=8)
def _taps(n: int) -> tuple[float, ...]:
    return tuple(_gauss_1d(n, torch.device("cpu")).tolist())


def _filter_valid(x: Tensor, n: int, stride: int = 1) -> Tensor:
    """Separable 'valid' filtering with the evaluator's n x n window, every stride-th output kept.

    x: (N, H, C, W) float64 -> (N, ceil((H-n+1)/stride), C, ceil((W-n+1)/stride)). Along H:
    blocks of outputs times a banded matrix (BLAS); along W: n shifted multiply-adds on
    column slices (no transposed copies). FFTs were slower here, mostly from their scratch
    memory. The window is symmetric, so correlation == the evaluator's convolve2d.
    """
    n_img, h_in, c, w_in = x.shape
    h_out, w_out = (h_in - n) // stride + 1, (w_in - n) // stride + 1
    step = _CPU_BLOCK_ROWS if x.device.type == "cpu" else h_out
    band = _band(n, min(step, h_out), stride, x.device)  # (step, stride*(step-1)+n)
    flat = x.reshape(n_img, h_in, c * w_in)
    rows = torch.empty(n_img, h_out, c * w_in, dtype=x.dtype, device=x.device)
    for r0 in range(0, h_out, step):  # along H: out[r] = sum_k g[k] x[stride*r + k]
        k, width = min(step, h_out - r0), stride * (min(step, h_out - r0) - 1) + n
        torch.matmul(band[:k, :width], flat[:, stride * r0 : stride * r0 + width], out=rows[:, r0 : r0 + k])
    rows = rows.view(-1, w_in)  # (N*h'*C, W)
    span, taps = stride * (w_out - 1) + 1, _taps(n)
    out = rows[:, 0:span:stride] * taps[0]
    for k in range(1, n):  # along W
        out.add_(rows[:, k : k + span : stride], alpha=taps[k])
    return out.view(n_img, h_out, c, w_out)


def _vif_terms(s1: Tensor, s2: Tensor, s12: Tensor) -> tuple[Tensor, Tensor]:
    """VIFp numerator and denominator sums with the evaluator's masking.

    s1: (N, 2, h, w) source variances (A, B), s2: (N, 1, h, w) fused, s12: (N, 2, h, w).
    Evaluator order: where s1 < eps: g = 0, sv = s2, s1 = 0; where s2 < eps: g = 0, sv = 0;
    where g < 0: sv = s2, g = 0; sv <= eps -> eps. Every masked pixel ends with g = 0 or
    s1 = 0, so its numerator term is 0 whatever sv is; g < 0 iff s12 < 0. Returns (N, 2) each.
    """
    eps = _VIF_EPS
    g = (s12 / (s1 + eps)).clamp_min_(0).masked_fill_(s2 < eps, 0.0)
    s1 = s1.masked_fill(s1 < eps, 0.0)
    sv = (s2 - g * s12).clamp_min_(eps)
    num = torch.log10(1 + g * g * s1 / (sv + _VIF_SIGMA_NSQ))
    den = torch.log10(1 + s1 / _VIF_SIGMA_NSQ)
    return num.sum((2, 3)), den.sum((2, 3))


def _vif_scale(x: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """One scale's VIFp sums. x: (N, h, 3, w) float64 A, B, F -> num, den: (N, 2) each.

    Works through blocks of output rows, so the eight moment maps never exist at full size.
    """
    blocks = _row_blocks(x.shape[1] - n + 1, x.device)
    buf = x.new_empty(x.shape[0], blocks[0][1] + n - 1, 8, x.shape[3])  # one block's maps
    num = den = 0.0
    for r0, r1 in blocks:
        xb = x[:, r0 : r1 + n - 1]  # (N, r+n-1, 3, w): the input rows of this block
        maps = buf[:, : xb.shape[1]]  # A B F A2 B2 F2 AF BF, written in place
        maps[:, :, :3] = xb
        torch.mul(xb, xb, out=maps[:, :, 3:6])
        torch.mul(xb[:, :, :2], xb[:, :, 2:], out=maps[:, :, 6:])
        m = _filter_valid(maps, n).transpose(1, 2)  # (N, 8, r, w')
        mu, mu_f = m[:, :2], m[:, 2:3]
        s1 = (m[:, 3:5] - mu * mu).clamp_min_(0)  # (N, 2, r, w'): sources A, B
        s2 = (m[:, 5:6] - mu_f * mu_f).clamp_min_(0)  # (N, 1, r, w')
        n_b, d_b = _vif_terms(s1, s2, m[:, 6:8] - mu * mu_f)
        num, den = num + n_b, den + d_b
    return num, den


def _vif(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """VIF = VIFp(A->F) + VIFp(B->F), pixel-domain multiscale (vifp_mscale). (N,H,W) x3 -> (N,)

    Gaussian filtering in float64. Each image is centred by its mean first: variances are
    shift-invariant, and centring keeps rounding noise far below eps = 1e-10.
    """
    x = torch.stack([a, b, f], 2)  # (N, H, 3, W): sources A, B, then F
    x = x - x.mean((1, 3), keepdim=True)
    num = den = torch.zeros(a.shape[0], 2, dtype=torch.float64, device=a.device)
    for s, n in enumerate(_VIF_SIZES):
        n_s, d_s = _vif_scale(x, n)
        num, den = num + n_s, den + d_s
        if s + 1 < len(_VIF_SIZES):  # next scale: filter with its window ('valid'), take [::2, ::2]
            x = _filter_valid(x, _VIF_SIZES[s + 1], stride=2)
    vifp = num / den
    return torch.where(torch.isnan(vifp), 1.0, vifp).sum(1)  # NaN -> 1 per source (evaluator)


# --------------------------------------------------------------------------- Qabf


def _sobel(p: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluator's Sobel by true 2-D convolution on a zero-padded block. (M, r+2, W+2) -> (M, r, W) x2.

    gx = conv(I, [[-1,0,1],[-2,0,2],[-1,0,1]]) = left minus right;
    gy = conv(I, [[1,2,1],[0,0,0],[-1,-2,-1]]) = below minus above.
    """
    col = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # vertical [1, 2, 1], (M, r, W+2)
    row = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # horizontal [1, 2, 1], (M, r+2, W)
    return col[:, :, :-2] - col[:, :, 2:], row[:, 2:] - row[:, :-2]


def _edge_strength_angle(p: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-padded (M, r+2, W+2) float32 -> g = |grad|, alpha = arctan(gy/gx), pi/2 where gx == 0."""
    gx, gy = _sobel(p)
    g = torch.sqrt(gx * gx + gy * gy)
    alpha = torch.atan(gy / gx).masked_fill_(gx == 0, math.pi / 2)
    return g, alpha


def _edge_preservation(g_x: Tensor, a_x: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    """Q^{XF} per pixel; G = gF itself where gX == gF (Evaluator.Qabf_getQabf quirk)."""
    ratio = torch.where(g_x == g_f, g_f, torch.minimum(g_x, g_f) / torch.maximum(g_x, g_f))
    orient = 1 - torch.abs(a_x - a_f) / (math.pi / 2)
    q_g = _TG / (1 + torch.exp(_KG * (ratio - _DG)))
    q_a = _TA / (1 + torch.exp(_KA * (orient - _DA)))
    return q_g * q_a


def _qabf(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """Qabf, computed in float32 like the evaluator. (N, H, W) x3 -> (N,)"""
    n = a.shape[0]
    p = tnf.pad(torch.cat([a, b, f]).to(torch.float32), (1, 1, 1, 1))  # (3N, H+2, W+2), zeros
    nume = deno = 0.0
    for r0, r1 in _row_blocks(a.shape[1], a.device):
        g, alpha = _edge_strength_angle(p[:, r0 : r1 + 2])  # (3N, r, W)
        (g_a, g_b, g_f), (a_a, a_b, a_f) = g.split(n), alpha.split(n)
        q = _edge_preservation(g_a, a_a, g_f, a_f) * g_a + _edge_preservation(g_b, a_b, g_f, a_f) * g_b
        nume = nume + q.sum((1, 2), dtype=torch.float64)
        deno = deno + (g_a + g_b).sum((1, 2), dtype=torch.float64)
    return nume / deno


# --------------------------------------------------------------------------- SSIM


def _box_valid(x: Tensor, dim: int, win: int) -> Tensor:
    """Mean of win consecutive float32 values along dim, summed in float64, rounded once.

    scipy's uniform_filter accumulates each line in float64 and stores float32; a sum of 7
    float32 values is exact in float64, so this is its value up to scipy's running-sum error.
    """
    x = x.to(torch.float64)
    size = x.shape[dim] - win + 1
    acc = x.narrow(dim, 0, size) + x.narrow(dim, 1, size)
    for k in range(2, win):
        acc += x.narrow(dim, k, size)
    return (acc / win).to(torch.float32)


def _ssim_pairs(x: Tensor, ys: Tensor, c1: float, c2: float) -> Tensor:
    """skimage-style SSIM of x against each of K images, in float32 like skimage.

    x: (N, H, W), ys: (N, K, H, W) -> (N, K) float64. skimage averages the map with win//2
    pixels cropped on every side: exactly the windows that never touch its reflect padding,
    so 'valid' filtering gives the same values and needs no padding.
    """
    k, (h, w), win = ys.shape[1], ys.shape[-2:], _SSIM_WIN
    x, ys = x[:, None].to(torch.float32), ys.to(torch.float32)  # (N, 1, H, W), (N, K, H, W)
    cov_norm = win * win / (win * win - 1)  # sample covariance, 49/48
    total = 0.0
    for r0, r1 in _row_blocks(h - win + 1, x.device):
        xs, yb = x[:, :, r0 : r1 + win - 1], ys[:, :, r0 : r1 + win - 1]
        maps = torch.cat([xs, yb, xs * xs, yb * yb, xs * yb], 1)  # (N, 3K+2, r+6, W)
        u = _box_valid(_box_valid(maps, 2, win), 3, win)  # axis 0 then axis 1, like scipy
        ux, uy, uxx, uyy, uxy = u.split([1, k, 1, k, k], 1)
        vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
        num = (2 * ux * uy + c1) * (2 * vxy + c2)
        den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
        total = total + (num / den).sum((2, 3), dtype=torch.float64)
    return total / ((h - win + 1) * (w - win + 1))


def _ssim_sum(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """SSIM = ssim(F, A) + ssim(F, B) with the evaluator's data_range 2.0. (N, H, W) x3 -> (N,)"""
    c1, c2 = (_SSIM_K1 * _SSIM_RANGE) ** 2, (_SSIM_K2 * _SSIM_RANGE) ** 2
    return _ssim_pairs(f, torch.stack([a, b], 1), c1, c2).sum(1)


# --------------------------------------------------------------------------- public API

_METRICS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "EN": lambda a, b, f: _entropy(f),
    "SD": lambda a, b, f: _std(f),
    "SF": lambda a, b, f: _spatial_frequency(f),
    "AG": lambda a, b, f: _average_gradient(f),
    "MI": lambda a, b, f: _mutual_information(f, a) + _mutual_information(f, b),
    "SCD": lambda a, b, f: _corr(a, f - b) + _corr(b, f - a),
    "CC": lambda a, b, f: (_corr(a, f) + _corr(b, f)) / 2,
    "MSE": _mse,
    "PSNR": _psnr,
    "VIF": _vif,
    "Qabf": _qabf,
    "SSIM": _ssim_sum,
}


def resolve_names(metrics: Sequence[str] | str | None) -> list[str]:
    """Canonical metric names in METRIC_NAMES order; case-insensitive, comma string allowed."""
    if metrics is None:
        return list(METRIC_NAMES)
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    canon = {m.lower(): m for m in METRIC_NAMES}
    unknown = [m for m in metrics if m.strip().lower() not in canon]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRIC_NAMES)}")
    wanted = {canon[m.strip().lower()] for m in metrics}
    return [m for m in METRIC_NAMES if m in wanted]


def _work_device(device: torch.device) -> torch.device:
    """float64 is needed; MPS has none, so Apple GPUs compute on the CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def _nhw(x: Tensor) -> tuple[int, ...]:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected an (N, 1, H, W) or (N, 3, H, W) image, got shape {tuple(x.shape)}")
    return (x.shape[0], *x.shape[-2:])


def _check_triple(a: Tensor, b: Tensor, f: Tensor, names: list[str]) -> None:
    if not _nhw(a) == _nhw(b) == _nhw(f):
        raise ValueError(f"a, b, f must share N, H, W: got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(f.shape)}")
    h, w = f.shape[-2:]
    if "VIF" in names and min(h, w) < VIF_MIN_SIDE:
        raise ValueError(f"VIF needs images of at least {VIF_MIN_SIDE}x{VIF_MIN_SIDE}, got {h}x{w}; drop VIF")
    if "SSIM" in names and min(h, w) < _SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN}, got {h}x{w}; drop SSIM")
    if min(h, w) < 2:
        raise ValueError(f"images must be at least 2x2 (gradients), got {h}x{w}")


def compute_fusion_metrics(
    a: Tensor, b: Tensor, f: Tensor, metrics: Sequence[str] | str | None = None
) -> dict[str, Tensor]:
    """Fusion metrics of F against sources A, B in the MMIF-CDDFuse convention.

    a, b, f: (N, 3, H, W) RGB or (N, 1, H, W) gray, values on 0..255, same N, H, W (channels may
    differ: each is converted on its own). metrics: names from METRIC_NAMES (default: all).
    Returns {name: (N,) float64} on f's device; undefined correlations (SCD, CC) are NaN.
    """
    names = resolve_names(metrics)
    _check_triple(a, b, f, names)
    dev = _work_device(f.device)
    ga, gb, gf = (to_gray(x.to(dev)) for x in (a, b, f))  # (N, H, W) float64
    return {name: _METRICS[name](ga, gb, gf).to(f.device) for name in names}


def reference_metrics(ref: Tensor, f: Tensor) -> dict[str, Tensor]:
    """PSNR/SSIM of F against a ground truth, convention REFERENCE_CONVENTION.

    Both converted to gray as in compute_fusion_metrics; PSNR = 10 log10(255^2 / MSE) (peak 255,
    inf when equal); SSIM as skimage's structural_similarity defaults with data_range=255
    (7x7 uniform window, sample covariance, float32). ref, f: (N, C, H, W) -> {name: (N,)}
    """
    if _nhw(ref) != _nhw(f):
        raise ValueError(f"ref and f must share N, H, W: got {tuple(ref.shape)}, {tuple(f.shape)}")
    if min(f.shape[-2:]) < _SSIM_WIN:
        raise ValueError(f"images must be at least {_SSIM_WIN}x{_SSIM_WIN}, got {tuple(f.shape[-2:])}")
    dev = _work_device(f.device)
    gr, gf = to_gray(ref.to(dev)), to_gray(f.to(dev))
    mse = ((gr - gf) ** 2).mean((1, 2))
    c1, c2 = (_SSIM_K1 * 255.0) ** 2, (_SSIM_K2 * 255.0) ** 2
    ssim = _ssim_pairs(gf, gr[:, None], c1, c2)[:, 0]
    return {"PSNR": (10 * torch.log10(255.0**2 / mse)).to(f.device), "SSIM": ssim.to(f.device)}
