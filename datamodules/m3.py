"""M3 (multi-degradation masked-image modelling): two degraded views of one clean image.

Pure torch, no Lightning. The image is tiled with square blocks of one size drawn per sample;
every block gets one operation (mask / blur / noise) and is degraded in exactly one view (50/50),
except a configured fraction of blocks that is degraded in both views with the same kind of
operation (official make_M3_data.py: 1/4). Per-block choices are drawn as tensors from a
generator seeded by (seed, key), so a pair is reproducible. See ../shared/docs/SHARDS.md.

Vectorised in tile space: the image becomes (nb, C, b, b) tiles; each op runs once on all the
tiles that need it (masking and noise as batched random tensors, Gaussian/box blur as one grouped
separable convolution with a kernel per tile, median as a separable min/max network per kernel
size), and the tiles fold back. Undegraded tiles are copied untouched, so outside blocks degraded
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


def _pad(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Pad (C, H, W) by edge reflection (replicate where the image is too small to reflect).

    Reflection is ~20x faster than replicate padding in torch on CPU; the pad only feeds blur
    context and the cropped-away part of edge tiles, so either is fine."""
    if not (left or right or top or bottom):
        return x
    small = max(left, right) >= x.shape[2] or max(top, bottom) >= x.shape[1]
    return F.pad(x[None], (left, right, top, bottom), mode="replicate" if small else "reflect")[0]


