"""PDD: Manifold-Prior Diverse Distillation, as an anomalib model.

Paper: "PDD: Manifold-Prior Diverse Distillation for Medical Anomaly Detection" (CVPR 2026).

Two frozen teachers (WRN50-2, VMamba-Tiny v0) are fused into a unified manifold by trainable InA/MMU
adapters; two students (one decoder shared as in the official code, or two) reconstruct the fused
targets, student 2 with MPA priors; a diversity loss keeps them apart on the finest level and together
on the deeper ones. Adam lr 2e-3, betas (0.5, 0.999), cosine learning-rate schedule (period 40
epochs, as the official script).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd.data import Textures
    >>> from anomalib_kd.models.pdd import PDD
    >>> engine = Engine(max_epochs=100)
    >>> engine.train(PDD(pre_trained=False), datamodule=Textures())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin
from anomalib_kd.components.weights import renamed_argument

from .loss import PDDLoss
from .torch_model import PDDModel

logger = logging.getLogger(__name__)

__all__ = ["PDD"]

DEFAULT_SCHEDULE_EPOCHS = 100


class PDD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Manifold-prior diverse distillation (dual teacher, dual student).

    Args:
        backbone: timm name of the CNN teacher. Default ``wide_resnet50_2.racm_in1k`` (official weights
            file ``wide_resnet50_racm-8234f177.pth``).
        pre_trained: load both teachers' ImageNet weights at the start of training: local files first,
            else their standard downloads (unless ``ANOMALIB_KD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``).
            ``False``: random teachers (tests only).
        weights_path: CNN-teacher weights file; else ``$ANOMALIB_KD_WEIGHTS``, timm's caches, timm's download.
        vmamba_weights_path: ``vssmtiny_dp01_ckpt_epoch_292.pth``; else ``$ANOMALIB_KD_WEIGHTS``, torch hub's
            checkpoints folder, the official VMamba release download.
        shared_students: one decoder for both students (official code, default) or two (paper).
        tau_low, tau_high: diversity thresholds (official 0.75 / 0.30; tune per dataset).
        lambda_kr, alpha, beta, lambda_div: loss weights (official 0.02, 0.02, 0.05, 0.5).
        prp_cosine: L_prp's cosine term, ``"paper"`` (default, beta (1 - cos)) or ``"official"`` (+cos: the
            official code minimises the similarity, pushing S2 away from the targets in angle; a sign
            bug against the paper's equation, kept as an option. See docs/fidelity.md).
        lr, beta1, beta2: Adam (official 2e-3, 0.5, 0.999).
        lr_min_ratio: cosine schedule floor as a fraction of ``lr`` (official 0.1).
        lr_t_max: cosine period in epochs, stepped per epoch. Default 40, the official script's (over its
            100 epochs the learning rate falls to the floor at epoch 40 and climbs back to ``lr`` at 80; the
            paper's numbers come from it). ``None``: one half cosine over the trainer's ``max_steps`` (per
            step) or else ``max_epochs`` (per epoch).
        vmamba_depths, vmamba_dims: VMamba teacher configuration (default VMamba-Tiny; change for tests only).
        sigma: Gaussian smoothing of the anomaly map.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
            The default pre-processor resizes to 256x256; any multiple of 32 works.
        wrn_weights_path: deprecated name of ``weights_path``.
    """

    quantization_recipe = QuantizationRecipe(
        ("post_processor", "model", "model.anomaly_map_generator*", "SS2D"),
        reason="map head, blur, post-processing and VMamba's selective scan stay float",
    )  # INT8 export

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.racm_in1k",
        pre_trained: bool = True,
        weights_path: str | None = None,
        vmamba_weights_path: str | None = None,
        shared_students: bool = True,
        tau_low: float = 0.75,
        tau_high: float = 0.30,
        lambda_kr: float = 0.02,
        alpha: float = 0.02,
        beta: float = 0.05,
        lambda_div: float = 0.5,
        prp_cosine: str = "paper",
        lr: float = 2e-3,
        beta1: float = 0.5,
        beta2: float = 0.999,
        lr_min_ratio: float = 0.1,
        lr_t_max: int | None = 40,
        vmamba_depths: Sequence[int] = (2, 2, 9, 2),
        vmamba_dims: Sequence[int] = (96, 192, 384, 768),
        sigma: float = 4.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        wrn_weights_path: str | None = None,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.pre_trained = pre_trained
        self.weights_path = renamed_argument(
            "PDD", "weights_path", weights_path, "wrn_weights_path", wrn_weights_path
        )
        self.vmamba_weights_path = vmamba_weights_path
        self.lr = lr
        self.betas = (beta1, beta2)
        self.lr_min_ratio = lr_min_ratio
        self.lr_t_max = lr_t_max
        self.model = PDDModel(
            backbone=backbone,
            shared_students=shared_students,
            vmamba_depths=tuple(vmamba_depths),
            vmamba_dims=tuple(vmamba_dims),
            sigma=sigma,
        )
        self.check_pre_processor_size()  # a Resize to a non-multiple of 32 fails here, named
        self.loss = PDDLoss(
            lambda_kr=lambda_kr,
            alpha=alpha,
            beta=beta,
            lambda_div=lambda_div,
            tau_low=tau_low,
            tau_high=tau_high,
            prp_cosine=prp_cosine,
        )

    def on_train_start(self) -> None:
        """Load both teachers once (after any checkpoint restore: resuming needs no file)."""
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            wrn, vmamba = self.model.load_pretrained(self.weights_path, self.vmamba_weights_path)
            logger.info("PDD teachers initialised from %s and %s", wrn, vmamba)
        elif not self.pre_trained:
            logger.warning("PDD trains with randomly initialised teachers (pre_trained=False).")

    def _schedule(self) -> tuple[str, int]:
        """(interval, T_max) of the cosine schedule."""
        if self.lr_t_max is not None:
            return "epoch", int(self.lr_t_max)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            return "step", int(trainer.max_steps)
        if trainer is not None and trainer.max_epochs is not None and trainer.max_epochs > 0:
            return "epoch", int(trainer.max_epochs)
        return "epoch", DEFAULT_SCHEDULE_EPOCHS

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam over adapters, MPA and students with a cosine schedule down to ``lr_min_ratio * lr``."""
        parameters = [p for module in self.model.trainable_modules() for p in module.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)
        interval, t_max = self._schedule()
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(t_max, 1), eta_min=self.lr * self.lr_min_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """L = lambda_kr L_kr + L_prp + lambda_div L_div on the normal training images."""
        del args, kwargs
        outputs = self.model.features(batch.image)
        losses = self.loss(outputs["targets"], outputs["s2"], outputs["s1"])
        loss = losses["loss"]
        self.check_finite_loss(loss, "loss", "Try a lower --model.lr or check the input images.")
        batch_size = len(batch.image)
        for name in ("kr", "prp", "div"):
            self.log(
                f"{name}_loss", losses[name].detach(), on_step=False, on_epoch=True, batch_size=batch_size
            )
        self.log(
            "train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        return {"loss": loss}
