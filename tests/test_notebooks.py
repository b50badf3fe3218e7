"""The notebooks run top to bottom on a CPU, offline, each in a few minutes (nbclient)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["data_mix.ipynb", "quickstart.ipynb"])
def test_stored_notebooks_have_no_outputs(name):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "strip the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name,expect", [
    ("data_mix.ipynb", ["configured / realized", "in both 25%"]),
    ("quickstart.ipynb", ["val/m3/psnr", "baseline:mean", "3 pairs"]),
])
def test_notebook_executes(name, expect, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DITFUSE_NOTEBOOK_DIR", str(tmp_path))  # the kernel inherits the environment
    # the training cell runs as shipped, shortened: what the test checks (the cells run, the fit's
    # curves and checkpoint feed fuse and eval) does not need the 200 steps a reader's run takes;
    # that a trained tiny model learns is test_cli_fit.py::test_demo_reaches_margin's job
    monkeypatch.setenv("DITFUSE_QUICKSTART_STEPS", "20")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.time()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.time() - start
    text = _outputs_text(nb)
    for snippet in expect:
        assert snippet in text, f"{name}: {snippet!r} not in the outputs"
    images = sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
    assert images >= 2
    print(f"{name}: {seconds:.0f} s")
