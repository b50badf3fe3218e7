"""M3 (multi-degradation masked-image modelling): two degraded views of one clean image.

Pure torch, no Lightning. The image is tiled with square blocks of one size drawn per sample;
every block gets one operation (mask / blur / noise) and is degraded in exactly one view (50/50),
except a configured fraction of blocks that is degraded in both views with the same kind of
operation (official make_M3_data.py: 1/4). Per-block choices are drawn as tensors from a
generator seeded by (seed, key), so a pair is reproducible. See ../shared/docs/SHARDS.md.

Vectorised: noise and masking are whole-image tensors gated per block; blur runs on all blocks
at once as a grouped separable convolution with one kernel per block (median: one unfold per
kernel size). A degraded view is `where(block_map, degraded, clean)`, so outside blocks degraded
in both views the clean image is exactly recoverable from the undegraded view.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

OPS: tuple[str, ...] = ("mask", "blur", "noise")
BLURS: tuple[str, ...] = ("gaussian", "box", "median")
NOISES: tuple[str, ...] = ("gaussian", "salt_pepper")

# who is degraded in a block (M3Result.who)
VIEW1, VIEW2, BOTH = 0, 1, 2


@dataclass
class M3Config:
    """M3 options (what a DataModule config sets). Defaults follow the paper / SHARDS.md."""

    block_sizes: tuple[int, ...] = (16, 32, 64)  # paper: 16/32/64 px (official script 32/64/128)
    ops: dict[str, float] = field(default_factory=lambda: {"mask": 1.0, "blur": 1.0, "noise": 1.0})
    both_fraction: float = 0.25  # official make_M3_data.py: 1/4 of blocks in both views
    blur_kinds: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in BLURS})
    blur_kernels: tuple[int, ...] = (3, 5, 7, 9, 11)
    blur_sigma: tuple[float, float] = (0.8, 3.0)
    noise_kinds: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in NOISES})
    noise_sigma: tuple[float, float] = (10.0, 35.0)  # on the 0..255 scale
    salt_pepper: tuple[float, float] = (0.01, 0.03)

    def __post_init__(self) -> None:
        self.block_sizes = tuple(int(b) for b in self.block_sizes)
        self.blur_kernels = tuple(int(k) for k in self.blur_kernels)
        if not self.block_sizes or min(self.block_sizes) < 1:
            raise ValueError(f"m3 block_sizes must be positive ints, got {self.block_sizes}")
        _check_weights("m3 ops", self.ops, OPS)
        _check_weights("m3 blur_kinds", self.blur_kinds, BLURS)
        _check_weights("m3 noise_kinds", self.noise_kinds, NOISES)
        if not 0.0 <= self.both_fraction <= 1.0:
            raise ValueError(f"m3 both_fraction must be in [0, 1], got {self.both_fraction}")
        if not self.blur_kernels or any(k < 1 or k % 2 == 0 for k in self.blur_kernels):
            raise ValueError(f"m3 blur_kernels must be odd positive ints, got {self.blur_kernels}")
        for name in ("blur_sigma", "noise_sigma", "salt_pepper"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"m3 {name} must be a range (lo <= hi, lo >= 0), got {(lo, hi)}")


def _check_weights(name: str, weights: dict[str, float], known: tuple[str, ...]) -> None:
    unknown = set(weights) - set(known)
    if unknown:
        raise ValueError(f"{name}: unknown {sorted(unknown)}; use {', '.join(known)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{name}: weights must be >= 0 with a positive sum, got {weights}")


@dataclass
class M3Result:
    """Two views, the clean target, and the block map (for plots and tests)."""

    view1: Tensor  # (3, H, W) in [0, 1]
    view2: Tensor  # (3, H, W)
    clean: Tensor  # (3, H, W)
    block_size: int
    op: Tensor  # (gh, gw) long, index into OPS
    who: Tensor  # (gh, gw) long: VIEW1, VIEW2 or BOTH

    def pixel_map(self, grid: Tensor) -> Tensor:
        """Upsample a (gh, gw) block map to (H, W)."""
        b, (h, w) = self.block_size, self.clean.shape[-2:]
        return grid.repeat_interleave(b, 0).repeat_interleave(b, 1)[:h, :w]

    @property
    def degraded1(self) -> Tensor:  # (H, W) bool
        return self.pixel_map(self.who != VIEW2)

    @property
    def degraded2(self) -> Tensor:  # (H, W) bool
        return self.pixel_map(self.who != VIEW1)


def seed_for(seed: int, key: str) -> int:
    """A stable 63-bit seed for (seed, key): the same on every machine and Python run."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, key: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, key))


