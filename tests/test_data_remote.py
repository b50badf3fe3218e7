"""Shards streamed from a loopback http.server and through `pipe:` commands (webdataset's opener),
including a 2-process gloo `ditfuse fit` that reads them; remote failures are counted bad data."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from _fit import override, run_fit
from _runlog import read_runlog
from test_data_mixing import SIZE, make_shards

from datamodules import DiTFuseDataModule
from datamodules.mixing import BadSampleWarning
from datamodules.schema import ShardReadError, expand_shards, read_shard


class _Quiet(SimpleHTTPRequestHandler):
    requests: ClassVar[list[str]] = []  # paths asked for, across the module's tests

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """(root, http://127.0.0.1:PORT) serving a shard folder."""
    root = tmp_path_factory.mktemp("served")
    make_shards(root, n=24, shard_size=6)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_pipe_shards_read_like_local_ones(served):
    root, url = served
    local = [s["__key__"] for s in read_shard(str(root / "m3" / "m3-000001.tar"))]
    assert [s["__key__"] for s in read_shard(f"{url}/m3/m3-000001.tar")] == local
    assert [s["__key__"] for s in read_shard(f"pipe:cat {root}/m3/m3-000001.tar")] == local
    assert expand_shards(f"{url}/m3/m3-{{000000..000003}}.tar") == [f"{url}/m3/m3-00000{i}.tar" for i in range(4)]
    with pytest.raises(ShardReadError, match="m3-000099.tar"):  # 404: curl fails, the stream says so
        list(read_shard(f"{url}/m3/m3-000099.tar"))


def test_datamodule_trains_from_http_and_pipe_shards_and_counts_remote_failures(served):
    root, url = served
    cut = (root / "control" / "control-000000.tar").stat().st_size // 2
    shards = {"fusion": f"pipe:cat {root}/fusion/fusion-{{000000..000003}}.tar",
              "m3": [f"{url}/m3/m3-{{000000..000003}}.tar", f"{url}/m3/m3-000404.tar"],  # one missing
              "seg": f"{url}/seg/seg-{{000000..000003}}.tar",
              "control": [f"pipe:cat {root}/control/control-000001.tar",
                          f"pipe:head -c {cut} {root}/control/control-000000.tar"]}  # cut mid-stream
    dm = DiTFuseDataModule(shards=shards, image_size=SIZE, batch_size=8, num_workers=0, batches_per_epoch=6,
                           m3_block_sizes=[4], max_bad_fraction=0.5, val_shards={k: str(root / k) for k in shards})
    dm.setup("fit")
    with pytest.warns(BadSampleWarning, match="m3-000404.tar|control-000000.tar"):
        batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert len(batches) == 6 and len(keys) == 48
    assert {"fusion", "m3", "seg", "control"} == {k for b in batches for k in b["kind"]}
    assert any(p.startswith("/m3/") for p in _Quiet.requests) and any(p.startswith("/seg/") for p in _Quiet.requests)


class _Stalls(SimpleHTTPRequestHandler):
    """Sends the first half of a file, then keeps the connection open without a byte more."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        time.sleep(120)  # a daemon thread: ends with the test process


@pytest.fixture(scope="module")
def stalled(served) -> Iterator[str]:
    """http://127.0.0.1:PORT serving the same folder, stalling half-way through every file."""
    root, _ = served
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Stalls, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.server_close()


def test_a_shard_server_that_stalls_is_abandoned_counted_and_training_goes_on(served, stalled):
    root, url = served
    t0 = time.time()
    with pytest.raises(ShardReadError, match="m3-000001.tar"):
        list(read_shard(f"{stalled}/m3/m3-000001.tar", stall_timeout=1))
    assert time.time() - t0 < 30  # abandoned after the timeout, not after the server's 120 s
    shards = {k: str(root / k) for k in ("fusion", "seg", "control")}
    shards["m3"] = [f"{stalled}/m3/m3-000000.tar", *[f"{url}/m3/m3-00000{i}.tar" for i in (1, 2, 3)]]
    dm = DiTFuseDataModule(shards=shards, image_size=SIZE, batch_size=8, num_workers=0, batches_per_epoch=4,
                           m3_block_sizes=[4], max_bad_fraction=0.5, stall_timeout=1,
                           val_shards={k: str(root / k) for k in ("fusion", "seg", "control", "m3")})
    dm.setup("fit")
    t0 = time.time()
    with pytest.warns(BadSampleWarning, match="m3-000000.tar"):  # counted like a broken shard
        batches = list(dm.train_dataloader())
    assert len(batches) == 4 and "m3" in {k for b in batches for k in b["kind"]}  # training went on
    assert time.time() - t0 < 60
    with pytest.raises(ValueError, match="data.stall_timeout"):
        DiTFuseDataModule(shards=shards, stall_timeout=0)


@pytest.mark.slow
def test_two_process_gloo_fit_reads_http_and_pipe_shards(served, tmp_path, demo_dir):
    root, url = served
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 3, "save_top_k": -1}}
    cfg_path = override(tmp_path, demo_dir, max_steps=3, strategy="ddp", devices=2, callbacks=[ckpt])
    cfg = yaml.safe_load(cfg_path.read_text())
    train = Path(demo_dir) / "train"
    cfg["data"]["shards"] = {
        "m3": f"{url}/m3/m3-{{000000..000003}}.tar", "seg": f"{url}/seg/seg-{{000000..000003}}.tar",
        "fusion": f"pipe:cat {train}/fusion/fusion-{{000000..000002}}.tar",
        "control": f"pipe:cat {root}/control/control-{{000000..000003}}.tar"}
    cfg["data"]["image_size"] = SIZE
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = len(_Quiet.requests)
    res = run_fit(cfg_path)
    assert "data: train m3: 4 shard(s) from http://127.0.0.1" in res.stdout
    ranks = [[r for r in read_runlog(tmp_path / "runlog", rank) if r["event"] == "batch"] for rank in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    keys = [{k for b in r for k in b["keys"]} for r in ranks]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # the ranks read different samples
    assert any("m3_" in k for k in keys[0] | keys[1])  # http-served m3 samples reached training
    assert len(_Quiet.requests) > before  # ... through the loopback server
    # the checkpoint (written by rank 0) holds both ranks' stream positions
    import torch

    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=False)["DiTFuseDataModule"]
    assert sorted(state["stream_positions"]) == [0, 1]
    assert {k for st in state["stream_positions"].values() for k in st["streams"]} == {"fusion", "m3", "seg", "control"}
