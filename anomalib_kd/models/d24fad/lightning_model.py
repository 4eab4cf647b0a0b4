"""D24FAD: Dual Distillation for Few-Shot Anomaly Detection, as an anomalib model.

Paper: "Dual Distillation for Few-Shot Anomaly Detection" (ICLR 2026, arXiv 2603.01713).

Training is episodic (leave-one-task-out): each batch item is a query and K normal supports of a
*training* task (:class:`anomalib_kd.data.fewshot.FewShotTasks`, ``mode="episodic"``). The loss is
``lambda * L_tsd + L_ssd`` (teacher-student distillation on the queries, student self-distillation
of the queries onto the learn-to-weight combination of their supports), Adam betas (0.5, 0.999).

At test time the model needs the K supports of the *target* task. They come, in this order, from:

1. :meth:`D24FAD.set_supports` (a tensor, a list of files or a folder) or ``support_dir``;
2. otherwise ``trainer.datamodule.support_images()`` when testing/predicting with ``FewShotTasks``;
3. otherwise the supports stored in a loaded checkpoint.

The supports' student features are buffers, so ``anomalib export`` gives a single-input model for
that task. A new task needs no retraining, only new supports; but an exported model keeps the
supports it was exported with: changing supports requires a re-export.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd.data.fewshot import FewShotTasks
    >>> from anomalib_kd.models.d24fad import D24FAD
    >>> datamodule = FewShotTasks(root="datasets/kdbench", target="brick", k_shot=4)
    >>> engine = Engine(max_epochs=5)
    >>> engine.train(D24FAD(pre_trained=False), datamodule=datamodule)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.utils.image import read_image
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin

from .loss import D24FADLoss
from .torch_model import D24FADModel

logger = logging.getLogger(__name__)

__all__ = ["D24FAD"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _support_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        msg = f"Support folder {folder} does not exist."
        raise FileNotFoundError(msg)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        msg = f"Support folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})."
        raise FileNotFoundError(msg)
    return files


class D24FAD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Dual distillation (TSD + SSD with learn-to-weight) for few-shot anomaly detection.

    Args:
        backbone: timm name of the frozen teacher (torchvision's ImageNet WRN50-2, as the official code).
        pre_trained: load the teacher's ImageNet weights from a local file at the start of training
            (never downloads; see ``weights_path``).
        weights_path: the local weights file; else ``$ANOMALIB_KD_WEIGHTS`` or timm's cache is searched.
        lambda_tsd: weight of the teacher-student loss (paper 0.1).
        learn_to_weight: learn-to-weight support weights (``False``: uniform 1/K).
        loss_mode: ``"global"`` (official: cosine over flattened features) or ``"pixel"`` (paper).
        score_mode: image score ``"max"`` of the map (official) or ``"mean"`` (paper).
        sigma: Gaussian smoothing of the anomaly map.
        imagenet_normalize: ImageNet normalisation inside the model (official code: none, ``False``).
        lr: Adam learning rate (official 1e-4, constant).
        beta1, beta2: Adam betas (official 0.5, 0.999).
        support_dir: folder of the target task's K support images (all images in it are used, after
            the pre-processor's transform). Overrides the datamodule's supports.
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
            The default pre-processor resizes to 128x128 (the paper's size); give your own for another.
    """

    quantization_recipe = QuantizationRecipe(
        ("post_processor", "model", "model.anomaly_map_generator*", "model.learn_to_weight*"),
        reason="map head, post-processing and the support weighting over baked supports stay float",
    )  # INT8 export

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        pre_trained: bool = True,
        weights_path: str | None = None,
        lambda_tsd: float = 0.1,
        learn_to_weight: bool = True,
        loss_mode: str = "global",
        score_mode: str = "max",
        sigma: float = 4.0,
        imagenet_normalize: bool = True,
        lr: float = 1e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        support_dir: str | None = None,
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
        self.lr = lr
        self.betas = (beta1, beta2)
        self.support_dir = support_dir
        self.model = D24FADModel(
            backbone=backbone,
            learn_to_weight=learn_to_weight,
            score_mode=score_mode,
            sigma=sigma,
            imagenet_normalize=imagenet_normalize,
        )
        self.loss = D24FADLoss(lambda_tsd=lambda_tsd, mode=loss_mode)
        # True once the user chose the supports (set_supports / support_dir): then a datamodule's
        # supports do not replace them.
        self._user_supports = False

    default_image_size = (128, 128)

    # -- supports ---------------------------------------------------------------------------------

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        transform = getattr(self.pre_processor, "transform", None) if self.pre_processor else None
        return transform(images) if transform is not None else images

    def set_supports(self, supports: torch.Tensor | str | Path | Sequence[str | Path]) -> None:
        """Set the K support (normal) images of the task to inspect; no retraining needed.

        Args:
            supports: raw images (K, 3, H, W) in [0, 1], a folder of images, or a list of image files.
                The pre-processor's transform is applied here, as it is to queries.
        """
        if isinstance(supports, torch.Tensor):
            images = supports.unsqueeze(0) if supports.dim() == 3 else supports
            transformed = self._transform(images.float())
        else:
            files = (
                _support_files(Path(supports))
                if isinstance(supports, str | Path)
                else [Path(p) for p in supports]
            )
            if not files:
                msg = "set_supports got an empty list of support images."
                raise ValueError(msg)
            transformed = torch.cat(
                [self._transform(read_image(f, as_tensor=True).unsqueeze(0)) for f in files]
            )
        self.model.set_supports(transformed.to(self.model.pretrained_loaded.device))
        self._user_supports = True
        logger.info(
            "D24FAD supports set: %d image(s) of size %s.", self.model.k_shot, tuple(transformed.shape[-2:])
        )

    def _prepare_supports(self, required: bool = True) -> None:
        """Find the supports for evaluation (see the module docstring) and refresh their features."""
        if not self._user_supports and self.support_dir:
            self.set_supports(self.support_dir)
        if not self._user_supports:
            trainer = getattr(self, "_trainer", None)
            datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
            if datamodule is not None and hasattr(datamodule, "support_images"):
                images = datamodule.support_images()
                self.model.set_supports(self._transform(images).to(self.model.pretrained_loaded.device))
                logger.info(
                    "D24FAD uses the %d supports of task '%s' from the datamodule.",
                    self.model.k_shot,
                    getattr(datamodule, "target", "?"),
                )
        if not self.model.has_supports:
            if not required:
                return
            msg = (
                "D24FAD needs K normal support images of the task to evaluate: pass --model.support_dir "
                "<folder>, call model.set_supports(...), or use the FewShotTasks datamodule."
            )
            raise RuntimeError(msg)
        self.model.refresh_support_features()

    def on_fit_start(self) -> None:
        """Take the target's supports now, so every checkpoint holds them (even without validation)."""
        self._prepare_supports(required=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store support features that match the weights being saved (export from a checkpoint)."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if self.model.has_supports and state is not None:
            self.model.refresh_support_features()
            state["model.support_images"] = self.model.support_images.detach().clone()
            for level, feature in enumerate(self.model.support_features):
                state[f"model.support_features_{level}"] = feature.detach().clone()

    def on_validation_start(self) -> None:
        self._prepare_supports()

    def on_test_start(self) -> None:
        self._prepare_supports()

    def on_predict_start(self) -> None:
        self._prepare_supports()

    def to_onnx(self, *args: Any, **kwargs: Any) -> Path:
        """Export with the supports baked in (their features are refreshed first)."""
        if self.support_dir and not self._user_supports:
            self.set_supports(self.support_dir)
        if not self.model.has_supports:
            msg = "D24FAD export needs supports: call set_supports(...) or give support_dir before exporting."
            raise RuntimeError(msg)
        self.model.refresh_support_features()
        return super().to_onnx(*args, **kwargs)

    # -- training ---------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Load the local pretrained teacher once (a restored checkpoint needs no file)."""
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            path = self.model.load_pretrained(self.weights_path)
            logger.info("D24FAD teacher initialised from %s", path)
        elif not self.pre_trained:
            logger.warning("D24FAD trains with a randomly initialised teacher (pre_trained=False).")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the student decoder and the L2W projections (official lr 1e-4, betas (0.5, 0.999))."""
        parameters = [*self.model.student.parameters(), *self.model.learn_to_weight.parameters()]
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One episodic step: L = lambda * L_tsd(queries) + L_ssd(queries vs weighted supports)."""
        del args, kwargs
        support = getattr(batch, "support", None)
        if support is None:
            msg = (
                "D24FAD trains on episodes (a query and K supports per item): use "
                "anomalib_kd.data.fewshot.FewShotTasks with mode='episodic' (got a batch without supports)."
            )
            raise TypeError(msg)
        batch_size, n_support = support.shape[:2]
        support = self._transform(support.flatten(0, 1))
        support = support.reshape(batch_size, n_support, *support.shape[1:])
        outputs = self.model.training_features(batch.image, support)
        loss, tsd, ssd = self.loss(outputs["teacher"], outputs["student"], outputs["weighted"])
        self.check_finite_loss(loss, "loss", "Try a lower --model.lr or check the input images.")
        self.log("tsd_loss", tsd.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("ssd_loss", ssd.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(
            "train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        return {"loss": loss}
