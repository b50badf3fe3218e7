"""Code shared by the benchmarks' child processes (run by another Python, e.g. the original
OmniGen's venv, so it travels as source text): peak-memory probes from /proc."""

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
