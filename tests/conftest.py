import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data" / "fashion_mnist.npz"
sys.path.insert(0, str(Path(__file__).parent))

# Tests are deterministic and CPU-bound; keep torch from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES
