"""`ditfuse.pipeline.FusionPipeline` as a library: arrays in, arrays out, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from ditfuse.interop.pairs import make_prompt
from ditfuse.pipeline import FusionPipeline
from ditfuse.sampling.sampler import SamplerSettings


@pytest.fixture(scope="module")
def pipe() -> FusionPipeline:
    sampler = SamplerSettings(steps=2, guidance_scale=1.0, img_guidance_scale=1.0)
    return FusionPipeline.load(preset="tiny", device="cpu", max_side=32, sampler=sampler, warn=lambda m: None)


def _pair(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2))


def test_fuse_batch_returns_arrays_in_order_equal_to_one_by_one(pipe):
    pairs = [_pair(24, 32, 0), _pair(16, 16, 1), _pair(24, 32, 2)]  # two padded sizes
    prompts = [make_prompt("ivif"), make_prompt("mff"), make_prompt("mef")]
    fused = pipe.fuse_batch(pairs, prompts, seeds=[0, 1, 2], batch_size=2)
    assert [f.shape for f in fused] == [(24, 32, 3), (16, 16, 3), (24, 32, 3)]
    assert all(f.dtype == np.uint8 for f in fused) and not np.array_equal(fused[0], fused[2])  # order matters
    for (a, b), p, s, f in zip(pairs, prompts, [0, 1, 2], fused):
        np.testing.assert_array_equal(pipe.fuse(a, b, p, seed=s), f)


def test_fuse_batch_checks_its_lengths(pipe):
    with pytest.raises(ValueError, match="2 pairs need as many prompts and seeds"):
        pipe.fuse_batch([_pair(16, 16, 0)] * 2, [make_prompt("ivif")])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pipe.fuse_batch([_pair(16, 16, 0)], make_prompt("ivif"), batch_size=0)
