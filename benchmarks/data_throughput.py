"""Data throughput: the mixed training stream at 512x512 (local and loopback-http shards), pass
coverage, and M3 pairs/s against a per-block loop.

    python benchmarks/data_throughput.py [--workers 2] [--batches 30] [--pairs 20] [--skip-m3]

1. Mixed stream: demo-style shards with 576 px images (built in a temporary folder), default ratios
   and M3 settings, `DiTFuseDataModule(image_size=512, num_workers=2)`; samples/s after the first
   batch (worker start-up excluded), once from the local files and once from the same files
   served by a loopback `http.server` (read through webdataset's curl opener). Floor from issue 2:
   >= 10 samples/s on a 2-core machine.
2. Coverage (issue 9's layout): 4 M3 shards x 200 samples, 2 ranks x 1 worker, 25 batches of 8 per
   rank per epoch: the share of the 800 samples seen after 1, 2 and 3 epochs, and repeats.
3. M3: `datamodules.m3.m3_pair` (vectorised torch) vs a per-block loop with OpenCV ops written the
   way the official make_M3_data.py does it (Python loop over blocks, cv2 filter per block), both
   single-threaded as in a DataLoader worker, same block sizes and op mix, at 512 and 1024 px.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from datamodules import DiTFuseDataModule
from datamodules.demo import build_demo, demo_shards
from datamodules.io import float01
from datamodules.m3 import M3Config, m3_pair


# ---------------------------------------------------------------------------------------------
# baseline: per-block loop with OpenCV, in the style of the official make_M3_data.py
# ---------------------------------------------------------------------------------------------
def _degrade_block(block: np.ndarray, op: str, rng: np.random.Generator) -> np.ndarray:
    if op == "mask":
        return rng.integers(0, 256, block.shape, dtype=np.uint8)
    if op == "blur":
        k = int(rng.choice([3, 5, 7, 9, 11]))
        kind = rng.choice(["gaussian", "box", "median"])
        if kind == "gaussian":
            return cv2.GaussianBlur(block, (k, k), float(rng.uniform(0.8, 3.0)))
        if kind == "box":
            return cv2.blur(block, (k, k))
        return cv2.medianBlur(block, k)
    if rng.random() < 0.5:
        noisy = block.astype(np.float32) + rng.normal(0, rng.uniform(10, 35), block.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    out = block.copy()
    p = rng.uniform(0.01, 0.03)
    u = rng.random(block.shape[:2])
    out[u < p / 2] = 0
    out[u > 1 - p / 2] = 255
    return out


def m3_loop_baseline(img: np.ndarray, rng: np.random.Generator, block_sizes=(16, 32, 64),
                     both_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """img (H, W, 3) uint8 -> two views; one Python iteration and cv2 call(s) per block."""
    b = int(rng.choice(block_sizes))
    h, w = img.shape[:2]
    v1, v2 = img.copy(), img.copy()
    for y in range(0, h, b):
        for x in range(0, w, b):
            op = rng.choice(["mask", "blur", "noise"])
            block = img[y:y + b, x:x + b]
            if rng.random() < both_fraction:
                v1[y:y + b, x:x + b] = _degrade_block(block, op, rng)
                v2[y:y + b, x:x + b] = _degrade_block(block, op, rng)
            elif rng.random() < 0.5:
                v1[y:y + b, x:x + b] = _degrade_block(block, op, rng)
            else:
                v2[y:y + b, x:x + b] = _degrade_block(block, op, rng)
    return v1, v2


# ---------------------------------------------------------------------------------------------
def bench_m3(size: int, pairs: int, block_sizes: tuple[int, ...] = (16, 32, 64)
             ) -> tuple[float, float, float]:
    """(ours, loop, loop without float conversion) pairs/s on a photograph.

    Both sides go from the same uint8 photo to what the training pipeline consumes: two float
    views in [0, 1]. Ours converts the photo first and degrades in float; the loop degrades in
    uint8 and its two views are converted after. The loop's uint8-only time is reported too. The
    sides alternate pair by pair, so load from other processes on a shared machine hits both alike.
    """
    from skimage import data

    photo = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_CUBIC)
    cfg = M3Config(block_sizes=block_sizes)
    rng = np.random.default_rng(0)
    to_float = lambda im: float01(torch.from_numpy(im).permute(2, 0, 1))  # noqa: E731
    t_ours = t_loop = t_conv = 0.0
    for i in range(pairs + 1):
        t0 = time.perf_counter()
        m3_pair(to_float(photo), cfg, seed=0, key=str(i))
        t1 = time.perf_counter()
        v1, v2 = m3_loop_baseline(photo, rng, block_sizes)
        t2 = time.perf_counter()
        to_float(v1), to_float(v2)
        t3 = time.perf_counter()
        if i:  # the first round is warm-up
            t_ours, t_loop, t_conv = t_ours + t1 - t0, t_loop + t2 - t1, t_conv + t3 - t2
    return pairs / t_ours, pairs / (t_loop + t_conv), pairs / t_loop


def bench_stream(shards: dict[str, str], workers: int, batches: int, batch_size: int) -> float:
    dm = DiTFuseDataModule(shards=shards, image_size=512, batch_size=batch_size, num_workers=workers,
                           batches_per_epoch=batches + 1)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up and first shard reads
    t = time.perf_counter()
    n = sum(len(b["kind"]) for b in it)
    rate = n / (time.perf_counter() - t)
    print(f"  realized mix over {sum(dm.mix_counts.values())} samples: "
          + ", ".join(f"{k}={v:.2f}" for k, v in dm.mix_shares().items()))
    return rate


def bench_coverage(root: Path) -> None:
    """Issue 9's measurement on main: 2 epochs covered 73.5% of the 800 samples, 3 epochs 76.9%."""
    from datamodules.io import encode_png
    from datamodules.writers import json_bytes, write_samples

    rng = np.random.default_rng(0)
    write_samples("m3", ((f"m3_{i:04d}", {"img.png": encode_png(rng.integers(0, 256, (16, 16, 3), np.uint8)),
                                          "json": json_bytes({})}) for i in range(800)), root, 200)
    dms = [DiTFuseDataModule(shards={"m3": str(root)}, ratios={"m3": 1}, image_size=16, m3_block_sizes=[4],
                             batch_size=8, num_workers=1, batches_per_epoch=25, rank=r, world_size=2) for r in (0, 1)]
    for dm in dms:
        dm.setup("fit")
    loaders = [dm.train_dataloader() for dm in dms]
    seen: Counter[str] = Counter()
    for epoch in range(1, 4):
        for loader in loaders:
            seen.update(k for b in loader for k in b["key"])
        repeats = sum(v - 1 for v in seen.values())
        print(f"  coverage after {epoch} epoch(s) ({epoch * 400} draws): {len(seen)}/800 = {len(seen) / 8:.1f}% "
              f"of the samples, {repeats} repeated draws")


