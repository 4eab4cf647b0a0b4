"""anomalib's own ``benchmark`` with the harness's classes registered (``Budgeted<Model>``, ``KDBench``).

    python examples/benchmarks/run_benchmark.py --config examples/benchmarks/configs/dhkd.yaml

Same arguments as ``anomalib benchmark``; class paths may be bare (``BudgetedDHKD``) or dotted
(``anomalib_kd.URD``), as with ``anomalib-kd benchmark``. ``suite.py`` runs one of these per job.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import register_harness

from anomalib_kd import cli


def main() -> None:
    register_harness()
    sys.argv = ["anomalib-kd", "benchmark", *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
