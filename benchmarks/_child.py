"""Code shared by the benchmarks' child processes (run by another Python, e.g. the original
OmniGen's venv, so it travels as source text): peak-memory probes from /proc, and the FLOP count
of one call (torch's FlopCounterMode: matmuls, convolutions and attention, forward and backward,
checkpoint recomputes included; elementwise ops are not counted)."""

MEMORY_PROBES = r'''
def status_mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
def rss_mib():  # resident now; and reset the peak (VmHWM), so the peak is the measured work's, not loading's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")
'''

FLOP_COUNT = r'''
def count_flops(fn):  # (fn(), {gflop, gflop_by_op})
    import torch
    from torch.utils import flop_counter as F
    aten = torch.ops.aten
    # torch counts the GPU attention kernels only; the CPU flash kernel does the same work
    def cpu_fwd(q, k, v, *args, out_shape=None, **kwargs):
        return F.sdpa_flop_count(q, k, v)
    def cpu_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return F.sdpa_backward_flop_count(grad_out, q, k, v)
    extra = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_fwd,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_bwd}
    with F.FlopCounterMode(display=False, custom_mapping=extra) as fc:
        out = fn()
    by_op = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[-1] if "." in str(op) else str(op)
        by_op[name] = by_op.get(name, 0.0) + n / 1e9
    return out, {"gflop": fc.get_total_flops() / 1e9, "gflop_by_op": by_op}
'''


def gemm_peak(threads: int, rows: tuple[int, ...] = (771, 3089), hidden: int = 3072, mlp: int = 8192) -> float:
    """This machine's fp32 matmul rate, GFLOP per CPU-second, at `threads`: the best of the OmniGen-v1
    MLP input projection (hidden -> 2*mlp) for `rows` tokens, the op that dominates both codes.
    With a FLOP count it gives the least CPU time any exact fp32 implementation can take."""
    import time

    import torch

    torch.set_num_threads(threads)
    w = torch.randn(2 * mlp, hidden)
    best = 0.0
    for m in rows:
        x = torch.randn(m, hidden)
        torch.nn.functional.linear(x, w)
        c0 = time.process_time()
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        best = max(best, 3 * 2 * m * hidden * 2 * mlp / 1e9 / (time.process_time() - c0))
    return best
