"""benchmarks/ is a top-level directory of the repository, not an installed package: put the repository
root on sys.path so these tests can import it (pytest's own rootdir insertion covers tests/ only)."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
