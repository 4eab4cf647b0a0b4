"""Shared anomaly scoring: per-level cosine-distance maps and SciPy-compatible Gaussian smoothing.

Used by URD, PDD and D24FAD (the reverse-distillation map of RD4AD, URD Sec. 3.4) and by DHKD (its
smoothing only). The official code of all four smooths with ``scipy.ndimage.gaussian_filter`` with its
defaults (``truncate=4``, ``mode="reflect"``). SciPy's ``reflect`` is the *half-sample symmetric*
extension (``d c b a | a b c d | d c b a``, numpy's ``pad(mode="symmetric")``), whereas torch's and
anomalib's ``GaussianBlur2d`` ``"reflect"`` is SciPy's ``mirror`` (``d c b | a b c d | c b a``). The two
differ within one kernel radius of the border, so :class:`GaussianSmoothing` pads half-sample
symmetrically with plain slicing, flipping and concatenation (ONNX / OpenVINO exportable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = [
    "AnomalyMapGenerator",
    "GaussianSmoothing",
    "cosine_distance_map",
    "gaussian_kernel1d",
    "pad_symmetric",
]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's ``gaussian_filter`` kernel, float64: ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1.

    Defined on ``|x| <= r`` with ``r = int(truncate sigma + 0.5)`` (length ``2 r + 1``).
    """
    if not (math.isfinite(sigma) and sigma > 0):
        msg = f"Gaussian sigma must be a positive finite number, got {sigma}"
        raise ValueError(msg)
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def pad_symmetric(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Pad ``x`` by ``pad`` on both ends of ``dim`` with the half-sample symmetric extension.

    Same values as ``numpy.pad(mode="symmetric")`` and SciPy's ``mode="reflect"``, also when ``pad``
    exceeds the size (the extension then repeats with period ``2 n``: each step mirrors about the current
    edge, which is always a multiple of ``n`` from the original edge).
    """
    remaining = pad
    while remaining > 0:
        size = x.shape[dim]
        step = min(remaining, size)
        head = x.narrow(dim, 0, step).flip(dim)
        tail = x.narrow(dim, size - step, step).flip(dim)
        x = torch.cat([head, x, tail], dim=dim)
        remaining -= step
    return x


class GaussianSmoothing(nn.Module):
    """Per-channel 2-D Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter(x, sigma)`` on H, W.

    Separable: pad half-sample symmetrically by the radius ``r = int(truncate sigma + 0.5)`` (16 at the
    official sigma 4, 8 at sigma 2), convolve with the 1-D kernel along H, then along W. Shape-preserving
    on ``(B, C, H, W)``; any ``H, W >= 1``.

    The kernel follows ``sigma`` and is not saved in checkpoints; the 2-D ``kernel`` buffer that the
    earlier anomalib ``GaussianBlur2d`` saved is accepted and dropped on loading.

    Args:
        sigma: standard deviation in pixels (official 4 for URD, PDD, D24FAD; 2 for DHKD).
        truncate: kernel radius in sigmas (SciPy's default 4).
    """

    def __init__(self, sigma: float, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        self.truncate = truncate
        kernel = gaussian_kernel1d(sigma, truncate).to(torch.float32)
        self.radius = (kernel.numel() - 1) // 2
        self.kernel: torch.Tensor
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Smooth ``(B, C, H, W)`` over H and W, channel by channel."""
        if x.dim() != 4:
            msg = f"GaussianSmoothing expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}"
            raise ValueError(msg)
        batch, channels, height, width = x.shape
        kernel = self.kernel.to(x.dtype)
        out = x.reshape(batch * channels, 1, height, width)
        out = F.conv2d(pad_symmetric(out, self.radius, dim=2), kernel.view(1, 1, -1, 1))
        out = F.conv2d(pad_symmetric(out, self.radius, dim=3), kernel.view(1, 1, 1, -1))
        return out.reshape(batch, channels, height, width)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints written with anomalib's GaussianBlur2d hold its (derived) 2-D kernel; drop it.
        state_dict.pop(prefix + "kernel", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, truncate={self.truncate}, radius={self.radius}, border=symmetric"


def cosine_distance_map(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``1 - cos`` over channels: ``(B, C, h, w) x 2 -> (B, 1, h, w)``."""
    return 1 - F.cosine_similarity(student, target, dim=1, eps=1e-8).unsqueeze(1)


class AnomalyMapGenerator(nn.Module):
    """``A = G_sigma * sum_l Up(1 - cos(S_l, T_l))`` (URD Sec. 3.4); models score ``max(A)`` or ``mean(A)``.

    ``Up`` is bilinear with ``align_corners=True`` to the input image size (taken at run time, so a
    checkpoint restored with another pre-processor size still gives full-resolution maps); ``G_sigma`` is
    :class:`GaussianSmoothing` (SciPy ``gaussian_filter`` with its ``reflect`` border, as the official code).

    Args:
        sigma: smoothing sigma in pixels of the input image (official 4).
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.blur = GaussianSmoothing(sigma)

    def forward(
        self,
        student_features: Sequence[torch.Tensor],
        target_features: Sequence[torch.Tensor],
        image_size: Sequence[int] | torch.Size,
    ) -> torch.Tensor:
        """Return the ``(B, 1, H, W)`` anomaly map for features ``(B, C_l, h_l, w_l)`` per level."""
        anomaly_map = sum(
            F.interpolate(
                cosine_distance_map(s, t), size=tuple(image_size), mode="bilinear", align_corners=True
            )
            for s, t in zip(student_features, target_features, strict=True)
        )
        return self.blur(anomaly_map)