def serve(root: Path) -> tuple[str, ThreadingHTTPServer]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--skip-m3", action="store_true", help="only the stream and coverage parts")
    a = ap.parse_args()
    warnings.simplefilter("ignore")  # "no validation data": this measures training reads only
    torch.set_num_threads(1)  # as in a DataLoader worker
    cv2.setNumThreads(1)
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {torch.get_num_threads()} thread(s)")
    for size in () if a.skip_m3 else (512, 1024):
        n = a.pairs if size == 512 else max(1, a.pairs // 4)
        ours, base, raw = bench_m3(size, n)
        print(f"M3 {size}x{size} (blocks 16/32/64 drawn per pair), uint8 photo -> two float views: "
              f"vectorised torch {ours:6.2f} pairs/s | per-block OpenCV loop {base:6.2f} pairs/s | "
              f"ratio {ours / base:.2f}x  (loop without its float conversion: {raw:6.2f} pairs/s, "
              f"ratio {ours / raw:.2f}x)")
        if size == 512:
            for b in (16, 32, 64):
                o, bl, r = bench_m3(size, max(2, n // 3), (b,))
                print(f"    block {b:>2} px only: torch {o:6.2f} | loop {bl:6.2f} pairs/s | ratio {o / bl:.2f}x"
                      f"  (uint8-only loop ratio {o / r:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        bench_coverage(Path(tmp) / "coverage")
        t = time.perf_counter()
        build_demo(tmp, crop=576, scale=0.1)
        print(f"built 576 px shards in {time.perf_counter() - t:.1f} s")
        local = demo_shards(tmp)
        url, server = serve(Path(tmp))
        remote = {k: [f"{url}/train/{k}/{p.name}" for p in sorted((Path(tmp) / "train" / k).glob("*.tar"))]
                  for k in local}
        for name, shards in (("local files", local), ("loopback http", remote)):
            rate = bench_stream(shards, a.workers, a.batches, a.batch_size)
            print(f"mixed stream 512x512, {a.workers} workers, batch {a.batch_size}, {name}: {rate:.1f} samples/s "
                  f"(floor 10)")
        server.shutdown()


if __name__ == "__main__":
    main()
