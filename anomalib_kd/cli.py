"""``anomalib-kd``: the stock ``anomalib`` command with this package's classes registered first.

Every subcommand is anomalib's own. Three things differ from ``anomalib``:

* Registration is explicit, so it works where the automatic start-up registration is off
  (``ANOMALIB_KD_NO_AUTOLOAD=1``) or not installed (a source checkout on ``PYTHONPATH``).
* ``anomalib-kd benchmark --config FILE`` accepts the dotted class paths that ``anomalib train``
  accepts (``anomalib_kd.URD``, ``anomalib_kd.data.Textures``). anomalib's benchmark resolves models
  with ``get_model``, which refuses dotted paths outside ``anomalib.models``; this command writes a copy
  of the config with those paths turned into the bare registered names (``URD``) and runs anomalib's
  benchmark on the copy. anomalib itself is not changed. The one rule: with the stock ``anomalib
  benchmark``, write bare names.
* ``--seed_everything`` (command line or config file) is applied: anomalib 2.7's CLI parses it but never
  seeds, so two ``anomalib train --seed_everything 111`` runs differ. ``anomalib-kd`` calls Lightning's
  ``seed_everything`` with it before the model and data are built (``true``, the default: a random seed,
  logged; ``false``: no seeding). Under DDP every process is started with the same command, so all seed
  alike (the models then give each rank its own stream for augmentations).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

PREFIXES = ("anomalib_kd.models.", "anomalib_kd.data.", "anomalib_kd.")


def bare_class_paths(node: Any) -> Any:
    """``node`` (a parsed config), each ``class_path: anomalib_kd[.models|.data].<Name>`` made ``<Name>``.

    Grid values (``class_path: {grid: [anomalib_kd.URD, ...]}``) are rewritten too.
    """

    def bare(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PREFIXES):
            return value.rsplit(".", 1)[-1]
        if isinstance(value, dict) and isinstance(value.get("grid"), list):
            return {**value, "grid": [bare(item) for item in value["grid"]]}
        return value

    if isinstance(node, dict):
        return {
            key: bare(value) if key == "class_path" else bare_class_paths(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [bare_class_paths(item) for item in node]
    return node


def _config_argument(argv: list[str]) -> int | None:
    """Index in ``argv`` of the value of ``--config`` (``--config F`` or ``--config=F``)."""
    for index, argument in enumerate(argv):
        if argument == "--config" and index + 1 < len(argv):
            return index + 1
        if argument.startswith("--config="):
            return index
    return None


def rewrite_benchmark_argv(argv: list[str], folder: Path) -> list[str]:
    """``argv`` of ``anomalib-kd benchmark`` with ``--config`` replaced by a bare-name copy in ``folder``."""
    import yaml

    index = _config_argument(argv)
    if index is None:
        return argv
    inline = argv[index].startswith("--config=")
    source = Path(argv[index].removeprefix("--config="))
    if not source.is_file():
        msg = f"anomalib-kd benchmark: config file {source} not found"
        raise SystemExit(msg)
    copy = folder / source.name
    copy.write_text(yaml.safe_dump(bare_class_paths(yaml.safe_load(source.read_text())), sort_keys=False))
    return [*argv[:index], f"--config={copy}" if inline else str(copy), *argv[index + 1 :]]


SEEDED_SUBCOMMANDS = ("train", "fit", "validate", "test", "predict")


def seeded_cli() -> type:
    """anomalib's ``AnomalibCLI`` that applies ``--seed_everything`` before building the classes."""
    from anomalib.cli.cli import AnomalibCLI
    from lightning.pytorch import seed_everything

    class SeededAnomalibCLI(AnomalibCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            if self.subcommand not in SEEDED_SUBCOMMANDS:
                return
            seed = self.config[self.subcommand].get("seed_everything", True)
            if seed is not False and seed is not None:
                seed_everything(None if seed is True else int(seed), workers=True)

    return SeededAnomalibCLI


def main() -> None:
    """Register into anomalib, then run anomalib's own CLI (seeded) with the same arguments."""
    from anomalib.loggers import configure_logger

    from anomalib_kd import register_into_anomalib

    register_into_anomalib()
    configure_logger()
    if len(sys.argv) > 1 and sys.argv[1] == "benchmark":
        with tempfile.TemporaryDirectory(prefix="anomalib-kd-benchmark-") as folder:
            sys.argv = rewrite_benchmark_argv(sys.argv, Path(folder))
            seeded_cli()()
        return
    seeded_cli()()


if __name__ == "__main__":
    main()
