import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is a flat set of modules, not an installed package
REFERENCE = ROOT.parent / "shared" / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))

@pytest.fixture(scope="session")
def reference():
    """Path to ../shared/reference (official V-JEPA outputs), or skip with a clear message."""
    if not (REFERENCE / "official_small_io.pt").is_file():
        pytest.skip(f"reference data from the official implementation not found at {REFERENCE} "
                    "(it ships beside the project in ../shared/reference)")
    return REFERENCE
