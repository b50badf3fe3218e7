"""The user's path at the released size (OmniGen-v1, 3.8B), on CPU, measured: not a CI test.

Needs the full-size folder of benchmarks/make_real_size.py (random bf16 weights, release layout).
Each step is the command a user types, run as a child process and sampled every 0.2 s from
/proc/PID/{status,smaps_rollup}: wall time, peak RSS, and its split into private (RssAnon) and
file-backed pages (RssFile: the mmap'd weights, page cache shared with every process mapping the
file), peak PSS (shared pages divided among the processes mapping them).

  1. load     load_transformer(FOLDER, bf16) alone (what every command starts with)
  2. ranks    2 gloo ranks loading FOLDER at once: PSS and RSS summed, MemAvailable's drop
  3. fit      ditfuse fit --config configs/omnigen_lora.yaml --model.pretrained=FOLDER, 2 steps at
              the smallest bucket (--bucket, on the command line), batch 1, CPU, bf16-mixed
  4. resume   the same command with --ckpt_path last --trainer.max_steps=3
  5. fuse     ditfuse fuse of one IVIF pair, 2 steps, with the trained adapter (--checkpoint)
  6. official the same with --official
  7. convert  ditfuse convert export-official of the real-size adapter, and back (`lora`): equal?

  heavy python benchmarks/real_size.py /work/realsize/OmniGen-v1-random --work /work/realsize/run

Prints a markdown table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3
CONFIG = ROOT / "configs" / "omnigen_lora.yaml"

LOAD_CHILD = r'''
import sys, time, torch
t0 = time.perf_counter()
from ditfuse.model.backbone import load_transformer
m = load_transformer(sys.argv[1], torch.bfloat16)
t1 = time.perf_counter()
n = sum(p.numel() for p in m.parameters())
s = sum(float(p.float().sum()) for p in m.parameters())  # touch every page, as a forward does
print(f"LOAD {t1 - t0:.2f} {n} {time.perf_counter() - t1:.2f}")
'''

RANK_CHILD = r'''
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
from ditfuse.model.backbone import load_transformer
m = load_transformer(sys.argv[1], torch.bfloat16)
for p in m.parameters():
    p.float().sum()  # fault every page in, as a forward does
dist.barrier()
def kib(path, key):
    for line in open(path):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
out = {k: kib("/proc/self/status", k) for k in ("VmRSS", "RssAnon", "RssFile")}
out["Pss"] = kib("/proc/self/smaps_rollup", "Pss")
print("RANK " + " ".join(f"{k}={v}" for k, v in out.items()), flush=True)
open(sys.argv[2] + f".{dist.get_rank()}", "w").write("ready")
dist.barrier()  # hold the memory until the parent has read MemAvailable
while not os.path.exists(sys.argv[2] + ".done"):
    time.sleep(0.1)
dist.destroy_process_group()
'''


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    return _kib("/proc/meminfo", "MemAvailable")


class Sampler(threading.Thread):
    """Peaks of a process's RSS / RssAnon / RssFile / PSS while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, dict.fromkeys(("rss", "anon", "file", "pss"), 0), False

    def run(self) -> None:
        status, rollup = f"/proc/{self.pid}/status", f"/proc/{self.pid}/smaps_rollup"
        while not self.stop:
            now = {"rss": _kib(status, "VmRSS"), "anon": _kib(status, "RssAnon"), "file": _kib(status, "RssFile"),
                   "pss": _kib(rollup, "Pss")}
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.2)


