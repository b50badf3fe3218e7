"""Test-wide guards: offline, CPU-only, small thread count, no sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # 2 xdist workers share the 2 cores: one intra-op thread each (OpenMP threads of two busy
    # processes oversubscribe); subprocesses inherit OMP_NUM_THREADS
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

SHARED_IVIF = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ivif"


class _NoNetwork(socket.socket):
    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")) or \
                self.family == socket.AF_UNIX:
            return super().connect(address)
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests must stay offline")


# The longest test first: with 2 xdist workers (pyproject addopts) the suite's wall time is at
# least this test's, so it must not start last.
FIRST = ("test_cli_fit.py::test_demo_reaches_margin",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Schedule for `--dist loadgroup`: slow tests are units of their own, queued first (longest-
    processing-first keeps the 2 workers busy to the end); the fast tests of a module stay together
    so that module-scoped fixtures are built once. A test with its own xdist_group keeps it."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))
    rank = lambda item: (0 if item.nodeid.endswith(FIRST) else 1 if item.get_closest_marker("slow") else 2)  # noqa: E731
    items.sort(key=rank)  # stable: collection order within each rank


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    original = socket.socket
    socket.socket = _NoNetwork  # type: ignore[misc]
    yield
    socket.socket = original  # type: ignore[misc]


@pytest.fixture(scope="session")
def ivif_dir() -> Path:
    """The real TNO/RoadScene pairs in ../shared/data/ivif; skipped in a fresh clone."""
    if not SHARED_IVIF.is_dir():
        pytest.skip("../shared/data/ivif is absent (fresh clone)")
    return SHARED_IVIF


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The scikit-image demo shards, built once per test module."""
    from datamodules.demo import build_demo

    path = tmp_path_factory.mktemp("demo")
    build_demo(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread: on a shared 2-core runner OpenMP threads oversubscribe (~10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_backbone():
    """A 2-layer tiny `Backbone` in eval mode whose zero-init layers are perturbed (zeros would
    hide differences between sampling paths)."""
    import torch

    from ditfuse.model.backbone import Backbone, build_transformer
    from ditfuse.model.config import ModelConfig

    tr = build_transformer(ModelConfig.from_name("tiny", num_layers=2), seed=0)
    with torch.no_grad():
        for p in tr.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return Backbone(tr.eval())
