"""DHKD networks: frozen PDN teacher, student encoder, FCCM, structural (Lnet) and logical (Gnet) decoders.

Paper: Xu et al., "Beyond feature mapping: Dual-heterogeneous knowledge distillation with mamba for
industrial anomaly detection", ESWA 2026. Shapes at 256x256 (spec part 1.4.5)::

    teacher T            384x64x64   (normalised per channel: T^ = (T - mu) / sigma)
    encoder f_S          384x64x64
    FCCM f_C             384x32x32 -> 384x16x16
    Lnet f_L             384x32x32 -> 384x64x64
    Gnet f_G             64x1x1 -> 128x1x1 -> HSTM at 4, 8, 32, 64 -> 384x64x64

Eval forward returns ``InferenceBatch(pred_score, anomaly_map)``: structural map ``mean_c (T^ - f_L)^2``
and logical map ``mean_c (f_G - f_S)^2``, each quantile-normalised (``0.1 (S - qa) / (qb - qa)``), upsampled
to the input size; ``pred_score = max(0.5 S_l + 0.5 S_g)``; ``anomaly_map = G_sigma(S_l) + G_sigma(S_g)``
(the official TIFF map). Statistics are buffers, applied through ``torch.where`` (export-safe).
"""

from __future__ import annotations

from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.anomaly_map import GaussianSmoothing
from anomalib_kd.components.inputs import check_finite_images
from anomalib_kd.components.normalization import ImageNetNormalize

from .blocks import CCM, HSTM, SCMMBlock
from .teacher import build_teacher, load_teacher_weights

__all__ = [
    "FCCM",
    "DHKDModel",
    "DHKDStudent",
    "LogicalDecoder",
    "StructuralDecoder",
    "StudentEncoder",
]


def _conv_relu(in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding), nn.ReLU()]


class StudentEncoder(nn.Sequential):
    """Student encoder E: 6 convs + 2 max-pools, asymmetric to the teacher (spec 1.4.1; 4.55 M params)."""

    def __init__(self, out_channels: int = 384) -> None:
        super().__init__(
            *_conv_relu(3, 128, 4, padding=3),
            nn.MaxPool2d(2, stride=2, padding=1),
            *_conv_relu(128, 256, 4, padding=3),
            *_conv_relu(256, 256, 3, padding=1),
            nn.MaxPool2d(2, stride=2, padding=1),
            *_conv_relu(256, 512, 1),
            *_conv_relu(512, out_channels, 4),
            nn.Conv2d(out_channels, out_channels, 1),
        )


class FCCM(nn.Sequential):
    """FCCM (code ``decoder``): 4x4 s2 conv, 2x2 max-pool, ReLU, CCM (spec 1.4.2; 5.31 M params)."""

    def __init__(self, channels: int = 384) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
            nn.MaxPool2d(2, stride=2),
            nn.ReLU(),
            CCM(channels, growth=2),
        )


class StructuralDecoder(nn.Module):
    """Lnet (code ``decoderM`` + ``decoderM2``), spec 1.4.3; 5.91 M params.

    Bicubic x2 -> 3x3 conv -> ReLU -> bicubic to the encoder size -> 3x3 conv -> CCM = u;
    ``f_L = conv1x1(u + SCMM(u)) + u``.
    """

    def __init__(self, channels: int = 384) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.ccm = CCM(channels, growth=2)
        self.scmm = SCMMBlock(channels)
        self.project = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, output_size: tuple[int, int]) -> Tensor:
        height, width = x.shape[-2:]
        x = F.interpolate(x, size=(2 * height, 2 * width), mode="bicubic", align_corners=False)
        x = F.interpolate(self.act(self.conv1(x)), size=output_size, mode="bicubic", align_corners=False)
        u = self.ccm(self.conv2(x))
        return self.project(self.scmm(u)) + u


