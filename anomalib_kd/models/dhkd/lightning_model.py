"""DHKD: Dual-Heterogeneous Knowledge Distillation with Mamba, as an anomalib model.

Paper: Xu et al., "Beyond feature mapping: Dual-heterogeneous knowledge distillation with mamba for
industrial anomaly detection", Expert Systems with Applications, 2026 (code: github.com/Gilbert-Et/DHKD).

Training (official ``Train.py``): a frozen PDN-medium teacher whose outputs are normalised per channel
with statistics computed over the training set before training; the student (encoder, FCCM, a
convolutional SCMM decoder and a Mamba HSTM decoder) minimises ``L_L + L_G + 2 L_D`` with Adam
(1e-4, weight decay 1e-5) and a x0.1 step at 76 % of the steps (the paper: 100 000 iterations, step at
76 000; the official code: 95 % of 180 000), batch size 1. The 0.9 / 0.995 quantiles of
both maps normalise them in inference and in exported graphs; as in the official code they are fitted
on held-out normal images that are never tested (spec 1.2, 1.7): by default a seeded 10 % of the
training images, removed from training (the official MVTec AD split), or a folder of normal images
(MVTec LOCO's ``validation``) or a datamodule's validation split built from such images.

Defaults for users:
    - GPU: ``--trainer.max_steps 100000`` (the paper; the official code's default is 180000 with its
      evaluated checkpoint at 140000, see docs/fidelity.md) with ``--data.train_batch_size 1`` (required).
    - CPU: the Mamba decoder dominates (four SS2D scans, the last over 64x64 = 4096 positions); a step at
      256 px takes seconds. Use e.g. ``--trainer.max_steps 2000`` or ``--model.image_size 128`` (a smaller,
      non-official student) for experiments. The learning-rate step is scaled to whatever ``max_steps`` is.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd.models.dhkd import DHKD
    >>> model = DHKD(weights_path="pretrained_teacher_medium.pth")  # doctest: +SKIP
    >>> Engine(max_steps=100000).train(model, datamodule=...)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.folder import FolderDataset
from anomalib.data.utils import Split, ValSplitMode
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Compose, Normalize
from tqdm.auto import tqdm

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin
from anomalib_kd.components.weights import renamed_argument

from .loss import DHKDLoss
from .torch_model import DHKDModel

logger = logging.getLogger(__name__)

__all__ = ["DHKD"]

# torch.quantile refuses inputs above 2**24 elements; larger pools are subsampled (as EfficientAd does).
_MAX_QUANTILE_ELEMENTS = 2**24

# Validation splits made only of images that are never tested (MVTec LOCO's validation folder, a part of
# the training set); the others (same_as_test, from_test) are test images.
_UNTESTED_VAL_SPLITS = (ValSplitMode.FROM_DIR, ValSplitMode.FROM_TRAIN, ValSplitMode.SYNTHETIC)

# Attribute set on a datamodule whose training set DHKD has split, so that a second fit reuses the split.
HELD_OUT_ATTRIBUTE = "dhkd_quantile_data"


class DHKD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Dual-Heterogeneous Knowledge Distillation (DHKD) with Mamba.

    Args:
        weights_path: PDN-medium teacher weights file (anomalib's ``pretrained_teacher_medium.pth``,
            EfficientAD's ``teacher_medium*.pth`` or the output of
            ``python -m anomalib_kd.tools.distill_pdn``). ``None``: ``$ANOMALIB_KD_WEIGHTS``, then
            anomalib's EfficientAd cache, then anomalib's EfficientAd download (unless
            ``ANOMALIB_KD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``). Loaded at the start of training.
        pre_trained: load the teacher weights. ``False`` trains with a random teacher (tests only).
        image_size: square input size (official 256; the architecture is built for it). The default
            pre-processor resizes to it.
        out_channels: teacher/student feature channels (384).
        dropout: dropout of the logical decoder (0.2).
        loss_weights: ``(alpha, beta, gamma)`` of ``L_L, L_G, L_D`` (paper/code: 1, 1, 2).
        lr: Adam learning rate (1e-4).
        weight_decay: Adam weight decay (1e-5).
        lr_step_fraction: the learning rate is multiplied by ``lr_gamma`` after this fraction of the
            training steps, stepped every iteration. Default 0.76, the paper's (step at 76 000 of 100 000
            iterations); the official code's default is 0.95 of 180 000 (docs/fidelity.md).
        lr_gamma: learning-rate factor of that step (0.1).
        quantile_low: lower map-normalisation quantile ``qa`` (0.9).
        quantile_high: upper map-normalisation quantile ``qb`` (0.995).
        quantile_source: normal images the quantiles are fitted on, never test images (official code:
            MVTec LOCO's ``validation`` folder, or a seeded 10 % of MVTec AD's training images):
            ``"holdout"`` (default): a seeded ``quantile_holdout`` share of the datamodule's training set,
            removed from training (and from the teacher statistics); needs an anomalib datamodule.
            ``"val"``: the datamodule's validation split, allowed only when it holds no test images
            (``val_split_mode`` ``from_dir`` as MVTec LOCO's validation folder, ``from_train``,
            ``synthetic``; label-0 images only). A folder path: every image in it (e.g.
            ``.../mvtec_loco/breakfast_box/validation/good``); training then uses all training images.
        quantile_holdout: share of the training images held out for ``"holdout"`` (official 0.1; at least 1
            image, at least 1 left for training).
        quantile_seed: seed of that split (official 3402).
        smoothing_sigma: Gaussian sigma of the anomaly map at input resolution (official 2; 0: none).
            The image score is the maximum of the unsmoothed map, as in the official code.
        chunk_size: chunk length of the pure-PyTorch selective scan (``None``: automatic).
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
        teacher_weights: deprecated name of ``weights_path``.
    """

    quantization_recipe = QuantizationRecipe(
        ("post_processor", "model", "GaussianBlur2d", "SS2D"),
        reason="map head, quantile normalisation, blur, post-processing and the selective scan stay float",
    )  # INT8 export

    def __init__(
        self,
        weights_path: str | None = None,
        pre_trained: bool = True,
        image_size: int = 256,
        out_channels: int = 384,
        dropout: float = 0.2,
        loss_weights: Sequence[float] = (1.0, 1.0, 2.0),
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_step_fraction: float = 0.76,
        lr_gamma: float = 0.1,
        quantile_low: float = 0.9,
        quantile_high: float = 0.995,
        quantile_source: str = "holdout",
        quantile_holdout: float = 0.1,
        quantile_seed: int = 3402,
        smoothing_sigma: float = 2.0,
        chunk_size: int | None = None,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        teacher_weights: str | None = None,
    ) -> None:
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.weights_path = renamed_argument(
            "DHKD", "weights_path", weights_path, "teacher_weights", teacher_weights
        )
        self.pre_trained = pre_trained
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_step_fraction = lr_step_fraction
        self.lr_gamma = lr_gamma
        self.quantile_low = quantile_low
        self.quantile_high = quantile_high
        if not 0 < quantile_holdout < 1:
            msg = f"DHKD quantile_holdout is a share of the training set in (0, 1), got {quantile_holdout}."
            raise ValueError(msg)
        self.quantile_source = str(quantile_source)
        self.quantile_holdout = quantile_holdout
        self.quantile_seed = quantile_seed
        self.quantile_data: AnomalibDataset | None = None  # the held-out normals (set up for fitting)
        self._quantiles_step: int | None = None  # global step of the weights the quantiles were fitted with
        self.model = DHKDModel(
            out_channels=out_channels,
            dropout=dropout,
            image_size=image_size,
            smoothing_sigma=smoothing_sigma,
            chunk_size=chunk_size,
        )
        self.check_pre_processor_size()  # a Resize to another size than image_size fails here, named
        self.loss = DHKDLoss(tuple(loss_weights))

    # --- training ------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before fitting: choose the quantile images; for ``"holdout"``, remove them from the training set.

        Runs after the datamodule's own ``setup`` and before the optimizer and the train loader exist, so
        the held-out images never reach a training step or the teacher statistics. The split is a seeded
        permutation of the training samples' order (``quantile_seed``), the same on every DDP rank.
        """
        super().setup(stage)
        if stage != TrainerFn.FITTING:
            return
        datamodule = getattr(self._trainer, "datamodule", None)
        if self.quantile_source == "holdout":
            self.quantile_data = self._hold_out_training_images(datamodule)
        elif self.quantile_source == "val":
            mode = getattr(datamodule, "val_split_mode", None)
            if mode is None or ValSplitMode(mode) not in _UNTESTED_VAL_SPLITS:
                msg = (
                    f"DHKD quantile_source='val' needs a validation split without test images "
                    f"(val_split_mode in {[m.value for m in _UNTESTED_VAL_SPLITS]}), but the datamodule's is "
                    f"{getattr(mode, 'value', mode)!r}: its validation images are test images. Use "
                    "quantile_source='holdout' or a folder of normal images."
                )
                raise ValueError(msg)
            self.quantile_data = None  # read from the datamodule's val loader
        else:
            folder = Path(self.quantile_source).expanduser()
            if not folder.is_dir():
                msg = (
                    f"DHKD quantile_source must be 'holdout', 'val' or a folder of normal images; "
                    f"{self.quantile_source!r} is not a folder."
                )
                raise ValueError(msg)
            self.quantile_data = FolderDataset(name="dhkd_quantiles", normal_dir=folder, split=Split.TRAIN)
            if len(self.quantile_data) == 0:
                msg = f"DHKD quantile_source folder {folder} holds no images."
                raise ValueError(msg)

    def _hold_out_training_images(self, datamodule: object) -> AnomalibDataset:
        """Split the datamodule's training set into training and held-out normals (once per datamodule)."""
        held_out = getattr(datamodule, HELD_OUT_ATTRIBUTE, None)
        if held_out is not None:  # split by an earlier fit on this datamodule: do not split again
            return held_out
        train_data = getattr(datamodule, "train_data", None)
        if not isinstance(train_data, AnomalibDataset):
            msg = (
                "DHKD fits its map-normalisation quantiles on training images held out from training "
                "(quantile_source='holdout'), which needs an anomalib datamodule (trainer.fit(model, "
                "datamodule=...)). With plain dataloaders, pass quantile_source=<folder of normal images>."
            )
            raise ValueError(msg)
        count = len(train_data)
        held = max(1, round(self.quantile_holdout * count))
        if count - held < 1:
            msg = (
                f"DHKD holds out {held} of {count} training images for its quantiles "
                f"(quantile_holdout={self.quantile_holdout}) and none would be left to train on."
            )
            raise ValueError(msg)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.quantile_seed)).tolist()
        held_out = train_data.subsample(sorted(order[:held]))
        datamodule.train_data = train_data.subsample(sorted(order[held:]))
        setattr(datamodule, HELD_OUT_ATTRIBUTE, held_out)
        logger.info("DHKD: %d of %d training images held out for the map quantiles.", held, count)
        return held_out

    def on_train_start(self) -> None:
        """Check the batch size, load the teacher (once), compute its channel statistics over the training
        images (once; the held-out quantile images are not among them).

        Both are skipped when restored from a checkpoint (buffers ``pretrained_loaded`` /
        ``teacher_stats_set``), so resuming needs neither the weights file nor a new pass.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "train_batch_size", None)
        if batch_size is None:
            batch_size = getattr(self.trainer.train_dataloader, "batch_size", None)
        if batch_size != 1:
            # As anomalib's EfficientAd: the paper and the official code train with batch size 1.
            msg = f"train_batch_size for DHKD should be 1 (paper and official code), got {batch_size}."
            raise ValueError(msg)
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and _contains(transform, Normalize):
            msg = "DHKD normalises inside the model: remove Normalize from the pre-processor transform."
            raise ValueError(msg)
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            path = self.model.load_teacher(self.weights_path)
            logger.info("DHKD teacher initialised from %s", path)
        elif not self.pre_trained:
            logger.warning("DHKD trains with a randomly initialised teacher (pre_trained=False).")
        if not bool(self.model.teacher_stats_set):
            mean, std = self.teacher_channel_mean_std(self._train_loader())
            self.model.set_teacher_stats(mean, std)

    def _train_loader(self) -> Iterable:
        """The training images in a fixed order (identical sums on every DDP rank)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        train_data = getattr(datamodule, "train_data", None)
        if isinstance(train_data, AnomalibDataset):
            return self._eval_loader(train_data)
        return self.trainer.train_dataloader

    def _eval_loader(self, dataset: AnomalibDataset) -> DataLoader:
        """A plain (not distributed) loader over ``dataset``: every rank reads all of it."""
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = 1 if isinstance(dataset, FolderDataset) else getattr(datamodule, "eval_batch_size", 1)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=getattr(datamodule, "num_workers", 0),
            collate_fn=dataset.collate_fn,
        )

    def _quantile_loader(self) -> Iterable:
        if self.quantile_data is not None:
            return self._eval_loader(self.quantile_data)
        return self.trainer.datamodule.val_dataloader()  # quantile_source="val", checked in setup

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
        """While fitting, fit the quantiles with the current weights before scoring the validation images.

        The post-processor's thresholds fitted in this validation then see maps normalised with these
        weights' quantiles. Outside fitting (``validate``/``test`` of a trained model) the stored quantiles
        are used unchanged: they never come from the images being evaluated.
        """
        if self.trainer.sanity_checking or self.trainer.state.fn != TrainerFn.FITTING:
            if not bool(self.model.quantiles_set):
                logger.warning("DHKD: map-normalisation quantiles not fitted yet; maps stay un-normalised.")
            return
        self.fit_quantiles()

    def on_train_epoch_end(self) -> None:
        """Fit the quantiles on the final weights when no validation did (e.g. ``max_steps`` ended the epoch
        early). Runs before Lightning's checkpoint callback saves, so the checkpoint holds them."""
        if self._quantiles_step != self.global_step:
            self.fit_quantiles()

    def on_train_end(self) -> None:
        """Last guard: the stored quantiles belong to the final weights."""
        if self._quantiles_step != self.global_step:
            self.fit_quantiles()

    def fit_quantiles(self) -> None:
        """``(qa_l, qb_l, qa_g, qb_g)`` over the quantile images (``quantile_source``), stored in the model.

        Under DDP every rank computes them over the full held-out set (a plain loader, no distributed
        sampler) from the same synchronised weights, so the statistic is the same on every rank.
        """
        quantiles = self.map_norm_quantiles(self._quantile_loader())
        if quantiles is None:
            logger.warning("DHKD: no good (label 0) quantile images; maps stay un-normalised.")
            return
        self.model.set_quantiles(*quantiles)
        self._quantiles_step = self.global_step

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
