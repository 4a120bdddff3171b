import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "fashion_mnist.npz"
sys.path.insert(0, str(Path(__file__).parent))

# Tests are deterministic and CPU-bound; keep torch from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Tests never read or write the user's cache (~/.cache/neuroflux: this machine's
# device profile): the session gets its own, which the CLIs that tests start inherit.
_CACHE = tempfile.mkdtemp(prefix="neuroflux-test-cache-")
os.environ["NEUROFLUX_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

_SUMMARY_SCHEMA = json.loads((ROOT / "schemas" / "summary.schema.json").read_text())
#: Every summary.json a test writes is checked against the published schema (and counted).
SUMMARIES_CHECKED: list[Path] = []


@pytest.fixture(autouse=True)
def _summaries_match_the_schema(request):
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is None:
        return
    for p in sorted(Path(tmp).rglob("summary.json")):
        jsonschema.validate(json.loads(p.read_text()), _SUMMARY_SCHEMA)
        SUMMARIES_CHECKED.append(p)