class LogicalDecoder(nn.Module):
    """Gnet (code ``decoderAEG`` + ``decoderAEG2``) with four HSTM blocks, spec 1.4.4; 11.38 M params.

    Global bottleneck (k16 conv to 64x1x1 at 256 px), 3x3 conv to 128, then bicubic upsampling to
    1/16, 1/8, 1/2 and 1/1 of the encoder size (4, 8, 32, 64 at 256 px), each followed by an HSTM and
    dropout; then 128 -> 256 (ReLU, dropout) -> 512 -> 384 (ReLU) -> 384 3x3 convs.
    """

    def __init__(
        self,
        channels: int = 384,
        bottleneck_kernel: int = 16,
        dropout: float = 0.2,
        d_state: int = 16,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.bottleneck = nn.Conv2d(channels, 64, kernel_size=bottleneck_kernel)
        self.widen = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.hstm = nn.ModuleList(HSTM(128, d_state=d_state, chunk_size=chunk_size) for _ in range(4))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Conv2d(128, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(256, 512, kernel_size=3, padding=1),
            nn.Conv2d(512, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    # Upsampling targets as fractions of the encoder map (official: 4, 8, 32, 64 for a 64x64 map).
    scale_divisors = (16, 8, 2, 1)

    def forward(self, x: Tensor, output_size: tuple[int, int]) -> Tensor:
        x = self.widen(self.bottleneck(x))
        for divisor, block in zip(self.scale_divisors, self.hstm, strict=True):
            size = (max(1, output_size[0] // divisor), max(1, output_size[1] // divisor))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            x = self.dropout(block(x))
        return self.head(x)


class DHKDStudent(nn.Module):
    """Student: shared encoder, FCCM, and the two heterogeneous decoders; returns ``(f_S, f_G, f_L)``."""

    def __init__(
        self,
        out_channels: int = 384,
        dropout: float = 0.2,
        image_size: int = 256,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if image_size % 16 or image_size < 64:
            msg = f"DHKD's input size must be a multiple of 16 and >= 64 (official: 256), got {image_size}"
            raise ValueError(msg)
        self.encoder = StudentEncoder(out_channels)
        self.fccm = FCCM(out_channels)
        self.structural = StructuralDecoder(out_channels)
        # f_C is image_size/16 wide; the official k16 bottleneck (256 px) reduces it to 1x1.
        self.logical = LogicalDecoder(
            out_channels, bottleneck_kernel=image_size // 16, dropout=dropout, chunk_size=chunk_size
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f_s = self.encoder(x)
        size = (int(f_s.shape[-2]), int(f_s.shape[-1]))
        f_c = self.fccm(f_s)
        return f_s, self.logical(f_c, size), self.structural(f_c, size)


class DHKDModel(nn.Module):
    """DHKD teacher + student with the statistics needed for scoring.

    Input: images in [0, 1] (resized, not normalised; the teacher ImageNet-normalises itself, the
    student gets ImageNet-normalised input here).

    Args:
        out_channels: feature channels of teacher and student (384).
        dropout: dropout rate of the logical decoder (0.2).
        image_size: square input size the student is built for (official 256: the logical decoder's
            global bottleneck kernel is ``image_size / 16``). Smaller sizes (multiples of 16, >= 64) give
            a cheaper model for CPU experiments and tests.
        smoothing_sigma: Gaussian sigma of the anomaly map at input resolution (official 2; 0 disables).
        chunk_size: chunk length of the pure-PyTorch selective scan (``None``: automatic).
    """

    def __init__(
        self,
        out_channels: int = 384,
        dropout: float = 0.2,
        image_size: int = 256,
        smoothing_sigma: float = 2.0,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.teacher = build_teacher(out_channels).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.student = DHKDStudent(
            out_channels, dropout=dropout, image_size=image_size, chunk_size=chunk_size
        )
        # scipy.ndimage.gaussian_filter(sigma) as in the official TIFF maps (truncate 4, reflect border).
        self.blur = GaussianSmoothing(smoothing_sigma) if smoothing_sigma > 0 else None
        self.normalize = ImageNetNormalize()
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        self.register_buffer("teacher_stats_set", torch.tensor(False))
        # Map-normalisation quantiles (structural "l" and logical "g"): qa = q0.9, qb = q0.995.
        self.register_buffer("quantiles", torch.tensor([0.0, 0.1, 0.0, 0.1]))  # qa_l, qb_l, qa_g, qb_g
        self.register_buffer("quantiles_set", torch.tensor(False))
        self.register_buffer("pretrained_loaded", torch.tensor(False))

    def train(self, mode: bool = True) -> DHKDModel:
        """The teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def load_teacher(self, teacher_weights: str | Path | None = None) -> Path:
        """Load the teacher from a local file (see :mod:`.teacher` for layouts); marks it loaded."""
        path = load_teacher_weights(self.teacher, teacher_weights)
        self.pretrained_loaded.fill_(True)
        return path

    def set_teacher_stats(self, mean: Tensor, std: Tensor) -> None:
        self.teacher_mean.copy_(mean.reshape_as(self.teacher_mean))
        self.teacher_std.copy_(std.reshape_as(self.teacher_std))
        self.teacher_stats_set.fill_(True)

    def set_quantiles(self, qa_l: Tensor, qb_l: Tensor, qa_g: Tensor, qb_g: Tensor) -> None:
        self.quantiles.copy_(torch.stack([qa_l, qb_l, qa_g, qb_g]).to(self.quantiles))
        self.quantiles_set.fill_(True)

    @torch.no_grad()
    def teacher_raw(self, images: Tensor) -> Tensor:
        """Un-normalised teacher features ``T`` (used to compute the channel statistics)."""
        return self.teacher(images)

    def teacher_features(self, images: Tensor) -> Tensor:
        """``T^ = (T - mu) / sigma`` (identity until the statistics are set)."""
        with torch.no_grad():
            features = self.teacher(images)
        std = torch.where(self.teacher_stats_set, self.teacher_std, torch.ones_like(self.teacher_std))
        mean = torch.where(self.teacher_stats_set, self.teacher_mean, torch.zeros_like(self.teacher_mean))
        return (features - mean) / std

    def check_input_size(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless the input is ``image_size`` x ``image_size``, the size the student is
        built for (the logical decoder's global bottleneck kernel is ``image_size / 16``: a smaller input
        cannot pass it, a larger one would no longer be reduced to 1x1, a different network)."""
        height, width = (int(side) for side in images.shape[-2:])
        if (height, width) != (self.image_size, self.image_size):
            msg = (
                f"DHKD was built for {self.image_size}x{self.image_size} input (image_size="
                f"{self.image_size}: the logical decoder's global bottleneck is image_size/16 = "
                f"{self.image_size // 16} wide), got {height}x{width}. Resize to {self.image_size}x"
                f"{self.image_size} (DHKD's default pre-processor does) or build DHKD(image_size=...) for "
                "another size (a multiple of 16, >= 64)."
            )
            raise ValueError(msg)

    def features(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(T^, f_S, f_G, f_L)`` for images in [0, 1] of size ``image_size`` (else ``ValueError``)."""
        self.check_input_size(images)
        teacher = self.teacher_features(images)
        f_s, f_g, f_l = self.student(self.normalize(images))
        return teacher, f_s, f_g, f_l

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised structural and logical maps at feature resolution, each ``(B, 1, h, w)``."""
        teacher, f_s, f_g, f_l = self.features(images)
        map_l = torch.mean((teacher - f_l) ** 2, dim=1, keepdim=True)
        map_g = torch.mean((f_g - f_s) ** 2, dim=1, keepdim=True)
        return map_l, map_g

    def normalize_maps(self, map_l: Tensor, map_g: Tensor) -> tuple[Tensor, Tensor]:
        """``0.1 (S - qa) / (qb - qa)`` per map type once the quantiles are set, else unchanged."""
        qa_l, qb_l, qa_g, qb_g = self.quantiles.unbind(0)
        is_set = self.quantiles_set
        norm_l = 0.1 * (map_l - qa_l) / torch.where(is_set, qb_l - qa_l, torch.ones_like(qb_l))
        norm_g = 0.1 * (map_g - qa_g) / torch.where(is_set, qb_g - qa_g, torch.ones_like(qb_g))
        return torch.where(is_set, norm_l, map_l), torch.where(is_set, norm_g, map_g)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | InferenceBatch:
        """Train mode: ``(T^, f_S, f_G, f_L)`` for the losses. Eval mode: ``InferenceBatch``.

        Raises ``ValueError`` for an input size other than ``image_size`` and for NaN/inf input (not
        while exporting).
        """
        check_finite_images(images, "DHKD")
        if self.training:
            return self.features(images)
        map_l, map_g = self.normalize_maps(*self.raw_maps(images))
        size = images.shape[-2:]
        map_l = F.interpolate(map_l, size=size, mode="bilinear", align_corners=False)
        map_g = F.interpolate(map_g, size=size, mode="bilinear", align_corners=False)
        pred_score = torch.amax(0.5 * map_l + 0.5 * map_g, dim=(-2, -1))
        anomaly_map = map_l + map_g  # G(S_l) + G(S_g) = G(S_l + S_g): one blur
        if self.blur is not None:
            anomaly_map = self.blur(anomaly_map)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
