"""Steps shared by the one-class distillation models (a mixin, so each model stays a direct
``AnomalibModule`` subclass: anomalib's ``get_model`` only looks at direct subclasses)."""

from __future__ import annotations

from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Resize

from anomalib_kd.components.distributed import average_batch_norm_statistics, distinct_random_streams


class DistillationModuleMixin:
    """Resize-only pre-processing, ``validation_step``, BatchNorm statistics under DDP, trainer arguments,
    learning type, NaN-loss guard."""

    model: torch.nn.Module
    global_step: int
    default_image_size: tuple[int, int] = (256, 256)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: the models normalise [0, 1] images inside (synthetic anomalies, exported graph)."""
        return PreProcessor(transform=Compose([Resize(image_size or cls.default_image_size, antialias=True)]))

    def setup(self, stage: str) -> None:
        """Before fitting under DDP: one random stream per rank (see :func:`distinct_random_streams`)."""
        super().setup(stage)  # type: ignore[misc]
        trainer = getattr(self, "_trainer", None)
        if stage == TrainerFn.FITTING and trainer is not None:
            distinct_random_streams(trainer)

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
