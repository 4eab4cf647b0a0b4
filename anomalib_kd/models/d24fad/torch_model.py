"""D24FAD networks: frozen teacher, RD4AD student decoder, learn-to-weight over K supports.

Paper: "Dual Distillation for Few-Shot Anomaly Detection" (ICLR 2026). Follows the official code where
it differs from the paper (see ``pdd_d24fad_official_code.md`` part 2): no bottleneck (the decoder
reads the teacher's layer4 output), softmax over the K supports with one weight per support image.

Shapes at 128x128 (WRN50-2): teacher [256x32x32, 512x16x16, 1024x8x8] + layer4 2048x4x4; student
decoder [256x32x32, 512x16x16, 1024x8x8].

Supports: at inference the K support images' student features are module **buffers** (set with
:meth:`D24FADModel.set_supports`), so ``forward`` takes only the query and the exported graph is
single-input, with the supports baked in as constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import get_decoder
from torch import nn

from anomalib_kd.components.anomaly_map import AnomalyMapGenerator
from anomalib_kd.components.backbones import create_feature_extractor, load_pretrained_backbone
from anomalib_kd.components.inputs import check_finite_images
from anomalib_kd.components.normalization import ImageNetNormalize

TEACHER_LAYERS = ("layer1", "layer2", "layer3", "layer4")
SCORE_MODES = ("max", "mean")
N_LEVELS = 3


class LearnToWeight(nn.Module):
    """Learn-to-weight (paper Eq. 4, official form): one softmax weight per support image and level.

    w = softmax_K( vec(q) . vec(phi(s_k)) / sqrt(C) ), phi a 1x1 conv (with bias) on the supports
    only; the weighted support is sum_k w_k s_k (values are the un-projected supports).

    Args:
        channels: channels of the student features, one projection per level.
        learned: ``False`` gives uniform weights 1/K (the paper's Eq. 2 without L2W).
    """

    def __init__(self, channels: Sequence[int], learned: bool = True) -> None:
        super().__init__()
        self.learned = learned
        self.projections = nn.ModuleList(nn.Conv2d(c, c, kernel_size=1, bias=True) for c in channels)

    def level(
        self, index: int, query: torch.Tensor, support: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (B, K) and weighted support (B, C, H, W) of one level.

        ``support`` is (B, K, C, H, W) (one support set per query, training) or (K, C, H, W) (one
        set shared by all queries, inference).
        """
        channels = query.shape[1]
        batch = query.shape[0]
        shared = support.dim() == 4
        n_support = support.shape[0] if shared else support.shape[1]
        flat_query = query.flatten(1)  # (B, D)
        if shared:
            values = support.flatten(1)  # (K, D)
            if self.learned:
                keys = self.projections[index](support).flatten(1)
                logits = flat_query @ keys.transpose(0, 1) / math.sqrt(channels)  # (B, K)
                weights = torch.softmax(logits, dim=1)
            else:
                weights = torch.full(
                    (batch, n_support), 1.0 / n_support, dtype=query.dtype, device=query.device
                )
            weighted = weights @ values  # (B, D)
        else:
            values = support.flatten(2)  # (B, K, D)
            if self.learned:
                keys = self.projections[index](support.flatten(0, 1)).reshape(values.shape)
                logits = torch.einsum("bkd,bd->bk", keys, flat_query) / math.sqrt(channels)
                weights = torch.softmax(logits, dim=1)
            else:
                weights = torch.full(
                    (batch, n_support), 1.0 / n_support, dtype=query.dtype, device=query.device
                )
            weighted = torch.einsum("bk,bkd->bd", weights, values)
        return weights, weighted.reshape(query.shape)

    def forward(
        self, query: Sequence[torch.Tensor], support: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: weighted supports and weights (each (B, K), summing to 1 over K)."""
        weights, weighted = [], []
        for index, (q, s) in enumerate(zip(query, support, strict=True)):
            w, ws = self.level(index, q, s)
            weights.append(w)
            weighted.append(ws)
        return weighted, weights


class D24FADModel(nn.Module):
    """Teacher-student network of D24FAD with baked-in supports for inference.

    Args:
        backbone: timm name of the frozen teacher (default torchvision's ImageNet WRN50-2, as the
            official code). Its ``layer4`` output feeds the de-ResNet student decoder.
        learn_to_weight: L2W weights (``False``: uniform 1/K).
        score_mode: image score from the anomaly map, ``"max"`` (official code) or ``"mean"`` (paper).
        sigma: Gaussian smoothing of the anomaly map (official 4).
        imagenet_normalize: normalise [0, 1] inputs with ImageNet statistics inside the model. Default
            ``False``: the official code feeds raw [0, 1] images, which produced the paper's numbers.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        learn_to_weight: bool = True,
        score_mode: str = "max",
        sigma: float = 4.0,
        imagenet_normalize: bool = False,
    ) -> None:
        super().__init__()
        if score_mode not in SCORE_MODES:
            msg = f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}."
            raise ValueError(msg)
        self.backbone = backbone
        self.score_mode = score_mode
        self.imagenet_normalize = imagenet_normalize
        self.teacher = create_feature_extractor(backbone, TEACHER_LAYERS, requires_grad=False)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.student = get_decoder(backbone.partition(".")[0])
        channels = list(self.teacher.out_dims[:N_LEVELS])
        self.learn_to_weight = LearnToWeight(channels, learned=learn_to_weight)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.normalize = ImageNetNormalize() if imagenet_normalize else nn.Identity()
        self.register_buffer("pretrained_loaded", torch.tensor(False))
        # Supports (pre-processed images and their student features); empty until set. Their shapes
        # follow the K and image size of the checkpoint being loaded (see _load_from_state_dict).
        self.register_buffer("support_images", torch.empty(0))
        for level in range(N_LEVELS):
            self.register_buffer(f"support_features_{level}", torch.empty(0))

    # -- weights / supports -----------------------------------------------------------------------

    def load_pretrained(self, weights_path: str | Path | None = None) -> Path:
        """Load local pretrained teacher weights (never downloads)."""
        path = load_pretrained_backbone(self.teacher, self.backbone, weights_path)
        self.pretrained_loaded.fill_(True)
        return path

    @property
    def has_supports(self) -> bool:
        return self.support_images.numel() > 0

    @property
    def k_shot(self) -> int:
        return int(self.support_images.shape[0]) if self.has_supports else 0

    @property
    def support_features(self) -> list[torch.Tensor]:
        return [getattr(self, f"support_features_{level}") for level in range(N_LEVELS)]

    def set_supports(self, images: torch.Tensor) -> None:
        """Store K pre-processed support images (K, 3, H, W) and compute their student features."""
        if images.dim() != 4 or images.shape[0] < 1 or images.shape[1] != 3:
            msg = (
                f"Support images must be a (K, 3, H, W) tensor with K >= 1, got shape {tuple(images.shape)}."
            )
            raise ValueError(msg)
        self.support_images = images.detach().to(self.pretrained_loaded.device, torch.float32).clone()
        self.refresh_support_features()

    @torch.no_grad()
    def refresh_support_features(self) -> None:
        """Recompute the supports' student features with the current weights (eval-mode BN)."""
        if not self.has_supports:
            return
        was_training = self.training
        self.eval()
        features = self.student_features(self.support_images)
        for level, feature in enumerate(features):
            setattr(self, f"support_features_{level}", feature.detach().clone())
        self.train(was_training)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Accept support buffers of any K / size (a fresh model's are empty).

        Buffers set during ``test``/``predict`` are inference tensors, which cannot be copied into in
        place (``train``/``validate`` from a checkpoint after a test): they are replaced too.
        """
        names = ["support_images", *(f"support_features_{level}" for level in range(N_LEVELS))]
        for name in names:
            key = prefix + name
            current = getattr(self, name)
            if key in state_dict and (state_dict[key].shape != current.shape or current.is_inference()):
                setattr(self, name, torch.empty_like(state_dict[key], device=self.pretrained_loaded.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- features ---------------------------------------------------------------------------------

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen teacher: [f1, f2, f3, e4] (always eval mode, no gradient)."""
        return list(self.teacher(self.normalize(images)).values())

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Student decoder on the teacher's layer4: [s1, s2, s3] (finest first)."""
        return self._decode(self.teacher_features(images))

    def _decode(self, teacher: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        student = self.student(teacher[-1])
        if student[0].shape[-2:] != teacher[0].shape[-2:]:
            msg = (
                f"D24FAD input size must be a multiple of 32 (teacher layer1 {tuple(teacher[0].shape[-2:])}, "
                f"decoder {tuple(student[0].shape[-2:])}); set the pre-processor's Resize accordingly."
            )
            raise ValueError(msg)
        return student

    def training_features(self, query: torch.Tensor, support: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Everything the losses need for a batch of episodes.

        Args:
            query: (B, 3, H, W) queries.
            support: (B, K, 3, H, W) supports, K per query.

        Returns:
            ``teacher`` [f1..f3] and ``student`` [s1..s3] of the queries, ``weighted`` supports and the
            L2W ``weights`` (B, K) per level. As the official code, the decoder runs once on the
            queries and once per support slot k (separate BN batch statistics in train mode).
        """
        batch, n_support = support.shape[:2]
        teacher = self.teacher_features(query)
        student = self._decode(teacher)
        support_layer4 = self.teacher_features(support.flatten(0, 1))[-1]
        support_layer4 = support_layer4.reshape(batch, n_support, *support_layer4.shape[1:])
        per_slot = [self.student(support_layer4[:, k]) for k in range(n_support)]
        support_student = [
            torch.stack([slot[level] for slot in per_slot], dim=1) for level in range(N_LEVELS)
        ]
        weighted, weights = self.learn_to_weight(student, support_student)
        return {"teacher": teacher[:N_LEVELS], "student": student, "weighted": weighted, "weights": weights}

    # -- inference --------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Anomaly map (B, 1, H, W): Gaussian(sum_l Up(1 - cos(q_l, weighted support_l))); score max/mean."""
        if not self.has_supports:
            msg = (
                "D24FAD has no support images. Set them with D24FAD.set_supports(...) / --model.support_dir, "
                "or test with the FewShotTasks datamodule, which provides the target's supports."
            )
            raise RuntimeError(msg)
        check_finite_images(images, "D24FAD")  # a NaN score would be labelled normal
        return self.predict(images, self.support_features)

    def predict(self, images: torch.Tensor, support_features: Sequence[torch.Tensor]) -> InferenceBatch:
        """Score queries against given support student features [(K, C_l, h_l, w_l)] (the swappable export).

        The Gaussian smoothing runs per image (the official code's scipy call also blurs across the
        batch axis, mixing neighbouring test images: a bug, not reproduced).
        """
        query = self.student_features(images)
        if tuple(query[0].shape[-2:]) != tuple(support_features[0].shape[-2:]):
            msg = (
                f"D24FAD query images are {tuple(images.shape[-2:])}, but the supports were encoded from "
                f"images of another size (support features {tuple(support_features[0].shape[-2:])}, query "
                f"features {tuple(query[0].shape[-2:])}): queries and supports must have the same size "
                "(the pre-processor resizes both)."
            )
            raise ValueError(msg)
        weighted, _ = self.learn_to_weight(query, support_features)
        anomaly_map = self.anomaly_map_generator(query, weighted, images.shape[-2:])
        if self.score_mode == "mean":
            pred_score = anomaly_map.mean(dim=(-2, -1))
        else:
            pred_score = torch.amax(anomaly_map, dim=(-2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
