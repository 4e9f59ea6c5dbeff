"""Run the notebooks top to bottom in full mode and save them with their outputs, so that a reader browsing
the repository (GitHub renders .ipynb files) sees every figure without running anything.

    python notebooks/render.py                        # all four, about 13 min on a 2-core CPU
    python notebooks/render.py 02_attention.ipynb     # one (it uses the model notebook 03 trained)

Notebook 03 runs first and from scratch: its own run folders (runs/notebook03, runs/notebook03_ema0) are
removed first, so that its saved outputs show the training itself, not a finished run being reloaded.
Notebooks 02 and 04 then look at that model, whatever runs/tiny holds. Each notebook runs in a fresh kernel
in notebooks/, as a reader's would. What is saved is kept small and stable: progress bars keep only their
last state (one per cell), and the per-cell timing metadata is dropped. The notebook's metadata records a
hash of its code cells, which the tests compare with the code, so a notebook edited after its last render
fails them.
"""
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent
ORDER = ["03_train_and_probe.ipynb", "01_masks.ipynb", "02_attention.ipynb", "04_released_weights.ipynb"]
RUNS_OF_03 = [HERE.parent / "runs" / name for name in ("notebook03", "notebook03_ema0")]  # its run folders
TINY_CKPT = RUNS_OF_03[0] / "ckpt.pt"  # the model notebook 03 trains, shown by notebooks 02 and 04
SHOW_TINY_CKPT = ("02_attention.ipynb", "04_released_weights.ipynb")
CELL_TIMEOUT = 1800  # seconds; notebook 03's training cell is the longest (minutes on a CPU)


def code_hash(nb) -> str:
    """A hash of the notebook's code: the sources of its code cells, in order."""
    sources = "\n\0".join(c.source for c in nb.cells if c.cell_type == "code")
    return hashlib.sha256(sources.encode()).hexdigest()[:16]


def last_state(text: str) -> str:
    """What a terminal shows of a stream that rewrites lines with carriage returns (tqdm): per line, the
    text after its last '\\r'."""
    return "\n".join(([part for part in line.split("\r") if part] or [""])[-1] for line in text.split("\n"))


PROGRESS_BAR = re.compile(r"\|.*\| *\d+/\d+ \[")  # tqdm's "desc: 42%|####   | 420/1000 [00:10<...]"


def tidy(nb):
    """Drop what changes from one render to the next without changing what a reader sees, and show progress
    bars as a terminal would: each stream message at its last state, blank ones dropped, only the last bar
    of a cell kept, consecutive messages of one stream joined."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # start/end timestamps
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            if out.output_type == "stream":
                out.text = last_state(out.text)
                if not out.text.strip():
                    continue
            outputs.append(out)
        bars = [i for i, o in enumerate(outputs) if o.output_type == "stream" and PROGRESS_BAR.search(o.text)]
        outputs = [o for i, o in enumerate(outputs) if i not in bars[:-1]]
        cell.outputs = []
        for out in outputs:
            last = cell.outputs[-1] if cell.outputs else None
            if out.output_type == "stream" and last is not None and last.output_type == "stream" \
                    and last.name == out.name:
                last.text = last.text.rstrip("\n") + "\n" + out.text
            else:
                cell.outputs.append(out)
    nb.metadata.pop("widgets", None)
    nb.metadata["vjepa"] = {"rendered_code": code_hash(nb)}


def render(path: Path):
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "VJEPA_QUICK"}  # full mode
    env |= {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "VJEPA_TINY_CKPT": str(TINY_CKPT)}
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(HERE)}})
    t0 = time.time()
    client.execute(env=env)  # raises, naming the cell, when a cell fails: the file is then left as it was
    tidy(nb)
    nbformat.write(nb, path)
    print(f"{path.name}: {time.time() - t0:.0f} s, {path.stat().st_size / 1e6:.2f} MB")


def main(names: list[str]):
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        sys.exit(f"render.py: no notebook {', '.join(unknown)}; the notebooks: {', '.join(ORDER)}")
    for name in [n for n in ORDER if n in names] if names else ORDER:
        if name == ORDER[0]:
            for run in RUNS_OF_03:
                shutil.rmtree(run, ignore_errors=True)
        if name in SHOW_TINY_CKPT and not TINY_CKPT.exists():
            sys.exit(f"render.py: {name} shows the model notebook 03 trains; render {ORDER[0]} first")
        render(HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
