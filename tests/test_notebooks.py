"""The notebooks run top to bottom, headless and without a GPU or a download, as a reader would run them.

Each notebook is executed in quick mode (VJEPA_QUICK=1: fewer steps, smaller data) in a fresh python3
kernel with notebooks/ as the working directory; a failing cell fails the test. Also checked: notebooks are
committed without outputs, and every cell that shows a figure produces an image.
"""
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds; quick mode needs well under a minute per notebook on 2 CPU cores


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_masks.ipynb", "02_attention.ipynb",
                                           "03_train_and_probe.ipynb", "04_released_weights.ipynb"]


def test_one_setup_cell():
    """Every notebook starts with the same short setup cell (a local checkout, or a clone in Colab)."""
    setups = {"".join(nbformat.read(p, as_version=4).cells[1].source) for p in NOTEBOOKS}
    assert len(setups) == 1 and "REPO_URL" in next(iter(setups))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; strip them before committing"


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
        if cell.cell_type == "code" and ("plt.show()" in cell.source or "display(" in cell.source):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert images, f"{path.name} cell {i} should show a figure but produced no image"