def _categorical(weights: dict[str, float], names: tuple[str, ...], n: int, g: torch.Generator) -> Tensor:
    probs = torch.tensor([float(weights.get(k, 0.0)) for k in names])
    return torch.multinomial(probs, n, replacement=True, generator=g)


def _uniform(lo: float, hi: float, n: int, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


@dataclass
class _BlockParams:
    """Per-block draws of one view, all (nb,) tensors."""

    blur_kind: Tensor
    kernel: Tensor
    sigma: Tensor
    noise_kind: Tensor
    noise_sigma: Tensor
    sp_prob: Tensor


def _draw_params(cfg: M3Config, nb: int, g: torch.Generator) -> _BlockParams:
    kernels = torch.tensor(cfg.blur_kernels)
    return _BlockParams(
        blur_kind=_categorical(cfg.blur_kinds, BLURS, nb, g),
        kernel=kernels[torch.randint(len(kernels), (nb,), generator=g)],
        sigma=_uniform(*cfg.blur_sigma, nb, g),
        noise_kind=_categorical(cfg.noise_kinds, NOISES, nb, g),
        noise_sigma=_uniform(*cfg.noise_sigma, nb, g) / 255.0,
        sp_prob=_uniform(*cfg.salt_pepper, nb, g),
    )


def _to_blocks(x: Tensor, b: int, halo: int) -> Tensor:
    """(C, H, W) -> (nb, C, b+2*halo, b+2*halo) overlapping tiles, row-major over the grid."""
    c, h, w = x.shape
    gh, gw = -(-h // b), -(-w // b)
    # replicate-pad to a whole grid, then add the halo the blur kernels reach into
    x = F.pad(x[None], (halo, gw * b - w + halo, halo, gh * b - h + halo), mode="replicate")[0]
    tiles = x.unfold(1, b + 2 * halo, b).unfold(2, b + 2 * halo, b)  # (C, gh, gw, t, t)
    return tiles.permute(1, 2, 0, 3, 4).reshape(gh * gw, c, b + 2 * halo, b + 2 * halo)


def _from_blocks(tiles: Tensor, h: int, w: int) -> Tensor:
    """(nb, C, b, b) -> (C, H, W), inverse of `_to_blocks` without halo."""
    nb, c, b, _ = tiles.shape
    gh, gw = -(-h // b), -(-w // b)
    x = tiles.reshape(gh, gw, c, b, b).permute(2, 0, 3, 1, 4).reshape(c, gh * b, gw * b)
    return x[:, :h, :w]


def _linear_kernels(p: _BlockParams, kmax: int) -> Tensor:
    """(nb, kmax) 1-D kernels: Gaussian (sigma, truncated at the block's kernel size) or box."""
    r = kmax // 2
    x = torch.arange(-r, r + 1, dtype=torch.float32)[None]  # (1, kmax)
    inside = (x.abs() <= (p.kernel[:, None] // 2)).float()
    gauss = torch.exp(-0.5 * (x / p.sigma[:, None]) ** 2) * inside
    is_box = (p.blur_kind == BLURS.index("box"))[:, None]
    k = torch.where(is_box, inside, gauss)
    return k / k.sum(1, keepdim=True)


def _median_tiles(tiles: Tensor, kernel: Tensor, b: int, halo: int) -> Tensor:
    """Median filter each (C, b+2h, b+2h) tile with its own odd kernel size -> (n, C, b, b)."""
    out = torch.empty(tiles.shape[0], tiles.shape[1], b, b, dtype=tiles.dtype)
    for k in kernel.unique().tolist():  # at most len(blur_kernels) passes
        sel = (kernel == k).nonzero().flatten()
        o = halo - k // 2
        sub = tiles[sel][:, :, o:o + b + k - 1, o:o + b + k - 1]
        win = sub.unfold(2, k, 1).unfold(3, k, 1)  # (n, C, b, b, k, k)
        out[sel] = win.reshape(*win.shape[:4], k * k).median(-1).values
    return out


def _blur(x: Tensor, b: int, p: _BlockParams, sel: Tensor, kmax: int) -> Tensor:
    """Blur the blocks `sel` (indices) of x, each with its own filter -> (C, H, W).

    Only selected blocks are filtered (blur is the costly op; median above all)."""
    c, h, w = x.shape
    halo = kmax // 2
    tiles = _to_blocks(x, b, halo)[sel]  # (n, C, t, t)
    n, t = tiles.shape[0], tiles.shape[-1]
    k = _linear_kernels(_take(p, sel), kmax).repeat_interleave(c, 0)  # (n*C, kmax)
    y = tiles.reshape(1, n * c, t, t)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)  # horizontal pass: (1, n*C, t, b)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)  # vertical pass:   (1, n*C, b, b)
    y = y.reshape(n, c, b, b)
    is_median = (p.blur_kind[sel] == BLURS.index("median")).nonzero().flatten()
    if len(is_median):
        y[is_median] = _median_tiles(tiles[is_median], p.kernel[sel][is_median], b, halo)
    out = _to_blocks(x, b, 0)  # (nb, C, b, b), a copy
    out[sel] = y
    return _from_blocks(out, h, w)


def _take(p: _BlockParams, sel: Tensor) -> _BlockParams:
    return _BlockParams(*(getattr(p, f)[sel] for f in p.__dataclass_fields__))


def _degrade(x: Tensor, op: Tensor, hit: Tensor, b: int, p: _BlockParams, kmax: int,
             g: torch.Generator) -> Tensor:
    """x with every hit block (hit: (nb,) bool) degraded by its op (op: (nb,) index into OPS)."""
    _, h, w = x.shape
    gh, gw = -(-h // b), -(-w // b)

    def px(v: Tensor) -> Tensor:  # (nb,) per-block value -> (1, H, W)
        return v.reshape(gh, gw).repeat_interleave(b, 0).repeat_interleave(b, 1)[None, :h, :w]

    op = torch.where(hit, op, -1)  # -1: keep clean
    op_px = px(op)
    out = torch.where(op_px == OPS.index("mask"), torch.rand(x.shape, generator=g), x)  # uniform noise
    blur_sel = (op == OPS.index("blur")).nonzero().flatten()
    if len(blur_sel):
        out = torch.where(op_px == OPS.index("blur"), _blur(x, b, p, blur_sel, kmax), out)
    if (op == OPS.index("noise")).any():
        gauss = x + torch.randn(x.shape, generator=g) * px(p.noise_sigma)
        u = torch.rand((1, h, w), generator=g)  # salt and pepper hits all channels of a pixel
        prob = px(p.sp_prob)
        sp = torch.where(u < prob / 2, 0.0, torch.where(u > 1 - prob / 2, 1.0, x))
        noisy = torch.where(px(p.noise_kind) == NOISES.index("gaussian"), gauss, sp)
        out = torch.where(op_px == OPS.index("noise"), noisy, out)
    return out.clamp(0.0, 1.0)


def m3_views(clean: Tensor, cfg: M3Config, g: torch.Generator) -> M3Result:
    """Two degraded views of `clean` (3, H, W) in [0, 1] from generator `g`."""
    if clean.ndim != 3:
        raise ValueError(f"m3 expects one (C, H, W) image, got shape {tuple(clean.shape)}")
    clean = clean.float()
    _, h, w = clean.shape
    sizes = torch.tensor(cfg.block_sizes)
    b = int(sizes[torch.randint(len(sizes), (1,), generator=g)])
    gh, gw = -(-h // b), -(-w // b)
    nb = gh * gw
    op = _categorical(cfg.ops, OPS, nb, g)  # (nb,)
    who = torch.randint(2, (nb,), generator=g)  # VIEW1 or VIEW2, 50/50
    n_both = round(cfg.both_fraction * nb)
    who[torch.randperm(nb, generator=g)[:n_both]] = BOTH
    kmax = max(cfg.blur_kernels)
    views = []
    for v in (VIEW1, VIEW2):
        # each view draws its own parameters and noise: same op kind, independent strength
        params = _draw_params(cfg, nb, g)
        views.append(_degrade(clean, op, (who == v) | (who == BOTH), b, params, kmax, g))
    return M3Result(views[0], views[1], clean, b, op.reshape(gh, gw), who.reshape(gh, gw))


def m3_pair(clean: Tensor, cfg: M3Config | None = None, *, seed: int = 0, key: str = "") -> M3Result:
    """Reproducible M3 pair: the same (seed, key) always gives the same views."""
    return m3_views(clean, cfg or M3Config(), make_generator(seed, key))
