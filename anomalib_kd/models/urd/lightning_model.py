"""URD: Reverse Distillation with Expert, as an anomalib model.

Paper: Liu et al., "Unlocking the Potential of Reverse Distillation for Anomaly Detection", AAAI 2025.

Each training step follows the official loop (spec part 2.5): synthesise anomalies x~ from x; update
the teacher with L_T against the frozen expert (teacher BN in train mode); recompute the teacher
features in eval mode without gradient; update the student with L_S. Two Adam optimizers, manual
optimisation.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd import URD
    >>> from anomalib_kd.data import Textures
    >>> engine = Engine(max_steps=50)
    >>> engine.train(URD(pre_trained=False), datamodule=Textures())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from anomalib.data import Batch, MVTecAD, Visa
from anomalib.data.datasets import MVTecADDataset, VisaDataset
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin
from anomalib_kd.components.synthesis import FOREGROUND_METHODS, URD_MVTEC_FOREGROUND, AnomalySynthesizer

from .loss import StudentDenoisingLoss, TeacherSensitivityLoss
from .torch_model import URDModel

logger = logging.getLogger(__name__)

__all__ = ["URD"]

# Official iteration counts (spec part 2.5): 5000, but 10000 for MVTec cable/transistor and all VisA.
_DEFAULT_ITERATIONS = 5000
_LONG_ITERATIONS = 10_000
_LONG_MVTEC_CATEGORIES = ("cable", "transistor")

_NAN_HINT = "Try lower learning rates (--model.teacher_lr / --model.student_lr) or check the input images."


class URD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Reverse Distillation with Expert (URD / RD-E).

    Args:
        backbone: timm name of expert and teacher. Default: torchvision's ImageNet WRN50-2 (the paper's).
        layers: teacher layers tapped.
        pre_trained: load ImageNet weights for expert and teacher at the start of training (see
            ``weights_path``).
        weights_path: the weights file; else ``$ANOMALIB_KD_WEIGHTS``, timm's caches, then timm's own
            download (unless ``ANOMALIB_KD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``).
        injection: teacher-feature skips into the student (URD); ``False`` gives plain RD4AD.
        similarity_attention: GII similarity attention (the paper's; default). ``False`` reproduces the
            official training scripts, which run the skips without it.
        texture_dir: folder of anomaly-source textures (DTD's ``images/``), used as they are (the official
            code does not augment them). ``None``: anomalib's colour-augmented Perlin-noise textures, no
            download (not the paper's setting).
        foreground_mask: restrict synthetic anomalies to the object. ``"auto"`` (default) follows the
            official code: GrabCut for MVTec AD bottle, cable, hazelnut, metal_nut, pill, toothbrush,
            zipper and every VisA category, an inverted Otsu threshold for capsule and screw, nothing for
            the other categories and for any other datamodule. ``"grabcut"`` / ``"otsu_inverted"``
            compute that mask on every training image (your own object data); ``None``: no restriction.
        teacher_lr: Adam learning rate of the teacher (official 1e-4).
        student_lr: Adam learning rate of the student (official 5e-3).
        iterations: training iterations at batch 16. ``"auto"`` (default): the official counts, 10000 for
            MVTec AD cable and transistor and for VisA, else 5000 (the paper states 5000). As the official
            code, training stops at the end of the epoch in which this count is reached, so validation
            always runs and the post-processor's thresholds are fitted. ``--trainer.max_epochs`` /
            ``max_steps`` still cap it (Lightning counts two optimizer steps per iteration). ``None``: the
            trainer decides.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
    """

    quantization_recipe = QuantizationRecipe(
        ("post_processor", "model", "model.anomaly_map_generator*"),
        reason="the anomaly-map head (1 - cos, up-sampling, blur, max) and post-processing stay float",
    )  # INT8 export

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: tuple[str, ...] | list[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        weights_path: str | None = None,
        injection: bool = True,
        similarity_attention: bool = True,
        texture_dir: str | None = None,
        foreground_mask: Literal["auto", "grabcut", "otsu_inverted"] | None = "auto",
        teacher_lr: float = 1e-4,
        student_lr: float = 5e-3,
        iterations: int | Literal["auto"] | None = "auto",
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.pre_trained = pre_trained
        self.weights_path = weights_path
        self.teacher_lr = teacher_lr
        self.student_lr = student_lr
        if foreground_mask not in (None, "auto", *FOREGROUND_METHODS):
            choices = sorted(FOREGROUND_METHODS)
            msg = f"foreground_mask={foreground_mask!r}: use 'auto', None or one of {choices}."
            raise ValueError(msg)
        if (
            iterations is not None
            and iterations != "auto"
            and (isinstance(iterations, str) or iterations < 1)
        ):
            msg = f"iterations={iterations!r}: use a positive integer, 'auto' or None."
            raise ValueError(msg)
        self.iterations = iterations
        self.foreground_mask = foreground_mask
        self.iteration_budget: int | None = None if iterations == "auto" else iterations
        self.model = URDModel(
            backbone=backbone,
            layers=tuple(layers),
            injection=injection,
            similarity_attention=similarity_attention,
        )
        self.check_pre_processor_size()  # a Resize to a non-multiple of 32 fails here, named
        # Official: DTD textures unaugmented (the Perlin-noise fallback keeps anomalib's augmentation).
        self.synthesizer = AnomalySynthesizer(
            texture_dir=texture_dir,
            probability=1.0,
            blend_factor=(0.2, 1.0),
            augment_texture=texture_dir is None,
            foreground=None if foreground_mask == "auto" else foreground_mask,
        )
        self.teacher_loss = TeacherSensitivityLoss()
        self.student_loss = StudentDenoisingLoss()
        self.automatic_optimization = False

    def training_data(self) -> tuple[str | None, str | None]:
        """``("mvtecad" | "visa" | None, category)`` of the data being trained on (datamodule or dataset)."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if isinstance(datamodule, MVTecAD):
            return "mvtecad", datamodule.category
        if isinstance(datamodule, Visa):
            return "visa", datamodule.category
        dataset = getattr(getattr(trainer, "train_dataloader", None), "dataset", None)
        if isinstance(dataset, MVTecADDataset):
            return "mvtecad", dataset.category
        if isinstance(dataset, VisaDataset):
            return "visa", dataset.root_category.name
        return None, None

    def resolve_official_settings(self) -> None:
        """Resolve ``foreground_mask``/``iterations`` ``"auto"`` from the training data (spec 2.4, 2.5)."""
        kind, category = self.training_data()
        if self.foreground_mask == "auto":
            method = "grabcut" if kind == "visa" else URD_MVTEC_FOREGROUND.get(category) if kind else None
            self.synthesizer.foreground = method
            logger.info(
                "URD foreground masks: %s (official rule for %s %s)",
                method or "none",
                kind or "this data",
                category or "",
            )
        if self.iterations == "auto":
            long_run = kind == "visa" or (kind == "mvtecad" and category in _LONG_MVTEC_CATEGORIES)
            self.iteration_budget = _LONG_ITERATIONS if long_run else _DEFAULT_ITERATIONS
            logger.info("URD trains for %d iterations (official count for this data)", self.iteration_budget)

    def on_train_start(self) -> None:
        """Resolve the official per-category settings; load pretrained weights once (after any
        checkpoint restore: resuming needs no file)."""
        self.resolve_official_settings()
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            path = self.model.load_pretrained(self.weights_path)
            logger.info("URD expert and teacher initialised from %s", path)
        elif not self.pre_trained:
            logger.warning("URD trains with randomly initialised expert/teacher (pre_trained=False).")

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Teacher Adam(1e-4) and student Adam(5e-3), betas (0.5, 0.999) (spec part 2.5)."""
        teacher = torch.optim.Adam(self.model.teacher.parameters(), lr=self.teacher_lr, betas=(0.5, 0.999))
        student = torch.optim.Adam(self.model.student.parameters(), lr=self.student_lr, betas=(0.5, 0.999))
        return [teacher, student]

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One teacher update then one student update (spec part 2.5)."""
        del args, kwargs
        teacher_optimizer, student_optimizer = self.optimizers()
        images = batch.image
        augmented, masks = self.synthesizer(images)

        with torch.no_grad():
            expert_normal = self.model.expert_features(images)
            expert_anomalous = self.model.expert_features(augmented)

        self.model.teacher.train()
        teacher_loss = self.teacher_loss(
            self.model.teacher_features(images),
            self.model.teacher_features(augmented),
            expert_normal,
            expert_anomalous,
            masks,
        )
        self.check_finite_loss(teacher_loss, "teacher loss", _NAN_HINT)
        teacher_optimizer.zero_grad()
        self.manual_backward(teacher_loss)
        teacher_optimizer.step()

        self.model.teacher.eval()
        with torch.no_grad():
            teacher_normal = self.model.teacher_features(images)
            teacher_anomalous = self.model.teacher_features(augmented)
        student_loss = self.student_loss(
            self.model.student(teacher_normal),
            self.model.student(teacher_anomalous),
            teacher_normal,
            expert_normal,
        )
        self.check_finite_loss(student_loss, "student loss", _NAN_HINT)
        student_optimizer.zero_grad()
        self.manual_backward(student_loss)
        student_optimizer.step()

        loss = teacher_loss.detach() + student_loss.detach()
        self.log("teacher_loss", teacher_loss.detach(), on_epoch=True, batch_size=len(images))
        self.log("student_loss", student_loss.detach(), on_epoch=True, batch_size=len(images))
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        return {"loss": loss}

    @property
    def completed_iterations(self) -> int:
        """Teacher+student iterations done (Lightning's ``global_step`` counts both optimizer steps)."""
        return self.global_step // 2

    def on_train_epoch_end(self) -> None:
        """Stop after the epoch in which ``iterations`` is reached (validation of this epoch has run)."""
        if self.iteration_budget is not None and self.completed_iterations >= self.iteration_budget:
            self.trainer.should_stop = True