def run(name: str, cmd: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run `cmd`, output to `log`; wall time, exit status and memory peaks."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop = True
    wall = time.perf_counter() - t0
    res = {"step": name, "rc": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_gib": round(max(usage.ru_maxrss * 1024, sampler.peak["rss"]) / GIB, 2),
           "peak_anon_gib": round(sampler.peak["anon"] / GIB, 2), "peak_file_gib": round(sampler.peak["file"] / GIB, 2),
           "peak_pss_gib": round(sampler.peak["pss"] / GIB, 2), "log": str(log)}
    print(f"[{name}] rc={proc.returncode} {wall:.0f} s, peak RSS {res['peak_rss_gib']} GiB "
          f"(anon {res['peak_anon_gib']}, file {res['peak_file_gib']}), PSS {res['peak_pss_gib']} GiB", flush=True)
    if proc.returncode != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return res


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    return env


def step_load(folder: Path, work: Path, env: dict) -> dict:
    res = run("load", [sys.executable, "-c", LOAD_CHILD, str(folder)], work / "load.log", env)
    line = next(ln for ln in (work / "load.log").read_text().splitlines() if ln.startswith("LOAD "))
    _, load_s, params, touch_s = line.split()
    return {**res, "load_s": float(load_s), "params": int(params), "touch_s": float(touch_s)}


def step_ranks(folder: Path, work: Path, env: dict, world: int) -> dict:
    """`world` gloo ranks load the folder at once; MemAvailable read while they hold it."""
    flag = work / f"ranks{world}"
    for f in work.glob(f"ranks{world}.*"):
        f.unlink()
    before = mem_available()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-port=29517",
           "--no-python", sys.executable, "-c", RANK_CHILD, str(folder), str(flag)]
    t0 = time.perf_counter()
    with (work / f"ranks{world}.log").open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while sum(1 for r in range(world) if Path(f"{flag}.{r}").exists()) < world and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        held = mem_available()
        Path(f"{flag}.done").write_text("done")
        proc.wait()
    ranks = []
    for ln in (work / f"ranks{world}.log").read_text().splitlines():
        if "RANK " in ln:
            ranks.append({k: int(v) for k, v in (kv.split("=") for kv in ln.split("RANK ", 1)[1].split())})
    res = {"step": f"ranks{world}", "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
           "world": world, "rss_sum_gib": sum(r["VmRSS"] for r in ranks) / GIB,
           "pss_sum_gib": sum(r["Pss"] for r in ranks) / GIB, "anon_sum_gib": sum(r["RssAnon"] for r in ranks) / GIB,
           "memavailable_drop_gib": (before - held) / GIB, "per_rank": ranks}
    print(f"[ranks{world}] rc={proc.returncode} RSS sum {res['rss_sum_gib']:.2f} GiB, PSS sum "
          f"{res['pss_sum_gib']:.2f} GiB, anon sum {res['anon_sum_gib']:.2f} GiB, MemAvailable drop "
          f"{res['memavailable_drop_gib']:.2f} GiB", flush=True)
    return res


def fit_cmd(folder: Path, work: Path, demo: Path, bucket: int, *extra: str) -> list[str]:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # every step: resumable at step 2
         "init_args": {"dirpath": str(work / "ckpt"), "every_n_train_steps": 1, "save_top_k": 0, "save_last": True}},
        {"class_path": "callbacks.progress.StepLog", "init_args": {"every_n_steps": 1}},
        {"class_path": "callbacks.seeding.RankSeed"},
    ]
    return [sys.executable, "-m", "ditfuse.cli", "fit", "--config", str(CONFIG),
            f"--model.pretrained={folder}", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=1", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={work / 'fit'}", f"--trainer.callbacks={json.dumps(callbacks)}",
            "--trainer.log_every_n_steps=1", f"--data.buckets=[[{bucket},{bucket}]]", "--data.batch_size=1",
            "--data.val_batch_size=1", "--data.num_workers=0", f"--data.demo_dir={demo}", "--data.shards={}",
            "--data.val_holdout=0", "--data.val_samples_per_task=1", "--data.shuffle_buffer=4",
            "--data.open_shards=1", "--data.batches_per_epoch=10", "--data.pin_memory=false", *extra]


def checkpoint_facts(ckpt: Path) -> dict:
    import torch

    sd = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {"ckpt_mb": round(ckpt.stat().st_size / 1e6, 1), "global_step": sd.get("global_step"),
            "trainable_params": sum(v.numel() for v in sd["state_dict"].values()),
            "lora": (sd.get("ditfuse") or {}).get("lora")}


def adapter_from_checkpoint(ckpt: Path, out: Path) -> Path:
    """The checkpoint's LoRA tensors as this framework's peft adapter folder (no model built)."""
    import torch

    from ditfuse.interop.convert import save_adapter
    from ditfuse.model.lora import LoraSettings

    sd = torch.load(ckpt, map_location="cpu", weights_only=False)
    tensors = {k.removeprefix("backbone.transformer.").replace(".default.", "."): v
               for k, v in sd["state_dict"].items() if ".lora_" in k}
    cfg = LoraSettings(**sd["ditfuse"]["lora"]).peft_config().to_dict()
    save_adapter(out, tensors, {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()})
    return out


