"""Benchmark-suite models: each is a real model class plus a training budget, for ``anomalib benchmark``.

anomalib's stock benchmark job builds its ``Engine`` without trainer arguments, so a model's own
``trainer_arguments`` are the only way a config can bound training (Lightning's default is 1000
epochs). Each class here subclasses one model (this package's or anomalib's) unchanged except for:

* ``max_epochs`` / ``limit_train_batches``: added to ``trainer_arguments``. A budget in whole epochs
  (not ``max_steps``) makes every run end at an epoch boundary, so validation runs and the
  post-processor's thresholds are fitted;
* ``image_size``: the pre-processor's resize (and the network's size where the model has one, DHKD);
* EfficientAd only: offline teacher and penalty images (:class:`EfficientAd`).

Harness only: nothing here is registered into a user's anomalib. The benchmark runner
(``examples/benchmarks/run_benchmark.py``) registers each into ``anomalib.models`` as ``Budgeted<Model>``
before it runs anomalib's benchmark, so a config says ``model: {class_path: BudgetedDHKD, init_args:
{max_epochs: 1, ...}}``; reports strip the prefix and mark the baselines this harness changes
(:data:`HARNESS_CHANGES`).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from anomalib.models import AnomalibModule
from anomalib.models import EfficientAd as _EfficientAd
from anomalib.models import Patchcore as _Patchcore
from anomalib.models import ReverseDistillation as _ReverseDistillation

from anomalib_kd.components.backbones import MissingWeightsError
from anomalib_kd.models.d24fad import D24FAD as _D24FAD
from anomalib_kd.models.dhkd import DHKD as _DHKD
from anomalib_kd.models.dhkd.teacher import load_teacher_weights
from anomalib_kd.models.pdd import PDD as _PDD
from anomalib_kd.models.urd import URD as _URD
from anomalib_kd.tools.benchmark_report import HARNESS_CHANGES

logger = logging.getLogger(__name__)

__all__ = [
    "BUDGETED_MODELS",
    "HARNESS_CHANGES",
    "BudgetedD24FAD",
    "BudgetedDHKD",
    "BudgetedEfficientAd",
    "BudgetedPDD",
    "BudgetedPatchcore",
    "BudgetedReverseDistillation",
    "BudgetedURD",
    "TrainingBudget",
    "default_penalty_dir",
]


class TrainingBudget:
    """Mixin: a training budget and input size carried by the model (module docstring).

    Args:
        max_epochs: epochs to train (``None``: the model's own default).
        limit_train_batches: batches per epoch (int) or share of the epoch (float), Lightning's meaning.
        image_size: square input side the pre-processor resizes to (``None``: the model's default).
    """

    def __init__(
        self,
        *args: Any,
        max_epochs: int | None = 1,
        limit_train_batches: int | float = 1.0,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if image_size is not None:
            if "image_size" in inspect.signature(super().__init__).parameters:
                kwargs.setdefault("image_size", image_size)  # DHKD sizes its network too
            if kwargs.get("pre_processor", True) is True:
                kwargs["pre_processor"] = self.configure_pre_processor((image_size, image_size))
        super().__init__(*args, **kwargs)
        self.training_budget: dict[str, Any] = {"limit_train_batches": limit_train_batches}
        if max_epochs is not None:
            self.training_budget |= {"max_epochs": max_epochs, "max_steps": -1}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The model's own trainer arguments with the budget on top."""
        return {**super().trainer_arguments, **self.training_budget}  # type: ignore[misc]


def _with_budget(base: type[AnomalibModule]) -> type[AnomalibModule]:
    """``base`` with :class:`TrainingBudget`, named ``Budgeted<base>``."""
    doc = f"{base.__name__} with a training budget (``max_epochs``, ``limit_train_batches``, ``image_size``)."
    return type(f"Budgeted{base.__name__}", (TrainingBudget, base), {"__module__": __name__, "__doc__": doc})


BudgetedURD = _with_budget(_URD)
BudgetedDHKD = _with_budget(_DHKD)
BudgetedPDD = _with_budget(_PDD)
BudgetedD24FAD = _with_budget(_D24FAD)
BudgetedReverseDistillation = _with_budget(_ReverseDistillation)


BudgetedPatchcore = _with_budget(_Patchcore)


# scikit-image sample photos shipped inside its wheel (no download): the offline penalty set.
_PENALTY_IMAGES = (
    *("astronaut", "camera", "cat", "coffee", "chelsea", "rocket", "horse", "coins", "moon", "page", "clock"),
    *("hubble_deep_field", "immunohistochemistry", "colorwheel", "logo", "text"),
)


def default_penalty_dir() -> Path:
    """Where the offline penalty images go: ``$ANOMALIB_KD_CACHE`` or ``~/.cache/anomalib_kd``."""
    cache = Path(os.environ.get("ANOMALIB_KD_CACHE", Path.home() / ".cache" / "anomalib_kd"))
    return cache / "efficientad_penalty"


def _write_penalty_images(folder: Path) -> None:
    """Fill ``folder/images`` (an ImageFolder class) with scikit-image's bundled sample photos.

    Written to a temporary sibling and renamed, so an interrupted run never leaves a half-filled folder.
    """
    import tempfile

    import numpy as np
    from PIL import Image
    from skimage import data

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    (staging / "images").mkdir()
    written = 0
    for name in _PENALTY_IMAGES:
        try:
            image = np.asarray(getattr(data, name)(), dtype=np.float64)
        except Exception:  # an image that needs a download is simply skipped
            logger.debug("scikit-image sample %s unavailable offline", name)
            continue
        image = 255 * (image - image.min()) / max(float(np.ptp(image)), 1e-8)
        Image.fromarray(image.astype(np.uint8)).convert("RGB").save(staging / "images" / f"{name}.png")
        written += 1
    if not written:
        shutil.rmtree(staging, ignore_errors=True)
        msg = f"No offline penalty images could be written to {folder}; pass penalty_dir=<an image folder>."
        raise RuntimeError(msg)
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)


class BudgetedEfficientAd(TrainingBudget, _EfficientAd):
    """anomalib's EfficientAd with a budget, run offline (anomalib downloads both inputs at train time).

    * Teacher: ``teacher_weights`` (a PDN file: anomalib's ``pretrained_teacher_<size>.pth``, EfficientAD's
      or ``python -m anomalib_kd.tools.distill_pdn``'s output), else ``$ANOMALIB_KD_WEIGHTS`` / anomalib's
      cache; with none of them the teacher stays **random-initialised** (logged as a warning).
    * Penalty images (ImageNette in the paper): ``penalty_dir`` (an ImageFolder root, one sub-folder of
      images); default a folder of scikit-image's bundled sample photos, written on first use.

    Args:
        teacher_weights: local teacher file (medium size only; see above).
        penalty_dir: local image folder for the student's ImageNet penalty.
        model_size: ``"medium"`` (default here: DHKD's teacher size) or ``"small"``.
        **kwargs: :class:`TrainingBudget`'s and EfficientAd's other arguments.
    """

    def __init__(
        self,
        teacher_weights: str | Path | None = None,
        penalty_dir: str | Path | None = None,
        model_size: str = "medium",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            imagenet_dir=Path(penalty_dir) if penalty_dir is not None else default_penalty_dir(),
            model_size=model_size,
            **kwargs,
        )
        self.teacher_weights = teacher_weights
        self.teacher_source = "random"

    def prepare_pretrained_model(self) -> None:
        """Load a local teacher file when one is found; otherwise keep the random teacher and say so."""
        size = getattr(self.model_size, "value", self.model_size)
        try:
            if size != "medium":
                raise MissingWeightsError(f"only the medium teacher can be loaded here (model_size={size})")
            # download=False: the harness stays offline (random teacher when no local file, labelled).
            self.teacher_source = str(
                load_teacher_weights(self.model.teacher, self.teacher_weights, download=False)
            )
        except MissingWeightsError as error:
            if self.teacher_weights is not None:
                raise
            logger.warning(
                "EfficientAd teacher is random-initialised: no local PDN-medium teacher file (pass "
                "teacher_weights or put pretrained_teacher_medium.pth in $ANOMALIB_KD_WEIGHTS). %s",
                type(error).__name__,
            )

    def prepare_imagenette_data(self, image_size: tuple[int, int]) -> None:
        """Use the local penalty folder, writing the default one first (never downloads)."""
        if not Path(self.imagenet_dir).is_dir():
            if Path(self.imagenet_dir) != default_penalty_dir():
                msg = f"EfficientAd penalty_dir {self.imagenet_dir} does not exist."
                raise FileNotFoundError(msg)
            _write_penalty_images(Path(self.imagenet_dir))
            logger.info("EfficientAd penalty images: scikit-image samples in %s", self.imagenet_dir)
        super().prepare_imagenette_data(image_size)


BUDGETED_MODELS = (BudgetedURD, BudgetedDHKD, BudgetedPDD, BudgetedD24FAD, BudgetedReverseDistillation,
                   BudgetedEfficientAd, BudgetedPatchcore)  # fmt: skip
