import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is a flat set of modules, not an installed package
REFERENCE = ROOT / "reference"  # outputs of the official implementation (reference/README.md)

torch.set_num_threads(min(2, torch.get_num_threads()))

@pytest.fixture(scope="session")
def reference():
    """Path to reference/ (files written by the official V-JEPA code). It is part of the repository, so a
    missing file is a broken checkout: the parity tests fail, they never skip."""
    return REFERENCE
