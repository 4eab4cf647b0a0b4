"""DHKD: Dual-Heterogeneous Knowledge Distillation with Mamba, as an anomalib model.

Paper: Xu et al., "Beyond feature mapping: Dual-heterogeneous knowledge distillation with mamba for
industrial anomaly detection", Expert Systems with Applications, 2026 (code: github.com/Gilbert-Et/DHKD).

Training (official ``Train.py``): a frozen PDN-medium teacher whose outputs are normalised per channel
with statistics computed over the training set before training; the student (encoder, FCCM, a
convolutional SCMM decoder and a Mamba HSTM decoder) minimises ``L_L + L_G + 2 L_D`` with Adam
(1e-4, weight decay 1e-5) and a x0.1 step at 95 % of the steps. Before each validation the 0.9 / 0.995
quantiles of both maps over the good validation images are stored; they normalise the maps in
inference and in exported graphs.

Defaults for users:
    - GPU, as the paper: ``--trainer.max_steps 180000`` (official default; the evaluated checkpoint is
      140000) with ``--data.train_batch_size 1``.
    - CPU: the Mamba decoder dominates (four SS2D scans, the last over 64x64 = 4096 positions); a step at
      256 px takes seconds. Use e.g. ``--trainer.max_steps 2000`` or ``--model.image_size 128`` (a smaller,
      non-official student) for experiments. The learning-rate step is scaled to whatever ``max_steps`` is.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd.models.dhkd import DHKD
    >>> model = DHKD(teacher_weights="pretrained_teacher_medium.pth")  # doctest: +SKIP
    >>> Engine(max_steps=70000).train(model, datamodule=...)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Compose, Normalize
from tqdm.auto import tqdm

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin

from .loss import DHKDLoss
from .torch_model import DHKDModel

logger = logging.getLogger(__name__)

__all__ = ["DHKD"]

# torch.quantile refuses inputs above 2**24 elements; larger pools are subsampled (as EfficientAd does).
_MAX_QUANTILE_ELEMENTS = 2**24


class DHKD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Dual-Heterogeneous Knowledge Distillation (DHKD) with Mamba.

    Args:
        teacher_weights: local PDN-medium weights file (anomalib's ``pretrained_teacher_medium.pth``,
            EfficientAD's ``teacher_medium*.pth`` or the output of
            ``python -m anomalib_kd.tools.distill_pdn``).
            ``None``: look in ``$ANOMALIB_KD_WEIGHTS`` and anomalib's EfficientAd cache. Never downloaded;
            loaded at the start of training.
        pre_trained: load the teacher weights. ``False`` trains with a random teacher (tests only).
        image_size: square input size (official 256; the architecture is built for it). The default
            pre-processor resizes to it.
        out_channels: teacher/student feature channels (384).
        dropout: dropout of the logical decoder (0.2).
        loss_weights: ``(alpha, beta, gamma)`` of ``L_L, L_G, L_D`` (paper/code: 1, 1, 2).
        lr: Adam learning rate (1e-4).
        weight_decay: Adam weight decay (1e-5).
        lr_step_fraction: the learning rate is multiplied by ``lr_gamma`` after this fraction of the
            training steps (official: StepLR at ``0.95 * train_steps``, stepped every iteration).
        lr_gamma: learning-rate factor of that step (0.1).
        quantile_low: lower map-normalisation quantile ``qa`` (0.9).
        quantile_high: upper map-normalisation quantile ``qb`` (0.995).
        smoothing_sigma: Gaussian sigma of the anomaly map at input resolution (official 2; 0: none).
            The image score is the maximum of the unsmoothed map, as in the official code.
        chunk_size: chunk length of the pure-PyTorch selective scan (``None``: automatic).
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
    """

    quantization_recipe = QuantizationRecipe(
        ("post_processor", "model", "GaussianBlur2d", "SS2D"),
        reason="map head, quantile normalisation, blur, post-processing and the selective scan stay float",
    )  # INT8 export

    def __init__(
        self,
        teacher_weights: str | None = None,
        pre_trained: bool = True,
        image_size: int = 256,
        out_channels: int = 384,
        dropout: float = 0.2,
        loss_weights: Sequence[float] = (1.0, 1.0, 2.0),
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_step_fraction: float = 0.95,
        lr_gamma: float = 0.1,
        quantile_low: float = 0.9,
        quantile_high: float = 0.995,
        smoothing_sigma: float = 2.0,
        chunk_size: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.teacher_weights = None if teacher_weights is None else str(teacher_weights)
        self.pre_trained = pre_trained
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_step_fraction = lr_step_fraction
        self.lr_gamma = lr_gamma
        self.quantile_low = quantile_low
        self.quantile_high = quantile_high
        self.model = DHKDModel(
            out_channels=out_channels,
            dropout=dropout,
            image_size=image_size,
            smoothing_sigma=smoothing_sigma,
            chunk_size=chunk_size,
        )
        self.loss = DHKDLoss(tuple(loss_weights))

    # --- training ------------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Load the teacher (once), then compute its channel statistics over the training set (once).

        Both are skipped when restored from a checkpoint (buffers ``pretrained_loaded`` /
        ``teacher_stats_set``), so resuming needs neither the weights file nor a new pass.
        """
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and _contains(transform, Normalize):
            msg = "DHKD normalises inside the model: remove Normalize from the pre-processor transform."
            raise ValueError(msg)
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            path = self.model.load_teacher(self.teacher_weights)
            logger.info("DHKD teacher initialised from %s", path)
        elif not self.pre_trained:
            logger.warning("DHKD trains with a randomly initialised teacher (pre_trained=False).")
        if not bool(self.model.teacher_stats_set):
            mean, std = self.teacher_channel_mean_std(self._train_loader())
            self.model.set_teacher_stats(mean, std)

    def _train_loader(self) -> Iterable:
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule.train_dataloader() if datamodule is not None else self.trainer.train_dataloader

    def _val_loader(self) -> Iterable:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.val_dataloader()
        loaders = self.trainer.val_dataloaders
        return loaders[0] if isinstance(loaders, list | tuple) else loaders

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The pre-processor's transform, for loops that read a dataloader outside Lightning's hooks."""
        transform = getattr(self.pre_processor, "transform", None)
        images = images.to(self.device)
        return transform(images) if transform is not None else images

    @torch.no_grad()
    def teacher_channel_mean_std(self, dataloader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the teacher output over a dataset (spec 1.3, as EfficientAD).

        ``mu_c`` is the mean over all images and positions, ``sigma_c = sqrt(E[(T - mu_c)^2])`` (equal to
        the official per-image average for equal-size images). Accumulated in float64.
        """
        total = sum_ = sum_sq = None
        for batch in tqdm(dataloader, desc="DHKD: teacher channel mean & std", leave=True):
            features = self.model.teacher_raw(self._prepare(batch.image)).double()
            if sum_ is None:
                total = 0
                sum_ = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
                sum_sq = torch.zeros_like(sum_)
            total += features[:, 0].numel()
            sum_ += features.sum(dim=(0, 2, 3))
            sum_sq += (features**2).sum(dim=(0, 2, 3))
        if sum_ is None:
            msg = (
                "DHKD needs training images to compute the teacher statistics, but the train loader is empty."
            )
            raise ValueError(msg)
        mean = sum_ / total
        std = (sum_sq / total - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float(), std.float()

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam on the student; StepLR(x``lr_gamma``) at ``lr_step_fraction`` of the steps, per step."""
        optimizer = torch.optim.Adam(
            self.model.student.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        num_steps = self._planned_steps()
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=max(1, int(self.lr_step_fraction * num_steps)), gamma=self.lr_gamma
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _planned_steps(self) -> int:
        """Training steps Lightning will run: the earlier of ``max_steps`` and ``max_epochs`` epochs."""
        trainer = self.trainer
        steps = float(trainer.estimated_stepping_batches)  # max_steps when set; sets up the train data
        batches = float(trainer.num_training_batches)
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
            steps = min(steps, math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs)
        if not math.isfinite(steps) or steps < 1:
            msg = "DHKD's learning-rate schedule needs a finite --trainer.max_steps or --trainer.max_epochs."
            raise ValueError(msg)
        return int(steps)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """``L = alpha L_L + beta L_G + gamma L_D`` (spec 1.5)."""
        del args, kwargs
        losses = self.loss(*self.model(batch.image))
        loss = losses["loss"]
        self.check_finite_loss(
            loss,
            "loss",
            f"(L_L={losses['loss_local'].item()}, L_G={losses['loss_global'].item()}, "
            f"L_D={losses['loss_distill'].item()}). Check the teacher weights file and the input images, "
            "or lower --model.lr.",
        )
        for name, value in losses.items():
            self.log(
                f"train_{name}" if name != "loss" else "train_loss", value.detach(), prog_bar=name == "loss"
            )
        return {"loss": loss}

    # --- validation / scoring --------------------------------------------------------------------------

    def on_validation_start(self) -> None:
        """Store the ``qa``/``qb`` quantiles of both maps over the good validation images (spec 1.7)."""
        quantiles = self.map_norm_quantiles(self._val_loader())
        if quantiles is None:
            logger.warning("DHKD: no good (label 0) validation images; maps stay un-normalised.")
            return
        self.model.set_quantiles(*quantiles)

    @torch.no_grad()
    def map_norm_quantiles(self, dataloader: Iterable) -> tuple[torch.Tensor, ...] | None:
        """``(qa_l, qb_l, qa_g, qb_g)`` over all feature-resolution pixels of the good images' raw maps."""
        was_training = self.model.training
        self.model.eval()
        maps_l: list[torch.Tensor] = []
        maps_g: list[torch.Tensor] = []
        try:
            for batch in tqdm(dataloader, desc="DHKD: map-normalisation quantiles", leave=True):
                good = batch.gt_label == 0 if batch.gt_label is not None else None
                if good is not None and not bool(good.any()):
                    continue
                images = self._prepare(batch.image)
                if good is not None:
                    images = images[good.to(images.device)]
                map_l, map_g = self.model.raw_maps(images)
                maps_l.append(map_l.flatten().cpu())
                maps_g.append(map_g.flatten().cpu())
        finally:
            self.model.train(was_training)
        if not maps_l:
            return None
        out: list[torch.Tensor] = []
        for maps in (maps_l, maps_g):
            values = torch.cat(maps)
            if values.numel() > _MAX_QUANTILE_ELEMENTS:
                generator = torch.Generator().manual_seed(0)
                values = values[torch.randperm(values.numel(), generator=generator)[:_MAX_QUANTILE_ELEMENTS]]
            out += [torch.quantile(values, self.quantile_low), torch.quantile(values, self.quantile_high)]
        return tuple(out)


def _contains(transform: object, kind: type) -> bool:
    """Whether ``transform`` is, or (as a ``Compose``) holds, a transform of type ``kind``."""
    if isinstance(transform, kind):
        return True
    return isinstance(transform, Compose) and any(_contains(t, kind) for t in transform.transforms)