def _grid(x: Tensor, b: int) -> Tensor:
    """(C, gh*b, gw*b) contiguous -> (gh, gw, C, b, b) view (no copy): [r, c] is block (r, c)."""
    c, hh, ww = x.shape
    return x.view(c, hh // b, b, ww // b, b).permute(1, 3, 0, 2, 4)


def _padded_for_halo(x: Tensor, b: int, halo: int) -> Tensor:
    """x (a whole grid of b-blocks) padded by `halo` context pixels on every side."""
    return _pad(x, halo, halo, halo, halo)


def _haloed_tiles(padded: Tensor, b: int, halo: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Blocks (rows, cols) of the padded grid with `halo` context pixels -> (n, C, b+2h, b+2h).

    Unfold is a view of the padded image; only the requested tiles are copied."""
    t = b + 2 * halo
    view = padded.unfold(1, t, b).unfold(2, t, b).permute(1, 2, 0, 3, 4)  # (gh, gw, C, t, t), no copy
    return view[rows, cols]


def _linear_kernels(p: _BlockParams, k: int) -> Tensor:
    """(n, k) 1-D kernels of width k: Gaussian (per-tile sigma) or box."""
    x = torch.arange(-(k // 2), k // 2 + 1, dtype=torch.float32)[None]  # (1, k)
    gauss = torch.exp(-0.5 * (x / p.sigma[:, None]) ** 2)
    is_box = (p.blur_kind == BLURS.index("box"))[:, None]
    kern = torch.where(is_box, torch.ones_like(gauss), gauss)
    return kern / kern.sum(1, keepdim=True)


def _separable_filter(tiles: Tensor, kern: Tensor, b: int, halo: int) -> Tensor:
    """Per-tile separable filter: tiles (n, C, b+2h, b+2h), kern (n, k) -> (n, C, b, b).

    k shifted multiply-adds per pass; a grouped conv2d with one group per tile was slower on CPU."""
    n, k = kern.shape
    o = halo - k // 2
    sub = tiles[:, :, o:o + b + k - 1, o:o + b + k - 1]  # (n, C, b+k-1, b+k-1)
    wts = kern.view(n, 1, 1, 1, k)
    rows = sum(sub[..., i:i + b] * wts[..., i] for i in range(k))  # (n, C, b+k-1, b)
    return sum(rows[..., i:i + b, :] * wts[..., i] for i in range(k))  # type: ignore[return-value]


def _median_of(slices: list[Tensor]) -> Tensor:
    """Elementwise median of k same-shape tensors (k odd): odd-even transposition sort with
    min/max, k*(k-1)/2 compare-exchanges of whole tensors (k <= 11 here). Many times faster on
    CPU than `Tensor.median` over a small unfolded dimension."""
    s, k = list(slices), len(slices)
    for rnd in range(k):
        for i in range(rnd % 2, k - 1, 2):
            s[i], s[i + 1] = torch.minimum(s[i], s[i + 1]), torch.maximum(s[i], s[i + 1])
    return s[k // 2]


def _median_filter(tiles: Tensor, k: int, b: int, halo: int) -> Tensor:
    """Separable k-median of tiles (n, C, b+2h, b+2h) -> (n, C, b, b).

    Rows first, then columns: the usual fast stand-in for a k x k median (same removal of
    impulses and flattening of texture) at 2k instead of k*k values per pixel; an exact k x k
    median cost ~20x more here and dominated the whole M3 pair.
    """
    o = halo - k // 2
    sub = tiles[:, :, o:o + b + k - 1, o:o + b + k - 1]  # (n, C, b+k-1, b+k-1)
    rows = _median_of([sub[..., i:i + b] for i in range(k)])  # (n, C, b+k-1, b)
    return _median_of([rows[..., i:i + b, :] for i in range(k)])  # (n, C, b, b)


def _blur_tiles(tiles: Tensor, p: _BlockParams, b: int, halo: int) -> Tensor:
    """Blur haloed tiles (n, C, b+2h, b+2h), each with its own filter -> (n, C, b, b).

    One pass per (kernel size, linear or median) group: at most 2 * len(blur_kernels)."""
    out = torch.empty(*tiles.shape[:2], b, b, dtype=tiles.dtype)
    median = p.blur_kind == BLURS.index("median")
    for k in p.kernel.unique().tolist():
        for is_median in (False, True):
            idx = ((p.kernel == k) & (median == is_median)).nonzero().flatten()
            if not len(idx):
                continue
            if is_median:
                out[idx] = _median_filter(tiles[idx], k, b, halo)
            else:
                out[idx] = _separable_filter(tiles[idx], _linear_kernels(_take(p, idx), k), b, halo)
    return out


def _noise_tiles(tiles: Tensor, p: _BlockParams, g: torch.Generator) -> Tensor:
    """Gaussian or salt-and-pepper noise per tile, (n, C, b, b) in [0, 1]."""
    _, c, b, _ = tiles.shape
    out = tiles.clone()
    gauss = (p.noise_kind == NOISES.index("gaussian")).nonzero().flatten()
    if len(gauss):
        sigma = p.noise_sigma[gauss].view(-1, 1, 1, 1)
        out[gauss] = (tiles[gauss] + torch.randn((len(gauss), c, b, b), generator=g) * sigma).clamp(0.0, 1.0)
    sp = (p.noise_kind == NOISES.index("salt_pepper")).nonzero().flatten()
    if len(sp):
        u = torch.rand((len(sp), 1, b, b), generator=g)  # salt and pepper hits all channels of a pixel
        prob = p.sp_prob[sp].view(-1, 1, 1, 1)
        out[sp] = torch.where(u < prob / 2, 0.0, torch.where(u > 1 - prob / 2, 1.0, tiles[sp]))
    return out


def _take(p: _BlockParams, sel: Tensor) -> _BlockParams:
    return _BlockParams(*(getattr(p, f)[sel] for f in p.__dataclass_fields__))


def _degrade_both(grid: Tensor, padded: Tensor | None, b: int, op: Tensor, hit: Tensor, p: _BlockParams,
                  halo: int, g: torch.Generator) -> Tensor:
    """Both views at once: (2, C, H', W') copies of the grid-sized clean image with every hit
    block degraded by its op.

    op (nb,), hit (2, nb), p over 2*nb (view-major). The two views are one batch, so each op runs
    once on all the blocks of both views that need it; blocks are gathered and scattered through
    (gh, gw, C, b, b) views, and untouched blocks stay bit-identical."""
    c, hh, ww = grid.shape
    gh, gw = hh // b, ww // b
    nb = gh * gw
    out = grid.expand(2, c, hh, ww).clone()
    src = _grid(grid, b)  # (gh, gw, C, b, b)
    dst = out.view(2, c, gh, b, gw, b).permute(0, 2, 4, 1, 3, 5)  # (2, gh, gw, C, b, b)
    op2 = op.repeat(2)  # (2*nb,)

    def chosen(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx = ((op2 == OPS.index(name)) & hit.flatten()).nonzero().flatten()
        blk = idx % nb
        return idx, idx // nb, blk // gw, blk % gw

    idx, v, r, cc = chosen("mask")
    if len(idx):
        dst[v, r, cc] = torch.rand((len(idx), c, b, b), generator=g)  # uniform random noise
    idx, v, r, cc = chosen("blur")
    if len(idx):
        dst[v, r, cc] = _blur_tiles(_haloed_tiles(padded, b, halo, r, cc), _take(p, idx), b, halo)  # type: ignore[arg-type]
    idx, v, r, cc = chosen("noise")
    if len(idx):
        dst[v, r, cc] = _noise_tiles(src[r, cc], _take(p, idx), g)
    return out


def m3_views(clean: Tensor, cfg: M3Config, g: torch.Generator) -> M3Result:
    """Two degraded views of `clean` (3, H, W) in [0, 1] from generator `g`."""
    if clean.ndim != 3:
        raise ValueError(f"m3 expects one (C, H, W) image, got shape {tuple(clean.shape)}")
    clean = clean.float().contiguous()
    _, h, w = clean.shape
    # blocks larger than the image would make one whole-image block: draw among those that fit
    sizes = torch.tensor([b for b in cfg.block_sizes if b <= min(h, w)] or [min(cfg.block_sizes)])
    b = int(sizes[torch.randint(len(sizes), (1,), generator=g)])
    gh, gw = -(-h // b), -(-w // b)
    nb = gh * gw
    op = _categorical(cfg.ops, OPS, nb, g)  # (nb,) row-major over the (gh, gw) grid
    who = torch.randint(2, (nb,), generator=g)  # VIEW1 or VIEW2, 50/50
    n_both = round(cfg.both_fraction * nb)
    who[torch.randperm(nb, generator=g)[:n_both]] = BOTH
    hit = torch.stack(((who == VIEW1) | (who == BOTH), (who == VIEW2) | (who == BOTH)))  # (2, nb)
    # each view draws its own parameters and noise: same op kind, independent strength
    params = _draw_params(cfg, 2 * nb, g)
    halo = max(cfg.blur_kernels) // 2
    grid = _pad(clean, 0, gw * b - w, 0, gh * b - h).contiguous()  # whole blocks; cropped back below
    padded = _padded_for_halo(grid, b, halo) if (op == OPS.index("blur")).any() else None
    out = _degrade_both(grid, padded, b, op, hit, params, halo, g)[:, :, :h, :w]
    return M3Result(out[0], out[1], clean, b, op.reshape(gh, gw), who.reshape(gh, gw))


def m3_pair(clean: Tensor, cfg: M3Config | None = None, *, seed: int = 0, key: str = "") -> M3Result:
    """Reproducible M3 pair: the same (seed, key) always gives the same views."""
    return m3_views(clean, cfg or M3Config(), make_generator(seed, key))
