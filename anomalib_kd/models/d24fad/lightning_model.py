"""D24FAD: Dual Distillation for Few-Shot Anomaly Detection, as an anomalib model.

Paper: "Dual Distillation for Few-Shot Anomaly Detection" (ICLR 2026, arXiv 2603.01713).

Training is episodic: each batch item is a query and K normal supports. Two sources of episodes:

* :class:`anomalib_kd.data.fewshot.FewShotTasks` (``mode="episodic"``): cross-task, leave-one-task-out
  episodes. This is the paper's protocol and the documented default for few-shot use.
* any one-class anomalib datamodule (``MVTecAD``, ``Folder``, ``KDBench``, ``Textures``, ...): the model
  forms *in-category* episodes itself. Each training image is a query and its K supports are other
  normal training images of the same datamodule, drawn as ``FewShotTasks`` draws them (seeded by
  ``support_seed`` and the query, fixed for the run, never the query itself). This is this package's
  extension, not the paper's protocol.

The loss is ``lambda * L_tsd + L_ssd`` (teacher-student distillation on the queries, student
self-distillation of the queries onto the learn-to-weight combination of their supports), Adam betas
(0.5, 0.999).

At test time the model needs K supports of the task being inspected; never test images. They come,
in this order, from:

1. :meth:`D24FAD.set_supports` (a tensor, a list of files or a folder) or ``support_dir``;
2. the datamodule's ``support_images()`` (``FewShotTasks``: the target's K-shot normals);
3. the datamodule's training normals: K of them drawn by ``support_seed`` (one-class datamodules);
4. the supports stored in a loaded checkpoint (e.g. ``anomalib predict`` on a folder).

The supports' student features are buffers, so ``anomalib export`` gives a single-input model for that
task (the default). For supports that change after deployment, :meth:`D24FAD.export_swappable` (CLI:
``python -m anomalib_kd.tools.d24fad_supports``) exports a graph whose support features are inputs,
fed from a small ``.npz`` file computed from any support folder.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_kd.data.fewshot import FewShotTasks
    >>> from anomalib_kd.models.d24fad import D24FAD
    >>> datamodule = FewShotTasks(root="datasets/kdbench", target="brick", k_shot=4)
    >>> engine = Engine(max_epochs=5)
    >>> engine.train(D24FAD(pre_trained=False), datamodule=datamodule)  # doctest: +SKIP

    One category, in-category episodes (command line)::

        anomalib train --model anomalib_kd.D24FAD --model.k_shot 4 --data MVTecAD --data.category bottle
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.utils import LabelName
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe
from anomalib_kd.components.module import DistillationModuleMixin
from anomalib_kd.data.fewshot import _task_rng, sample_supports
from anomalib_kd.data.image import image_files, read_image

from .loss import D24FADLoss
from .pre_processing import LanczosResize, register_for_checkpoints
from .torch_model import D24FADModel

logger = logging.getLogger(__name__)

__all__ = ["D24FAD"]

# Seed keys of the support draws (as FewShotTasks: key 1 is a task's test-time K-shot draw).
TEST_SUPPORT_KEY = 1
EPISODE_SUPPORT_KEY = 2
SUPPORT_CACHE_SIZE = 4096  # pre-processed support images kept in memory during in-category training

register_for_checkpoints()


def load_support_image(path: str | Path) -> torch.Tensor:
    """Read one support image as a (3, H, W) float tensor in [0, 1] (16-bit files at full range).

    The single place where D24FAD reads support files (``set_supports``, ``support_dir``, in-category
    episodes, test-time supports from training normals): the package's shared reader.
    """
    return read_image(path).as_subclass(torch.Tensor)


class D24FAD(OpenVINOQuantizationMixin, DistillationModuleMixin, AnomalibModule):
    """Dual distillation (TSD + SSD with learn-to-weight) for few-shot anomaly detection.

    Args:
        backbone: timm name of the frozen teacher (torchvision's ImageNet WRN50-2, as the official code).
        pre_trained: load the teacher's ImageNet weights at the start of training (see ``weights_path``).
        weights_path: the weights file; else ``$ANOMALIB_KD_WEIGHTS``, timm's caches, then timm's own
            download (unless ``ANOMALIB_KD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``).
        lambda_tsd: weight of the teacher-student loss (paper 0.1).
        learn_to_weight: learn-to-weight support weights (``False``: uniform 1/K).
        loss_mode: ``"global"`` (official: cosine over flattened features) or ``"pixel"`` (paper).
        score_mode: image score ``"max"`` of the map (official) or ``"mean"`` (paper).
        sigma: Gaussian smoothing of the anomaly map (per image; official 4).
        imagenet_normalize: ImageNet normalisation inside the model. Default ``False``: the official code
            feeds raw [0, 1] images (its numbers come from that).
        lr: Adam learning rate (official 1e-4, constant).
        beta1, beta2: Adam betas (official 0.5, 0.999).
        support_dir: folder of the target task's K support images (all images in it are used, after
            the pre-processor's transform). Overrides the datamodule's supports.
        k_shot: K supports per query for in-category episodes and for test-time supports drawn from a
            one-class datamodule's training normals (``FewShotTasks`` brings its own ``k_shot``).
        support_seed: seed of those draws (as ``FewShotTasks.support_seed``).
        pre_processor, post_processor, evaluator, visualizer: anomalib components (``True``: defaults).
            The default pre-processor resizes to 128x128 (the paper's size) with PIL's Lanczos filter, as
            the official code; give your own (or ``configure_pre_processor(size)``) for another size.
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
        imagenet_normalize: bool = False,
        lr: float = 1e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        support_dir: str | None = None,
        k_shot: int = 4,
        support_seed: int = 0,
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
        if k_shot < 1:
            msg = f"k_shot must be >= 1, got {k_shot}."
            raise ValueError(msg)
        self.k_shot = k_shot
        self.support_seed = support_seed
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
        # In-category episodes: sorted normal training images and their pre-processed tensors.
        self._episode_pool: list[str] | None = None
        self._support_cache: dict[str, torch.Tensor] = {}

    default_image_size = (128, 128)

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Lanczos resize only (official: PIL Lanczos to 128 px, then [0, 1], no normalisation)."""
        return PreProcessor(transform=LanczosResize(image_size or cls.default_image_size))

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
            files = image_files(supports) if isinstance(supports, str | Path) else [Path(p) for p in supports]
            if not files:
                msg = "set_supports got an empty list of support images."
                raise ValueError(msg)
            transformed = torch.cat([self._transform(load_support_image(f).unsqueeze(0)) for f in files])
        self.model.set_supports(transformed.to(self.model.pretrained_loaded.device))
        self._user_supports = True
        logger.info(
            "D24FAD supports set: %d image(s) of size %s.", self.model.k_shot, tuple(transformed.shape[-2:])
        )

    def _datamodule(self) -> Any:
        trainer = getattr(self, "_trainer", None)
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _training_dataset(self) -> Any:
        """The one-class training dataset (has ``samples``), or ``None``."""
        datamodule = self._datamodule()
        dataset = getattr(datamodule, "train_data", None) if datamodule is not None else None
        if dataset is None:
            trainer = getattr(self, "_trainer", None)
            loader = getattr(trainer, "train_dataloader", None) if trainer is not None else None
            dataset = getattr(loader, "dataset", None)
        samples = getattr(dataset, "samples", None)
        return dataset if samples is not None and "image_path" in samples else None

    def _category(self) -> str:
        datamodule = self._datamodule()
        dataset = self._training_dataset()
        for owner in (datamodule, dataset):
            for name in ("category", "name"):
                value = getattr(owner, name, None)
                if isinstance(value, str) and value:
                    return value
        return ""

    def training_normals(self) -> list[str]:
        """Sorted normal image paths of the training set (the pool of in-category supports)."""
        dataset = self._training_dataset()
        if dataset is None:
            return []
        samples = dataset.samples
        if "label_index" in samples:
            samples = samples[samples.label_index == int(LabelName.NORMAL)]
        return sorted(str(path) for path in samples.image_path)

    def _prepare_supports(self, required: bool = True) -> None:
        """Find the supports for evaluation (see the module docstring) and refresh their features.

        Under DDP every rank takes the same supports (a seeded draw from the full list of training normals,
        not from the rank's shard) and computes their features with the same synchronised weights, so the
        support features are identical on every rank and equal to a single process's.
        """
        if not self._user_supports and self.support_dir:
            self.set_supports(self.support_dir)
        if not self._user_supports:
            datamodule = self._datamodule()
            normals = self.training_normals()
            if datamodule is not None and hasattr(datamodule, "support_images"):
                images = datamodule.support_images()
                self.model.set_supports(self._transform(images).to(self.model.pretrained_loaded.device))
                logger.info(
                    "D24FAD uses the %d supports of task '%s' from the datamodule.",
                    self.model.k_shot,
                    getattr(datamodule, "target", "?"),
                )
            elif normals:
                paths = self.test_support_paths(normals)
                images = torch.cat([self._transform(load_support_image(p).unsqueeze(0)) for p in paths])
                self.model.set_supports(images.to(self.model.pretrained_loaded.device))
                logger.info(
                    "D24FAD uses %d supports drawn (seed %d) from the %d training normals of '%s'.",
                    len(paths),
                    self.support_seed,
                    len(normals),
                    self._category(),
                )
        if not self.model.has_supports:
            if not required:
                return
            msg = (
                "D24FAD needs K normal support images of the task to evaluate: pass --model.support_dir "
                "<folder>, call model.set_supports(...), or evaluate with a datamodule that has training "
                "images (its normals are used) or FewShotTasks."
            )
            raise RuntimeError(msg)
        self.model.refresh_support_features()

    def test_support_paths(self, normals: Sequence[str]) -> list[str]:
        """K training normals drawn as ``FewShotTasks.support_paths`` draws a task's K-shot supports."""
        if self.k_shot > len(normals):
            msg = (
                f"k_shot={self.k_shot} is larger than the {len(normals)} normal training images of "
                f"'{self._category()}'; lower --model.k_shot or give --model.support_dir."
            )
            raise ValueError(msg)
        rng = _task_rng(self.support_seed, self._category(), TEST_SUPPORT_KEY)
        return [normals[i] for i in sample_supports(len(normals), self.k_shot, rng)]

    def on_fit_start(self) -> None:
        """Take the target's supports now, so every checkpoint holds them (even without validation)."""
        self._episode_pool = None
        self._support_cache = {}
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

    def export_swappable(
        self,
        export_root: str | Path,
        export_type: str = "openvino",
        input_size: tuple[int, int] | None = None,
    ) -> Path:
        """Export a graph whose support features are inputs (see :mod:`.export`); returns the model file.

        ``supports.npz`` (this model's current supports) is written next to it; swap supports by
        replacing that file (``python -m anomalib_kd.tools.d24fad_supports features``), no re-export.
        """
        from .export import export_swappable

        if self.support_dir and not self._user_supports:
            self.set_supports(self.support_dir)
        return export_swappable(self, export_root, export_type, input_size)

    # -- training ---------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        """Load the pretrained teacher once (a restored checkpoint needs no file)."""
        if self.pre_trained and not bool(self.model.pretrained_loaded):
            path = self.model.load_pretrained(self.weights_path)
            logger.info("D24FAD teacher initialised from %s", path)
        elif not self.pre_trained:
            logger.warning("D24FAD trains with a randomly initialised teacher (pre_trained=False).")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the student decoder and the L2W projections (official lr 1e-4, betas (0.5, 0.999))."""
        parameters = [*self.model.student.parameters(), *self.model.learn_to_weight.parameters()]
        return torch.optim.Adam(parameters, lr=self.lr, betas=self.betas)

    def episode_support_paths(self, query: str, pool: Sequence[str]) -> list[str]:
        """The K supports of ``query``: other normals of the pool, fixed per query by ``support_seed``."""
        index = {path: i for i, path in enumerate(pool)}.get(str(query))
        rng = _task_rng(
            self.support_seed, self._category(), EPISODE_SUPPORT_KEY, -1 if index is None else index
        )
        return [pool[i] for i in sample_supports(len(pool), self.k_shot, rng, exclude=index)]

    def _support_tensor(self, path: str, augmentations: Any) -> torch.Tensor:
        """One pre-processed support (3, h, w); cached when the dataset has no (random) augmentations."""
        cached = self._support_cache.get(path)
        if cached is not None:
            return cached
        image = load_support_image(path)
        if augmentations is not None:
            image = augmentations(image)
        tensor = self._transform(image.unsqueeze(0))[0]
        if augmentations is None and len(self._support_cache) < SUPPORT_CACHE_SIZE:
            self._support_cache[path] = tensor
        return tensor

    def in_category_supports(self, batch: Batch) -> torch.Tensor:
        """(B, K, 3, h, w) pre-processed supports for a one-class batch (in-category episodes)."""
        dataset = self._training_dataset()
        if dataset is None:
            msg = (
                "D24FAD trains on episodes (a query and K supports per item). Use a datamodule whose "
                "training set lists its images (anomalib's MVTecAD, Folder, ...: in-category episodes) or "
                "anomalib_kd.data.fewshot.FewShotTasks with mode='episodic' (the paper's protocol); got a "
                "batch without supports and no training dataset to draw them from."
            )
            raise TypeError(msg)
        if self._episode_pool is None:
            self._episode_pool = self.training_normals()
            if self.k_shot > len(self._episode_pool) - 1:
                msg = (
                    f"k_shot={self.k_shot} is too large for in-category episodes: the training set of "
                    f"'{self._category()}' has {len(self._episode_pool)} normal images and each query needs "
                    f"K others (at most {len(self._episode_pool) - 1}). Lower --model.k_shot."
                )
                raise ValueError(msg)
        paths = getattr(batch, "image_path", None)
        if paths is None or len(paths) != batch.image.shape[0]:
            msg = "D24FAD in-category episodes need batch.image_path (the query files) to draw supports."
            raise TypeError(msg)
        augmentations = getattr(dataset, "augmentations", None)
        return torch.stack(
            [
                torch.stack(
                    [
                        self._support_tensor(p, augmentations)
                        for p in self.episode_support_paths(q, self._episode_pool)
                    ]
                )
                for q in paths
            ]
        )

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One episodic step: L = lambda * L_tsd(queries) + L_ssd(queries vs weighted supports)."""
        del args, kwargs
        support = getattr(batch, "support", None)
        if support is None:  # a one-class datamodule: in-category episodes
            support = self.in_category_supports(batch).to(batch.image.device, batch.image.dtype)
        else:  # FewShotTasks episodes: raw supports, pre-processed here as the queries were
            batch_size, n_support = support.shape[:2]
            support = self._transform(support.flatten(0, 1))
            support = support.reshape(batch_size, n_support, *support.shape[1:])
        batch_size = support.shape[0]
        outputs = self.model.training_features(batch.image, support)
        loss, tsd, ssd = self.loss(outputs["teacher"], outputs["student"], outputs["weighted"])
        self.check_finite_loss(loss, "loss", "Try a lower --model.lr or check the input images.")
        self.log("tsd_loss", tsd.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        self.log("ssd_loss", ssd.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        self.log(
            "train_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size
        )
        return {"loss": loss}
