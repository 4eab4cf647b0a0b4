"""Steps shared by the one-class distillation models (a mixin, so each model stays a direct
``AnomalibModule`` subclass: anomalib's ``get_model`` only looks at direct subclasses)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Resize

from anomalib_kd.components.distributed import (
    average_batch_norm_statistics,
    detect_unused_parameters,
    distinct_random_streams,
)

# Key under which the mixin records the saving class in every checkpoint (read back on loading).
CHECKPOINT_CLASS_KEY = "anomalib_kd_model_class"


class CheckpointMismatchError(RuntimeError):
    """A checkpoint file that is not a complete Lightning checkpoint, or was saved by another model class."""


def check_checkpoint_file(path: str | Path) -> None:
    """Raise :class:`CheckpointMismatchError` naming ``path`` if it is not a complete checkpoint archive.

    ``torch.save`` writes a zip archive whose directory sits at the end of the file, so a truncated file
    (an interrupted copy or save) fails this cheap test; the file itself is only read, never changed.
    Paths that are not local files (URLs, Lightning's ``"last"``/``"best"``) are left to Lightning.
    """
    path = Path(path)
    if not path.is_file():
        return
    size = path.stat().st_size
    if size == 0 or not zipfile.is_zipfile(path):
        msg = (
            f"Checkpoint {path} ({size} bytes) is not a complete checkpoint file: no zip archive directory "
            "(truncated by an interrupted save/copy, or not a torch.save file). The file was not changed; "
            "use another checkpoint (e.g. the previous or `last.ckpt`)."
        )
        raise CheckpointMismatchError(msg)


class DistillationModuleMixin:
    """Resize-only pre-processing, ``validation_step``, BatchNorm statistics under DDP, trainer arguments,
    learning type, NaN-loss guard, checks of the pre-processor's size and of checkpoint files (truncated,
    saved by another model)."""

    model: torch.nn.Module
    global_step: int
    automatic_optimization: bool
    input_size: tuple[int, int] | None
    default_image_size: tuple[int, int] = (256, 256)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: the models normalise [0, 1] images inside (synthetic anomalies, exported graph)."""
        return PreProcessor(transform=Compose([Resize(image_size or cls.default_image_size, antialias=True)]))

    def setup(self, stage: str) -> None:
        """Before fitting under DDP: one random stream per rank (see :func:`distinct_random_streams`); with
        manual optimisation (URD: teacher and student stepped by separate backward passes, each reaching
        only its own network), DDP's unused-parameter detection."""
        super().setup(stage)  # type: ignore[misc]
        trainer = getattr(self, "_trainer", None)
        if stage == TrainerFn.FITTING and trainer is not None:
            distinct_random_streams(trainer)
            if not self.automatic_optimization:
                detect_unused_parameters(
                    trainer, type(self).__name__, "its optimisers are stepped by separate backward passes"
                )

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Under DDP, the same BatchNorm running statistics on every rank (averaged over the ranks)."""
        del args, kwargs
        average_batch_norm_statistics(self.model)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Predict maps and scores; anomalib's post-processor fits thresholds/normalisation on them."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation, no gradient clipping."""
        return {"gradient_clip_val": 0, "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS: the Engine runs ``trainer.fit`` (training data are normal images only)."""
        return LearningType.ONE_CLASS

    def check_finite_loss(self, loss: torch.Tensor, name: str, hint: str) -> None:
        """Stop with a clear error on a NaN/inf loss, before the update (saved checkpoints stay intact)."""
        if not torch.isfinite(loss):
            msg = (
                f"{type(self).__name__} {name} became {loss.item()} at step {self.global_step}. Training "
                f"stopped before the update; saved checkpoints are untouched. {hint}"
            )
            raise FloatingPointError(msg)

    def check_pre_processor_size(self) -> None:
        """At construction: the pre-processor's output size must suit the model (``model.check_input_size``).

        So a ``Resize`` to e.g. 250x250 for a stride-32 model fails when the model is built, naming the size
        and the stride, not at the first batch deep inside the network.
        """
        size = self.input_size  # anomalib: the pre-processor's output size, None without a resize
        check = getattr(self.model, "check_input_size", None)
        if size is not None and check is not None:
            check(torch.empty(0, 3, *(int(side) for side in size), device="meta"))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """anomalib's loading, after checking that ``checkpoint_path`` is a complete checkpoint file."""
        check_checkpoint_file(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]

    def _class_path(self) -> str:
        """``module.Class`` of this model, as recorded in its checkpoints."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the saving class, so loading into another class fails with a clear error."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[CHECKPOINT_CLASS_KEY] = self._class_path()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint saved by another model class, naming both (before any weight is loaded).

        Checkpoints without the class record (older ones, other anomalib models) are compared by their
        weight names: when most of this model's weights are missing, the checkpoint holds another model.
        """
        own = self._class_path()
        saved = checkpoint.get(CHECKPOINT_CLASS_KEY)
        state = checkpoint.get("state_dict") or {}
        if saved is None:
            names = [key for key in self.state_dict() if key.startswith("model.")]  # type: ignore[attr-defined]
            missing = [key for key in names if key not in state]
            if names and len(missing) > len(names) // 2:
                hparams = sorted(checkpoint.get("hyper_parameters") or {})
                msg = (
                    f"This checkpoint does not hold a {type(self).__name__} model: {len(missing)} of its "
                    f"{len(names)} weights are missing (e.g. {missing[:3]}); the checkpoint's "
                    f"hyper-parameters are {hparams}. Load it with the class that saved it."
                )
                raise CheckpointMismatchError(msg)
        elif saved.rpartition(".")[2] not in {cls.__qualname__ for cls in type(self).__mro__}:
            name = saved.rpartition(".")[2]
            msg = (
                f"This checkpoint was saved by {saved}, not by {own}: load it with "
                f"{name}.load_from_checkpoint(...) / `--model {name}`."
            )
            raise CheckpointMismatchError(msg)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
