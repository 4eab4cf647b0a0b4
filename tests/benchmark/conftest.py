"""The benchmark harness lives in examples/benchmarks (not in the package): make it importable here."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "benchmarks"))
