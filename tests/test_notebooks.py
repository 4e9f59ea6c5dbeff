"""The notebooks run top to bottom, headless and without a GPU or a download, as a reader would run them.

Each notebook is executed in quick mode (VJEPA_QUICK=1: fewer steps, smaller data) in a fresh python3
kernel with notebooks/ as the working directory; a failing cell fails the test, and every cell that shows a
figure must produce an image. The committed notebooks hold the outputs of a full run (`python
notebooks/render.py`), so GitHub shows their figures: checked here to be complete, small, and rendered from
the code the notebooks hold now.
"""
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds; quick mode needs well under a minute per notebook on 2 CPU cores
MAX_MB = 3  # per rendered notebook: figures at the inline backend's resolution, progress bars collapsed
sys.path.insert(0, str(ROOT / "notebooks"))
import render  # noqa: E402  (notebooks/render.py: the command that renders them)


def shows_figure(cell) -> bool:
    return cell.cell_type == "code" and ("plt.show()" in cell.source or "display(" in cell.source)


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_masks.ipynb", "02_attention.ipynb",
                                           "03_train_and_probe.ipynb", "04_released_weights.ipynb"]


def test_one_setup_cell():
    """Every notebook starts with the same short setup cell (a local checkout, or a clone in Colab)."""
    setups = {"".join(nbformat.read(p, as_version=4).cells[1].source) for p in NOTEBOOKS}
    assert len(setups) == 1 and "REPO_URL" in next(iter(setups))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_rendered(path):
    """Every code cell ran, in order, in full mode, from the code the notebook holds now; figures shown."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nb.metadata.get("vjepa", {}).get("rendered_code") == render.code_hash(nb), \
        f"{path.name} changed since its outputs were made: run `python notebooks/render.py {path.name}`"
    in_order = [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert in_order, f"{path.name}: not run top to bottom"
    setup_text = "".join(o.get("text", "") for o in code[1].outputs)
    assert "quick mode: False" in setup_text, f"{path.name} was rendered in quick mode"
    errors = [o.ename for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: cells raised {errors}"
    blank = [i for i, c in enumerate(nb.cells)
             if shows_figure(c) and not any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert not blank, f"{path.name}: cells {blank} show no figure"
    assert path.stat().st_size < MAX_MB * 1e6, f"{path.name}: {path.stat().st_size / 1e6:.1f} MB"


def test_progress_bars_keep_their_last_state():
    assert render.last_state("train:  0%\rtrain: 50%\rtrain: 100%\nstep 1\r\n") == "train: 100%\nstep 1\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ,
           "VJEPA_QUICK": "1",
           "TMPDIR": str(tmp_path),  # the notebooks' scratch files (quick runs, demo video) land here
           "VJEPA_TINY_CKPT": str(tmp_path / "absent.pt"),  # train here, whatever runs/ holds
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when a cell fails
    for i, cell in enumerate(nb.cells):
        if shows_figure(cell):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert images, f"{path.name} cell {i} should show a figure but produced no image"
