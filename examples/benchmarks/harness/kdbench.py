"""``KDBench``: the kdbench benchmark images (MVTec-AD layout) as an anomalib datamodule, never downloaded.

kdbench holds real textures (brick, grass, gravel), brain MRI and head CT slices with synthetic defects
and pixel masks, in the MVTec-AD folder layout (``<category>/train/good``, ``<category>/test/<defect>``,
``<category>/ground_truth/<defect>/NNN_mask.png``), plus ``fmnist/<class>`` one-class tasks (no masks;
use :class:`KDBenchTasks` for those). anomalib's ``MVTecAD`` reads that layout; :class:`KDBench` only finds
the folder, replaces the download with a clear error and reads the images with this package's reader
(:func:`~anomalib_kd.data.image.read_image`). :class:`KDBenchTasks` is
:class:`~anomalib_kd.data.FewShotTasks` over the same folder (the benchmark's few-shot runs).

Where the data is looked for (first that exists): the ``root`` argument, ``$ANOMALIB_KD_KDBENCH``,
``./shared/data/kdbench`` and ``../shared/data/kdbench`` from the working directory, and
``../shared/data/kdbench`` next to this package's checkout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anomalib_kd.data.fewshot import FewShotTasks
from anomalib_kd.data.high_bit_depth import HighBitDepthMVTecAD

__all__ = ["KDBENCH_CATEGORIES", "KDBENCH_ENV", "KDBench", "KDBenchTasks", "resolve_kdbench_root"]

KDBENCH_ENV = "ANOMALIB_KD_KDBENCH"
KDBENCH_CATEGORIES = ("brick", "grass", "gravel", "brain_mri", "head_ct")


def _candidates() -> list[Path]:
    checkout = Path(__file__).resolve().parents[4]  # <checkout parent>/<repo>/examples/benchmarks/harness/
    cwd = Path.cwd()
    return [cwd / "shared" / "data" / "kdbench", cwd.parent / "shared" / "data" / "kdbench",
            checkout / "shared" / "data" / "kdbench"]  # fmt: skip


def resolve_kdbench_root(root: str | Path | None = None) -> Path:
    """The kdbench folder: ``root`` if given, else ``$ANOMALIB_KD_KDBENCH``, else ``../shared/data/kdbench``.

    Raises:
        FileNotFoundError: naming every place looked at and how to point at the data.
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            msg = f"kdbench root {path} is not a folder (set data.init_args.root or ${KDBENCH_ENV})."
            raise FileNotFoundError(msg)
        return path
    if os.environ.get(KDBENCH_ENV):
        path = Path(os.environ[KDBENCH_ENV]).expanduser()
        if not path.is_dir():
            msg = f"${KDBENCH_ENV}={path} is not a folder."
            raise FileNotFoundError(msg)
        return path
    candidates = _candidates()
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    looked = ", ".join(str(p) for p in candidates)
    msg = (
        f"kdbench not found (looked in {looked}). Pass root=/path/to/kdbench (CLI: --data.root) or set "
        f"${KDBENCH_ENV}; the folder holds <category>/train/good, <category>/test/<defect>, ..."
    )
    raise FileNotFoundError(msg)


class KDBench(HighBitDepthMVTecAD):
    """anomalib's ``MVTecAD`` datamodule over a kdbench category (module docstring), offline.

    Args:
        root: the kdbench folder (``None``: :func:`resolve_kdbench_root`'s search).
        category: ``brick``, ``grass``, ``gravel``, ``brain_mri`` or ``head_ct`` (any folder of ``root``
            in the MVTec-AD layout with masks works).
        num_workers: dataloader workers (default 0: the images are small and this targets 2-core CPUs).
        **kwargs: the rest of ``MVTecAD``'s arguments (batch sizes, augmentations, splits, seed) and the
            reader's ``window`` / ``percentiles`` (:class:`~anomalib_kd.data.HighBitDepthMVTecAD`).
    """

    def __init__(
        self, root: str | Path | None = None, category: str = "brick", num_workers: int = 0, **kwargs: Any
    ) -> None:
        root = resolve_kdbench_root(root)
        super().__init__(root=root, category=category, num_workers=num_workers, **kwargs)

    def prepare_data(self) -> None:
        """Check the category folder (``MVTecAD`` would download MVTec AD instead)."""
        folder = Path(self.root) / self.category
        if not (folder / "train" / "good").is_dir() or not (folder / "test").is_dir():
            available = sorted(p.name for p in Path(self.root).iterdir() if (p / "train" / "good").is_dir())
            msg = (
                f"kdbench category {self.category!r} not found: {folder} has no train/good and test folders. "
                f"Categories under {self.root}: {', '.join(available) or 'none'}."
            )
            raise FileNotFoundError(msg)


class KDBenchTasks(FewShotTasks):
    """:class:`~anomalib_kd.data.FewShotTasks` over the kdbench folder, found as :class:`KDBench` finds it.

    Args:
        root: the kdbench folder (``None``: :func:`resolve_kdbench_root`'s search).
        **kwargs: ``FewShotTasks``' other arguments (``target``, ``tasks``, ``k_shot``, ``mode``, ...).
    """

    def __init__(self, root: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(root=resolve_kdbench_root(root), **kwargs)