def pair() -> tuple[Path, Path]:
    ivif = ROOT.parent / "shared" / "data" / "ivif" / "TNO"
    if (ivif / "ir" / "01.png").is_file():
        return ivif / "ir" / "01.png", ivif / "vi" / "01.png"
    raise SystemExit(f"no IVIF pair at {ivif}; pass --image1/--image2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--work", type=Path, default=Path("/work/realsize/run"))
    p.add_argument("--bucket", type=int, default=256, help="square training bucket (px), a multiple of 16")
    p.add_argument("--max-side", type=int, default=256, help="fuse size (px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None,
                   help="steps to run (load ranks fit resume fuse official convert)")
    p.add_argument("--image1", type=Path)
    p.add_argument("--image2", type=Path)
    args = p.parse_args(argv)
    steps = set(args.only or ["load", "ranks", "fit", "resume", "fuse", "official", "convert"])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads)
    results: dict[str, dict] = {}
    if "load" in steps:
        results["load"] = step_load(args.folder, work, env)
    if "ranks" in steps:
        results["ranks1"] = step_ranks(args.folder, work, child_env(1), 1)
        results["ranks2"] = step_ranks(args.folder, work, child_env(1), 2)
    demo = work / "demo"
    ckpt = work / "ckpt" / "last.ckpt"
    if "fit" in steps:
        results["fit"] = {**run("fit", fit_cmd(args.folder, work, demo, args.bucket), work / "fit.log", env),
                          **(checkpoint_facts(ckpt) if ckpt.is_file() else {})}
    if "resume" in steps:
        cmd = fit_cmd(args.folder, work, demo, args.bucket, "--ckpt_path", str(ckpt), "--trainer.max_steps=3")
        results["resume"] = {**run("resume", cmd, work / "resume.log", env),
                             **(checkpoint_facts(ckpt) if ckpt.is_file() else {})}
    im1, im2 = (args.image1, args.image2) if args.image1 else pair()
    fuse = [sys.executable, "-m", "ditfuse.cli", "fuse", "--checkpoint", str(ckpt), "--model", str(args.folder),
            "--image1", str(im1), "--image2", str(im2), "--task", "ivif", "--steps", "2",
            "--max-side", str(args.max_side),
            "--device", "cpu", "--no-progress"]
    if "fuse" in steps:
        results["fuse"] = run("fuse", [*fuse, "--dtype", "bf16", "--output", str(work / "fused.png"), "--overwrite"],
                              work / "fuse.log", env)
    if "official" in steps:
        results["official"] = run("official", [*fuse, "--official", "--output", str(work / "fused_official.png"),
                                               "--overwrite"], work / "official.log", env)
    if "convert" in steps:
        results["convert"] = step_convert(ckpt, work, env)
    table(results)
    print(json.dumps(results, default=str))
    return 0


def step_convert(ckpt: Path, work: Path, env: dict) -> dict:
    import shutil

    import torch
    from safetensors.torch import load_file

    ours = adapter_from_checkpoint(ckpt, work / "adapter")
    for d in ("official", "back"):
        shutil.rmtree(work / d, ignore_errors=True)
    cli = [sys.executable, "-m", "ditfuse.cli", "convert"]
    res = run("export-official", [*cli, "export-official", "--lora", str(ours), "--out", str(work / "official")],
              work / "export.log", env)
    back = run("lora", [*cli, "lora", "--src", str(work / "official"), "--out", str(work / "back")],
               work / "import.log", env)
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(work / "back" / "adapter_model.safetensors"))
    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    size = (work / "official" / "adapter_model.safetensors").stat().st_size
    return {**res, "import_wall_s": back["wall_s"], "import_rc": back["rc"], "round_trip_equal": same,
            "adapter_tensors": len(a), "adapter_params": sum(v.numel() for v in a.values()),
            "official_adapter_mb": round(size / 1e6, 1)}


def table(results: dict[str, dict]) -> None:
    print("\n| step | rc | wall s | peak RSS GiB | private (anon) GiB | file-backed GiB | PSS GiB | other |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name.startswith("ranks"):
            other = (f"{r['world']} rank(s): RSS sum {r['rss_sum_gib']:.2f}, PSS sum {r['pss_sum_gib']:.2f}, "
                     f"anon sum {r['anon_sum_gib']:.2f}, MemAvailable drop {r['memavailable_drop_gib']:.2f} GiB")
            print(f"| {name} | {r['rc']} | {r['wall_s']} | | | | | {other} |")
            continue
        extra = {k: r[k] for k in ("load_s", "touch_s", "params", "ckpt_mb", "global_step", "trainable_params",
                                   "round_trip_equal", "adapter_params", "official_adapter_mb", "import_wall_s")
                 if k in r}
        print(f"| {name} | {r['rc']} | {r['wall_s']} | {r['peak_rss_gib']} | {r['peak_anon_gib']} | "
              f"{r['peak_file_gib']} | {r['peak_pss_gib']} | {', '.join(f'{k}={v}' for k, v in extra.items())} |")


if __name__ == "__main__":
    sys.exit(main())
