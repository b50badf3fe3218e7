"""M3 (multi-degradation masked-image modelling): two degraded views of one clean image.

Pure torch, no Lightning. The image is tiled with square blocks of one size drawn per sample;
every block gets one operation (mask / blur / noise) and is degraded in exactly one view (50/50),
except a configured fraction of blocks that is degraded in both views with the same kind of
operation (official make_M3_data.py: 1/4). Per-block choices are drawn as tensors from a
generator seeded by (seed, key), so a pair is reproducible. See docs/SHARDS.md.

Vectorised over blocks: each op runs once on all the blocks of both views that need it (masking
and noise as batched random tensors, Gaussian/box blur as one separable filter with a kernel per
block, median as a separable min/max network), reading only those blocks (plus a mirrored halo
for blur) and copying the results into one output buffer per pair. Undegraded blocks are copied
untouched, so outside blocks degraded in both views the clean image is exactly recoverable from
the undegraded view.
"""

from __future__ import annotations

import functools
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

    Reflection is ~20x faster than replicate padding in torch on CPU; the pad only fills the
    cropped-away part of edge blocks (and, mirrored the same way by _gather_haloed, blur context),
    so either is fine."""
    if not (left or right or top or bottom):
        return x
    small = max(left, right) >= x.shape[2] or max(top, bottom) >= x.shape[1]
    return F.pad(x[None], (left, right, top, bottom), mode="replicate" if small else "reflect")[0]


def _block_rows(shape: torch.Size, b: int, v: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Where blocks (v, r, c) of a contiguous (V, C, gh*b, gw*b) tensor lie when it is seen as
    (-1, b) rows of b pixels: (n*C*b,) row indices in (block, channel, y) order, so index_select /
    index_copy_ with them move (n, C, b, b) blocks as one memcpy of b pixels per row (several
    times faster on CPU than advanced indexing of a permuted block view)."""
    _, ch, hh, ww = shape
    y = torch.arange(ch)[:, None] * hh + torch.arange(b)  # (C, b) image row of each block row
    top = (v * ch * hh + r * b)[:, None, None]  # (n, 1, 1)
    return ((top + y) * (ww // b) + c[:, None, None]).flatten()


def _reflect(i: Tensor, n: int, small: bool) -> Tensor:
    """Pixel indices mirrored into [0, n) as reflect padding does (clamped where the image is
    too small to reflect, as in _pad)."""
    if small:
        return i.clamp(0, n - 1)
    i = i.abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def _gather_haloed(img: Tensor, b: int, halo: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Blocks (rows, cols) of a contiguous (C, H, W) image with `halo` context pixels on every
    side, mirrored at the image edge like _pad: (n, C, b+2h, b+2h), read with one index_select
    (no padded copy of the whole image)."""
    c, hh, ww = img.shape
    small = halo >= min(hh, ww)
    ar = torch.arange(-halo, b + halo)
    ys = _reflect(rows[:, None] * b + ar, hh, small)  # (n, t)
    xs = _reflect(cols[:, None] * b + ar, ww, small)
    idx = ys[:, :, None] * ww + xs[:, None, :]  # (n, t, t) flat pixel offsets
    t = len(ar)
    return img.reshape(c, -1).index_select(1, idx.flatten()).view(c, len(rows), t, t).transpose(0, 1)


def _linear_kernels(p: _BlockParams, width: int) -> Tensor:
    """(n, width) 1-D kernels: Gaussian (per-tile sigma) or box, each zero outside its own kernel
    size, so tiles of every size share one filter pass."""
    x = torch.arange(-(width // 2), width // 2 + 1, dtype=torch.float32)[None]  # (1, width)
    inside = x.abs() <= (p.kernel[:, None] // 2)
    gauss = torch.exp(-0.5 * (x / p.sigma[:, None]) ** 2)
    is_box = (p.blur_kind == BLURS.index("box"))[:, None]
    kern = torch.where(is_box, 1.0, gauss) * inside
    return kern / kern.sum(1, keepdim=True)


def _separable_filter(tiles: Tensor, kern: Tensor, b: int, halo: int) -> Tensor:
    """Per-tile separable filter: tiles (n, C, b+2h, b+2h), kern (n, k) -> (n, C, b, b).

    k shifted multiply-adds per pass; a grouped conv2d with one group per tile was slower on CPU."""
    n, k = kern.shape
    o = halo - k // 2
    sub = tiles[:, :, o:o + b + k - 1, o:o + b + k - 1]  # (n, C, b+k-1, b+k-1)
    wts = kern.view(n, 1, 1, 1, k)
    rows = sub[..., 0:b] * wts[..., 0]  # (n, C, b+k-1, b), accumulated in place
    for i in range(1, k):
        rows.addcmul_(sub[..., i:i + b], wts[..., i])
    out = rows[..., 0:b, :] * wts[..., 0]  # (n, C, b, b)
    for i in range(1, k):
        out.addcmul_(rows[..., i:i + b, :], wts[..., i])
    return out


@functools.cache
def _median_rounds(k: int) -> tuple[tuple[int, int, int], ...]:
    """An odd-even transposition sort of k wires as rounds (parity, lo, hi): round parity p
    compare-exchanges wires (p+2j, p+2j+1) for j in [lo, hi). Pruned to the pairs the middle wire
    depends on (walking the network backwards from wire k//2); they stay contiguous in j."""
    needed, rounds = {k // 2}, []
    for rnd in reversed(range(k)):
        par = rnd % 2
        js = [j for j in range((k - par) // 2) if {par + 2 * j, par + 2 * j + 1} & needed]
        if js:
            needed |= {w for j in js for w in (par + 2 * j, par + 2 * j + 1)}
            rounds.append((par, js[0], js[-1] + 1))
    return tuple(reversed(rounds))


def _median_of(wires: Tensor) -> Tensor:
    """Median along dim 0 of wires (k, ...) (k odd), sorting in place with a min/max network.

    A round's compare-exchanges are disjoint, so each round is three whole-tensor calls on the
    even / odd wire views: ~3k calls instead of ~k*k/2 for a pair at a time, and many times faster
    on CPU than `Tensor.median` over a small unfolded dimension."""
    even, odd = wires[0::2], wires[1::2]
    for par, lo, hi in _median_rounds(len(wires)):
        # pair j is (even[j], odd[j]) in even rounds, (odd[j], even[j+1]) in odd ones
        a, b = (even[lo:hi], odd[lo:hi]) if par == 0 else (odd[lo:hi], even[lo + 1:hi + 1])
        small = torch.minimum(a, b)
        torch.maximum(a, b, out=b)
        a.copy_(small)
    return wires[len(wires) // 2]


def _median_filter(tiles: Tensor, kernel: Tensor, b: int, halo: int) -> Tensor:
    """Separable median of tiles (n, C, b+2h, b+2h), each with its own odd size k -> (n, C, b, b).

    Rows first, then columns: the usual fast stand-in for a k x k median (same removal of
    impulses and flattening of texture) at 2k instead of k*k values per pixel; an exact k x k
    median cost ~20x more here and dominated the whole M3 pair. All sizes share one network of
    width 2h+1: a tile's taps beyond its own k//2 become as many 0s (left) as 255s (right), which
    leaves a median of values in [0, 255] unchanged.
    """
    # on 8-bit levels: exact for 8-bit sources, and uint8 min/max move 4x less memory
    sub = (tiles * 255).round_().to(torch.uint8)
    d = torch.arange(-halo, halo + 1)[:, None]  # (2h+1, 1) tap offsets
    beyond = (kernel // 2)[None] < d.abs()  # (2h+1, n)
    shape = (2 * halo + 1, len(kernel), 1, 1, 1)
    low = torch.where(beyond, 255, 0).to(torch.uint8).view(shape)  # right sentinels: 255
    high = torch.where(beyond, 0, 255).to(torch.uint8).view(shape)  # left sentinels: 0

    def median_along(x: Tensor, dim: int) -> Tensor:
        taps = x.unfold(dim, 2 * halo + 1, 1).movedim(-1, 0)  # (2h+1, n, C, ., .) view
        wires = taps.contiguous()  # (2h+1, n, C, ., .): each wire a contiguous slice
        torch.minimum(wires[:halo], high[:halo], out=wires[:halo])  # sentinels, in place
        torch.maximum(wires[halo + 1:], low[halo + 1:], out=wires[halo + 1:])
        return _median_of(wires)

    return median_along(median_along(sub, 3), 2).float().mul_(1 / 255)  # rows, then columns


def _blur_tiles(tiles: Tensor, p: _BlockParams, b: int, halo: int) -> Tensor:
    """Blur haloed tiles (n, C, b+2h, b+2h), each with its own filter -> (n, C, b, b).

    Two passes in all: the Gaussian/box tiles together, the median tiles together."""
    out = torch.empty(*tiles.shape[:2], b, b, dtype=tiles.dtype)
    median = p.blur_kind == BLURS.index("median")
    lin, med = (~median).nonzero().flatten(), median.nonzero().flatten()
    if len(lin):
        kern = _linear_kernels(_take(p, lin), 2 * halo + 1)
        out.index_copy_(0, lin, _separable_filter(tiles.index_select(0, lin), kern, b, halo))
    if len(med):
        out.index_copy_(0, med, _median_filter(tiles.index_select(0, med), p.kernel[med], b, halo))
    return out


def _noisy(x: Tensor, p: _BlockParams, g: torch.Generator) -> Tensor:
    """Noisy copies of clean tiles x (n, C, b, b): Gaussian or salt-and-pepper per tile."""
    n, c, b, _ = x.shape
    out = torch.empty_like(x)
    gauss = p.noise_kind == NOISES.index("gaussian")
    at, sp = gauss.nonzero().flatten(), (~gauss).nonzero().flatten()
    if len(at):
        noise = torch.randn((len(at), c, b, b), generator=g).mul_(p.noise_sigma[at].view(-1, 1, 1, 1))
        out.index_copy_(0, at, noise.add_(x.index_select(0, at)).clamp_(0.0, 1.0))
    if len(sp):
        u = torch.rand((len(sp), 1, b, b), generator=g)  # salt and pepper hits all channels of a pixel
        prob = p.sp_prob[sp].view(-1, 1, 1, 1)
        out.index_copy_(0, sp, torch.where(u < prob / 2, 0.0, torch.where(u > 1 - prob / 2, 1.0, x.index_select(0, sp))))
    return out


def _take(p: _BlockParams, sel: Tensor) -> _BlockParams:
    return _BlockParams(*(getattr(p, f)[sel] for f in p.__dataclass_fields__))


def _degrade_both(grid: Tensor, b: int, op: Tensor, hit: Tensor, p: _BlockParams, halo: int,
                  g: torch.Generator) -> Tensor:
    """Both views at once: (2, C, H', W') copies of the grid-sized clean image with every hit
    block degraded by its op.

    op (nb,), hit (2, nb), p over 2*nb (view-major). The two views are one batch, so each op runs
    once on all the blocks of both views that need it. Only those blocks are gathered (with their
    halo for blur) and processed; results are copied into the one output buffer, and untouched
    blocks stay bit-identical. Full-image temporaries are avoided on purpose: on CPU each fresh
    image-sized buffer costs its page faults, more than the degradations of 32/64 px blocks."""
    c, hh, ww = grid.shape
    gw = ww // b
    nb = (hh // b) * gw
    out = torch.cat((grid, grid)).view(2, c, hh, ww)
    rows_of_out = out.view(-1, b)  # (2*C*H'*gw, b): rows of b pixels, see _block_rows
    op2 = op.repeat(2)  # (2*nb,)

    def chosen(name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Slots (view-major block indices) that get op `name`: index into p, view, row, col."""
        idx = ((op2 == OPS.index(name)) & hit.flatten()).nonzero().flatten()
        blk = idx % nb
        return idx, idx // nb, blk // gw, blk % gw

    def put(v: Tensor, r: Tensor, cc: Tensor, blocks: Tensor) -> None:
        rows_of_out.index_copy_(0, _block_rows(out.shape, b, v, r, cc), blocks.reshape(-1, b))

    idx, v, r, cc = chosen("mask")
    if len(idx):
        put(v, r, cc, torch.rand((len(idx), c, b, b), generator=g))  # uniform random noise
    idx, v, r, cc = chosen("blur")
    if len(idx):
        put(v, r, cc, _blur_tiles(_gather_haloed(grid, b, halo, r, cc), _take(p, idx), b, halo))
    idx, v, r, cc = chosen("noise")
    if len(idx):
        rows = _block_rows(out.shape, b, torch.zeros_like(v), r, cc)  # the clean blocks, in view 1's slots
        clean = grid.view(-1, b).index_select(0, rows).view(len(idx), c, b, b)
        put(v, r, cc, _noisy(clean, _take(p, idx), g))
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
    out = _degrade_both(grid, b, op, hit, params, halo, g)[:, :, :h, :w]
    return M3Result(out[0], out[1], clean, b, op.reshape(gh, gw), who.reshape(gh, gw))


def m3_pair(clean: Tensor, cfg: M3Config | None = None, *, seed: int = 0, key: str = "") -> M3Result:
    """Reproducible M3 pair: the same (seed, key) always gives the same views."""
    return m3_views(clean, cfg or M3Config(), make_generator(seed, key))
