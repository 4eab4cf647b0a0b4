"""URD (RD with Expert) networks: frozen expert, trainable teacher, student with GII.

Paper: "Unlocking the Potential of Reverse Distillation for Anomaly Detection" (AAAI 2025).
Shapes at 256x256 (spec part 2.2): teacher/expert [256x64x64, 512x32x32, 1024x16x16], OCBE
bottleneck 2048x8x8, student decoder [D1 256x64x64, D2 512x32x32, D3 1024x16x16].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import get_decoder
from anomalib.models.image.reverse_distillation.components import get_bottleneck_layer
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.anomaly_map import AnomalyMapGenerator
from anomalib_kd.components.backbones import create_feature_extractor, load_pretrained_backbone
from anomalib_kd.components.inputs import check_finite_images, check_input_multiple
from anomalib_kd.components.normalization import ImageNetNormalize

# ResNet layer3 downsamples by 16 and the OCBE bottleneck by 2 more; the decoder upsamples back by 2 per
# stage and GII adds its output to the teacher feature of that level, so the sides must divide by 32.
INPUT_MULTIPLE = 32


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Bias-free conv + BN + ReLU, the unit of every skip/GII module of the official student."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class GuidedInformationInjection(nn.Module):
    """Guided Information Injection at one decoder level (paper Sec. 3.3, Eq. 7-8).

    E = FuseEnc(F_l + Down(F_{l-1})): the same-level teacher feature plus the finer one, downsampled
    and projected; s = cos_c(D, F_l) (no gradient), G = SimAttn(s E + (1 - s) D); without similarity
    attention (the official scripts' default) G = E. Output FuseSkip([D, G]) feeds the next decoder stage.

    Args:
        channels: channels C of this level (teacher feature and decoder output).
        finer_channels: channels of the finer teacher level F_{l-1}.
        similarity_attention: use the similarity-guided mix (paper) or plain skip fusion (official run).
    """

    def __init__(self, channels: int, finer_channels: int, similarity_attention: bool = True) -> None:
        super().__init__()
        self.down = conv_bn_relu(finer_channels, channels, kernel_size=1)
        self.fuse_encoder = conv_bn_relu(channels, channels, kernel_size=3)
        self.similarity_attention = (
            conv_bn_relu(channels, channels, kernel_size=3) if similarity_attention else None
        )
        self.fuse_skip = conv_bn_relu(2 * channels, channels, kernel_size=3)

    def forward(
        self, decoded: torch.Tensor, feature: torch.Tensor, finer_feature: torch.Tensor
    ) -> torch.Tensor:
        """Fuse teacher information into the decoder output ``decoded`` (all at ``feature``'s size)."""
        finer = F.interpolate(finer_feature, size=feature.shape[-2:], mode="bilinear", align_corners=False)
        encoder_info = self.fuse_encoder(feature + self.down(finer))
        if self.similarity_attention is not None:
            with torch.no_grad():
                similarity = F.cosine_similarity(decoded.detach(), feature, dim=1, eps=1e-8).unsqueeze(1)
            encoder_info = self.similarity_attention(similarity * encoder_info + (1 - similarity) * decoded)
        return self.fuse_skip(torch.cat([decoded, encoder_info], dim=1))


class URDStudent(nn.Module):
    """OCBE bottleneck + de-ResNet decoder (RD4AD), with GII before decoder stages 2 and 3.

    Args:
        backbone: ResNet architecture of the teacher (picks the matching decoder).
        channels: teacher channels per level, finest first.
        injection: inject teacher information through the skips (URD); off gives plain RD4AD.
        similarity_attention: GII's similarity attention (paper); off = official scripts' wo-GII path.
    """

    def __init__(
        self,
        backbone: str,
        channels: Sequence[int],
        injection: bool = True,
        similarity_attention: bool = True,
    ) -> None:
        super().__init__()
        width_per_group = 128 if backbone.startswith("wide_") else 64
        self.bottleneck = get_bottleneck_layer(backbone, width_per_group=width_per_group)
        self.decoder = get_decoder(backbone)
        # Index k of the injections mirrors the official code: k=1 sits at the coarse level (before
        # decoder stage 2), k=0 at the middle level (before stage 3).
        self.injections = (
            nn.ModuleList(
                GuidedInformationInjection(channels[k + 1], channels[k], similarity_attention)
                for k in range(len(channels) - 1)
            )
            if injection
            else None
        )
        # Official student init: xavier-normal for every Conv2d/Linear (deconvs keep PyTorch's default).
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.xavier_normal_(module.weight)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher features [F1, F2, F3] -> student features [D1, D2, D3]."""
        f1, f2, f3 = features
        d3 = self.decoder.layer1(self.bottleneck(list(features)))
        skip3 = self.injections[1](d3, f3, f2) if self.injections is not None else d3
        d2 = self.decoder.layer2(skip3)
        skip2 = self.injections[0](d2, f2, f1) if self.injections is not None else d2
        d1 = self.decoder.layer3(skip2)
        return [d1, d2, d3]


class URDModel(nn.Module):
    """Expert-teacher-student reverse distillation.

    Inputs are images in [0, 1]; ImageNet normalisation happens inside (so synthetic anomalies are
    blended on raw images and the exported graph needs only a resize before it).

    Args:
        backbone: timm name of the expert/teacher (default torchvision's WRN50-2 weights, as the paper).
        layers: teacher layers tapped.
        injection: GII skips on/off.
        similarity_attention: GII similarity attention on/off.
        sigma: Gaussian smoothing of the anomaly map.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        injection: bool = True,
        similarity_attention: bool = True,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.expert = create_feature_extractor(backbone, layers, requires_grad=False)
        self.teacher = create_feature_extractor(backbone, layers, requires_grad=True)
        self.teacher.load_state_dict(self.expert.state_dict())  # same initial weights (paper Sec. 3.2)
        for parameter in self.expert.parameters():
            parameter.requires_grad_(False)
        self.student = URDStudent(
            backbone.partition(".")[0], self.expert.out_dims, injection, similarity_attention
        )
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.normalize = ImageNetNormalize()
        # Saved in checkpoints: a restored model never needs the pretrained file again.
        self.register_buffer("pretrained_loaded", torch.tensor(False))

    def load_pretrained(self, weights_path: str | Path | None = None) -> Path:
        """Load local pretrained weights into expert and teacher (same initial weights)."""
        path = load_pretrained_backbone(self.expert, self.backbone, weights_path)
        self.teacher.load_state_dict(self.expert.state_dict())
        self.pretrained_loaded.fill_(True)
        return path

    def expert_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen expert E(x) (always eval mode, no grad)."""
        return list(self.expert(self.normalize(images)).values())

    @staticmethod
    def check_input_size(images: torch.Tensor) -> None:
        """Raise ``ValueError`` unless both sides are multiples of 32 (the teacher + bottleneck stride)."""
        check_input_multiple(
            images, "URD", INPUT_MULTIPLE, "the ResNet teacher and the OCBE bottleneck downsample by 32"
        )

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Teacher T(x) (gradient and BN mode follow the caller)."""
        self.check_input_size(images)
        return list(self.teacher(self.normalize(images)).values())

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Eval: anomaly map (B, 1, H, W) and image score max(A) (spec part 2.7).

        Raises ``ValueError`` for sides that are not multiples of 32 and for NaN/inf input (not exported).
        """
        check_finite_images(images, "URD")
        teacher = self.teacher_features(images)
        student = self.student(teacher)
        anomaly_map = self.anomaly_map_generator(student, teacher, images.shape[-2:])
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
