"""``anomalib-kd``: the stock ``anomalib`` command with this package's models registered first.

Equivalent to ``anomalib`` when the automatic registration (torch entry point) is active; it exists for
environments that disable torch's entry-point autoloading (``TORCH_DEVICE_BACKEND_AUTOLOAD=0``).
"""

from __future__ import annotations


def main() -> None:
    """Register into anomalib, then run anomalib's own CLI with the same arguments."""
    from anomalib.cli.cli import main as anomalib_main

    from anomalib_kd import register_into_anomalib

    register_into_anomalib()
    anomalib_main()


if __name__ == "__main__":
    main()
