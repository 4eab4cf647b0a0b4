"""Synthetic anomalies (Perlin masks + texture source) shared by the distillation models.

A thin layer over anomalib's :class:`PerlinAnomalyGenerator` that makes the texture source explicit:

* ``texture_dir`` given (e.g. DTD's ``images/`` folder): textures are images from that folder, as in
  DRAEM / URD.
* no ``texture_dir``: the **documented fallback** is anomalib's own Perlin-noise texture (the rotated
  Perlin field, intensity-shifted and colour-augmented), which needs no download. This is logged once.

Optionally the Perlin mask is restricted to the object's **foreground** (URD's official synthesis does
this for object categories, so that synthetic defects land on the object and not on the background):
``M <- M * FG`` with ``FG`` computed from the clean image by GrabCut or an inverted Otsu threshold.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "FOREGROUND_METHODS",
    "URD_MVTEC_FOREGROUND",
    "AnomalySynthesizer",
    "ForegroundMasker",
    "grabcut_foreground",
    "otsu_inverted_foreground",
]


def grabcut_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground of an ``(H, W, 3)`` uint8 RGB image by GrabCut (URD's official object masks).

    As the official code: the rectangle is the whole image minus a one-pixel border,
    ``(1, 1, W - 1, H - 1)``, 11 iterations initialised from the rectangle, and the definite and
    probable foreground labels are kept. The image is given to OpenCV in BGR order, as the official
    code reads it with ``cv2.imread``.
    """
    height, width = image.shape[:2]
    labels = np.zeros((height, width), np.uint8)
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    bgr = np.ascontiguousarray(image[..., ::-1])
    cv2.grabCut(
        bgr, labels, (1, 1, width - 1, height - 1), background_model, foreground_model, 11,
        cv2.GC_INIT_WITH_RECT,
    )  # fmt: skip
    return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def otsu_inverted_foreground(image: np.ndarray) -> np.ndarray:
    """Foreground of an ``(H, W, 3)`` uint8 RGB image: grey values below Otsu's threshold.

    URD's official masks for MVTec ``capsule`` and ``screw`` (a dark object on a bright background).
    """
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    _, mask = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return mask > 0


FOREGROUND_METHODS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grabcut": grabcut_foreground,
    "otsu_inverted": otsu_inverted_foreground,
}

# URD's official choice per MVTec AD category (every VisA category uses GrabCut). Categories not
# listed (carpet, grid, leather, tile, wood, transistor) get no foreground restriction.
URD_MVTEC_FOREGROUND: dict[str, str] = {
    **dict.fromkeys(("bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper"), "grabcut"),
    "capsule": "otsu_inverted",
    "screw": "otsu_inverted",
}


class ForegroundMasker:
    """Foreground masks ``(B, 1, H, W)`` in {0, 1} of a batch of images in [0, 1].

    The official code computes each training image's mask once; here masks are cached by image content
    (a hash of the uint8 image), so every distinct training image is segmented once and an augmented
    variant simply gets its own mask. GrabCut costs ~0.3 s for a 256 px image on one CPU core, paid once
    per training image.

    Args:
        method: ``"grabcut"`` or ``"otsu_inverted"``.
        max_cached: cache size in images (packed bits: 8 KiB each at 256 px).
    """

    def __init__(self, method: str, max_cached: int = 20_000) -> None:
        if method not in FOREGROUND_METHODS:
            msg = f"Unknown foreground method {method!r}; choose one of {sorted(FOREGROUND_METHODS)}."
            raise ValueError(msg)
        self.method = method
        self.segment = FOREGROUND_METHODS[method]
        self.max_cached = max_cached
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._warned_empty = False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Masks for ``images`` (B, 3, H, W) in [0, 1]."""
        arrays = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        masks = [self._mask(array) for array in arrays]
        return torch.from_numpy(np.stack(masks)).unsqueeze(1).to(device=images.device, dtype=images.dtype)

    def _mask(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        packed = self._cache.get(key)
        if packed is None:
            mask = self.segment(image)
            if not mask.any() and not self._warned_empty:
                # Not an error (an image may show no object), but if every image does, URD trains with no
                # synthetic anomalies at all: say so once.
                self._warned_empty = True
                logger.warning(
                    "Foreground masks (%s) found no object in a %dx%d training image: no synthetic anomaly "
                    "is placed on such images. If your images have no distinct object on a background, "
                    "turn the restriction off (URD: --model.foreground_mask null).",
                    self.method,
                    width,
                    height,
                )
            packed = np.packbits(mask, axis=None)
            self._cache[key] = packed
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return np.unpackbits(packed, count=height * width).reshape(height, width).astype(bool)


class AnomalySynthesizer(nn.Module):
    """Blend Perlin-shaped texture patches into clean images: x~ = x(1-M) + b T M + (1-b) x M.

    Args:
        texture_dir: folder searched recursively for texture images; ``None`` uses Perlin-noise textures.
        probability: chance that a given image is augmented (URD: 1.0, every sample).
        blend_factor: range of the texture opacity ``b`` (URD: 1 - beta with beta ~ U[0, 0.8)).
        augment_texture: apply anomalib's random colour/geometry augmentation (three ops, as DRAEM) to the
            texture. URD's official code uses the DTD texture as it is.
        foreground: restrict the anomaly masks to the foreground found by ``"grabcut"`` or
            ``"otsu_inverted"`` (see :class:`ForegroundMasker`); ``None``: anywhere in the image.
    """

    _fallback_logged = False

    def __init__(
        self,
        texture_dir: str | Path | None = None,
        probability: float = 1.0,
        blend_factor: tuple[float, float] = (0.2, 1.0),
        augment_texture: bool = True,
        foreground: str | None = None,
    ) -> None:
        super().__init__()
        if texture_dir is not None:
            folder = Path(texture_dir).expanduser()
            if not folder.is_dir():
                msg = (
                    f"texture_dir {folder} is not a directory (give DTD's images/ folder or leave it unset)."
                )
                raise FileNotFoundError(msg)
        self.generator = PerlinAnomalyGenerator(
            anomaly_source_path=texture_dir,
            probability=probability,
            blend_factor=blend_factor,
        )
        if texture_dir is not None and not self.generator.anomaly_source_paths:
            msg = f"texture_dir {texture_dir} holds no images."
            raise FileNotFoundError(msg)
        if not augment_texture:
            self.generator.augmenters = nn.Identity()
        self.texture_dir = texture_dir
        self.augment_texture = augment_texture
        self.foreground_masker = ForegroundMasker(foreground) if foreground is not None else None

    @property
    def foreground(self) -> str | None:
        """The foreground method in use (``None``: no restriction)."""
        return self.foreground_masker.method if self.foreground_masker is not None else None

    @foreground.setter
    def foreground(self, method: str | None) -> None:
        if method != self.foreground:
            self.foreground_masker = ForegroundMasker(method) if method is not None else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return augmented images (B, C, H, W) in [0, 1] and their masks (B, 1, H, W) in {0, 1}."""
        if self.texture_dir is None and not AnomalySynthesizer._fallback_logged:
            AnomalySynthesizer._fallback_logged = True
            logger.info(
                "No texture_dir given: synthetic anomalies use Perlin-noise textures (no download). "
                "Pass texture_dir=<DTD images folder> for the paper's DTD textures.",
            )
        with torch.no_grad():
            augmented, masks = self.generator(images)
            if self.foreground_masker is not None:
                # M <- M * FG, then x~ = x outside M (the generator leaves x unchanged outside its mask).
                masks = masks * self.foreground_masker(images)
                augmented = torch.where(masks > 0, augmented, images)
        return augmented.clamp(0, 1), masks
