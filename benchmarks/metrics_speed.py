"""Full fusion-metric set per 480x640 pair: ditfuse.eval.metrics vs a plain numpy/scipy implementation.

The plain implementation is tests/_reference_metrics.py: the definitions of METRICS.md written
straightforwardly (2-D convolve2d windows, as the published MMIF-CDDFuse evaluator does; the
issue quotes ~1.4 s per triple for that evaluator on the reference machine). Both run in this
process, interleaved, on the same gray triple, and the ratio of the two medians is reported
from this one run; CPU time is printed next to wall time because the shared runners are busy.

    python benchmarks/metrics_speed.py                  # 1 torch thread (the reference is single-threaded)
    python benchmarks/metrics_speed.py --threads 2 --repeats 7
    python benchmarks/metrics_speed.py --json bench.json  # also write the figures

With a CUDA device present it also times batches of pairs on the GPU (per pair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _reference_metrics as plain  # noqa: E402
from ditfuse.eval.metrics import METRIC_NAMES, compute_fusion_metrics  # noqa: E402


def make_triple(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gray float64 sources and fusion on 0..255 with smooth structure and noise, integer-valued."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ir = 120 + 80 * np.sin(7 * xx) * np.cos(5 * yy) + rng.normal(0, 8, (h, w))
    vis = 60 + 150 * yy + 40 * np.sin(13 * xx + 3 * yy) + rng.normal(0, 12, (h, w))
    fused = np.maximum(ir, vis) * 0.7 + 0.3 * (ir + vis) / 2 + rng.normal(0, 3, (h, w))
    return tuple(np.clip(np.round(x), 0, 255) for x in (ir, vis, fused))


def _time(fn) -> tuple[float, float]:
    """(wall s, this thread's CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def cpu_figures(triple, repeats: int) -> dict:
    a, b, f = triple
    ta, tb, tf = (torch.from_numpy(x)[None, None] for x in triple)
    ours = lambda: compute_fusion_metrics(ta, tb, tf)  # noqa: E731
    ref = lambda: plain.all_metrics(a, b, f)  # noqa: E731
    got, want = ours(), ref()  # warm-up, and the two must agree
    worst = max(abs(float(got[k][0]) - want[k]) / max(abs(want[k]), 1e-12) for k in METRIC_NAMES)
    runs = {"plain": [], "ditfuse": []}
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        runs["plain"].append(_time(ref))
        runs["ditfuse"].append(_time(ours))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    return {
        "plain_wall_s": med["plain"][0], "plain_cpu_s": med["plain"][1],
        "ditfuse_wall_s": med["ditfuse"][0], "ditfuse_cpu_s": med["ditfuse"][1],
        "ratio_wall": med["plain"][0] / med["ditfuse"][0], "ratio_cpu": med["plain"][1] / med["ditfuse"][1],
        "max_rel_diff": worst,
    }


def per_metric_ms(triple, repeats: int) -> dict[str, float]:
    ta, tb, tf = (torch.from_numpy(x)[None, None] for x in triple)
    out = {}
    for name in METRIC_NAMES:
        compute_fusion_metrics(ta, tb, tf, [name])
        out[name] = 1000 * min(_time(lambda: compute_fusion_metrics(ta, tb, tf, [name]))[1] for _ in range(repeats))
    return out


def gpu_figures(triple, batch: int, repeats: int) -> dict:
    dev = torch.device("cuda")
    ta, tb, tf = (torch.from_numpy(x)[None, None].to(dev) for x in triple)
    out = {"device": torch.cuda.get_device_name(dev)}
    for n in (1, batch):
        a, b, f = (x.expand(n, -1, -1, -1).contiguous() for x in (ta, tb, tf))
        compute_fusion_metrics(a, b, f)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compute_fusion_metrics(a, b, f)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"batch{n}_per_pair_ms"] = 1000 * statistics.median(times) / n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, like numpy/scipy here)")
    p.add_argument("--gpu-batch", type=int, default=16)
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    triple = make_triple(args.height, args.width)
    res = {"size": f"{args.height}x{args.width}", "torch": torch.__version__, "threads": args.threads,
           "cpu": cpu_figures(triple, args.repeats), "per_metric_cpu_ms": per_metric_ms(triple, 3)}
    if torch.cuda.is_available() and not args.no_gpu:
        res["gpu"] = gpu_figures(triple, args.gpu_batch, args.repeats)
    c = res["cpu"]
    print(f"full metric set, one {res['size']} pair, torch {res['torch']}, {args.threads} CPU thread(s)")
    print(f"  plain numpy/scipy : {c['plain_wall_s'] * 1e3:8.1f} ms wall  {c['plain_cpu_s'] * 1e3:8.1f} ms CPU")
    print(f"  ditfuse.eval.metrics   : {c['ditfuse_wall_s'] * 1e3:8.1f} ms wall  {c['ditfuse_cpu_s'] * 1e3:8.1f} ms CPU")
    print(f"  speed-up          : {c['ratio_wall']:8.1f} x wall  {c['ratio_cpu']:8.1f} x CPU   "
          f"(medians of {args.repeats}; max rel. diff {c['max_rel_diff']:.1e})")
    print("  per metric (ms CPU): " + ", ".join(f"{k} {v:.1f}" for k, v in res["per_metric_cpu_ms"].items()))
    if "gpu" in res:
        g = res["gpu"]
        print(f"  GPU {g['device']}: {g['batch1_per_pair_ms']:.2f} ms/pair alone, "
              f"{g[f'batch{args.gpu_batch}_per_pair_ms']:.2f} ms/pair in batches of {args.gpu_batch}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
