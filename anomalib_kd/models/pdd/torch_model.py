"""PDD networks: frozen WRN50-2 + VMamba-Tiny teachers, InA/MMU adapters, MPA prior, two students.

Paper: "PDD: Manifold-Prior Diverse Distillation for Medical Anomaly Detection" (CVPR 2026). Follows the
official code (``pdd_d24fad_official_code.md`` part 1) unless an option says otherwise.

Shapes at 256x256 (WRN50-2 + VMamba-Tiny v0):

- WRN: y0 256@64, y1 512@32, y2 1024@16, y3 2048@8.
- VMamba (after each stage's patch merge): z0 192@32, z1 384@16, z2 768@8, z3 768@8.
- Fused targets f_c = Up2(A1(z0)) + y0, f_b = Up2(A2(z1)) + y1, f_a = Up2(A3(z2)) + y2 and the unified
  manifold f_t = A4(z3) + y3 (2048@8), the decoder input (no OCBE bottleneck).
- MPA priors p1 1024@16, p2 512@32, added before decoder stages 2 and 3 of student 2.
- Students: [c 256@64, b 512@32, a 1024@16], finest first.

Any input side that is a multiple of 32 works: the prior sizes are taken from f_t at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.backbone.resnet_decoder import (
    DecoderBasicBlock,
    DecoderBottleneck,
    ResNetDecoder,
)
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.anomaly_map import AnomalyMapGenerator
from anomalib_kd.components.backbones import create_feature_extractor, load_pretrained_backbone
from anomalib_kd.components.inputs import check_finite_images
from anomalib_kd.components.normalization import ImageNetNormalize
from anomalib_kd.components.ssm import VMambaTiny
from anomalib_kd.components.ssm.vmamba import load_pretrained_vmamba

WRN_LAYERS = ("layer1", "layer2", "layer3", "layer4")
N_LEVELS = 3
INPUT_MULTIPLE = 32

Features = list[torch.Tensor]


class ChannelAdapter(nn.Module):
    """InA / MMU channel adapter (official ``EfficientChannelAdapter``).

    main = 1x1 (cin->mid) -> BN -> GELU -> 3x3 dilation 2 (mid->mid) -> BN -> GELU -> 1x1 (mid->cout) -> BN,
    shortcut = 1x1 (cin->cout) (identity when cin == cout), output GELU(main + shortcut);
    mid = max(cin, cout) // reduction. All convolutions are bias-free.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(in_channels // reduction, out_channels // reduction, 1)
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, mid, kernel_size=3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(mid),
            nn.GELU(),
            nn.Conv2d(mid, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, h, w) -> (B, cout, h, w)."""
        return self.act(self.main(x) + self.shortcut(x))


class ManifoldPriorAffine(nn.Module):
    """MPA (official ``LightweightMLP``): shared trunk + two heads giving the priors p1 and p2.

    trunk = 1x1 (C4->C3) -> BN -> GELU; p1 = Up(1x1 (C3->C3)) at 2x the manifold size, p2 = Up(1x1 (C3->C2))
    at 4x (bilinear, align_corners=False). Sizes follow the input (the official code fixes 16 and 32).
    """

    def __init__(self, in_channels: int, prior1_channels: int, prior2_channels: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, prior1_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(prior1_channels),
            nn.GELU(),
        )
        self.head1 = nn.Conv2d(prior1_channels, prior1_channels, kernel_size=1, bias=False)
        self.head2 = nn.Conv2d(prior1_channels, prior2_channels, kernel_size=1, bias=False)

    def forward(self, manifold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f_t (B, C4, h, w) -> p1 (B, C3, 2h, 2w), p2 (B, C2, 4h, 4w)."""
        height, width = manifold.shape[-2:]
        trunk = self.trunk(manifold)
        prior1 = F.interpolate(
            self.head1(trunk), size=(2 * height, 2 * width), mode="bilinear", align_corners=False
        )
        prior2 = F.interpolate(
            self.head2(trunk), size=(4 * height, 4 * width), mode="bilinear", align_corners=False
        )
        return prior1, prior2


def build_student_decoder(backbone: str) -> ResNetDecoder:
    """RD4AD decoder with 2 blocks per stage (official PDD), wide Bottleneck blocks for WRN50-2.

    ResNet-18/34 stand-ins get basic blocks (channels 512 -> 256 -> 128 -> 64).
    """
    name = backbone.partition(".")[0]
    if name in {"resnet18", "resnet34"}:
        return ResNetDecoder(DecoderBasicBlock, [2, 2, 2])
    width = 128 if name.startswith("wide_") else 64
    return ResNetDecoder(DecoderBottleneck, [2, 2, 2], width_per_group=width)


class PDDStudents(nn.Module):
    """The two students: S1 = decoder(f_t); S2 = decoder(f_t) with p1, p2 added before stages 2 and 3.

    Args:
        backbone: WRN teacher name (picks the decoder block type).
        shared: one decoder for both students (official code; S1 and S2 then agree at the coarsest level),
            or two separately weighted decoders (the paper's "two structurally identical students").
    """

    def __init__(self, backbone: str, shared: bool = True) -> None:
        super().__init__()
        self.shared = shared
        self.decoder = build_student_decoder(backbone)
        self.prior_decoder = None if shared else build_student_decoder(backbone)

    def forward(
        self, manifold: torch.Tensor, prior1: torch.Tensor, prior2: torch.Tensor
    ) -> tuple[Features, Features]:
        """Return (S2 prior student, S1 plain student), each [c, b, a] finest first.

        The official order: S2 first, then S1, each through all three stages, so with a shared decoder
        stage 1 runs twice on the same input. Outputs and gradients do not depend on the order, but the
        BatchNorm running statistics do (each call is one momentum update, and the order of the prior
        and plain batches through stages 2 and 3 weights them differently), and the eval-mode students
        use those statistics. In eval mode the second stage-1 call (identical output, no statistics
        update) is skipped.
        """
        plain = self.decoder
        prior = plain if self.prior_decoder is None else self.prior_decoder
        a2 = prior.layer1(manifold)
        b2 = prior.layer2(a2 + prior1)
        c2 = prior.layer3(b2 + prior2)
        a1 = a2 if self.prior_decoder is None and not self.training else plain.layer1(manifold)
        b1 = plain.layer2(a1)
        c1 = plain.layer3(b1)
        return [c2, b2, a2], [c1, b1, a1]


def _kaiming_init(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(sub, nn.BatchNorm2d):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class PDDModel(nn.Module):
    """Dual-teacher, dual-student PDD network.

    Args:
        backbone: timm name of the local (CNN) teacher. Default: timm's racm WRN50-2 (official weights).
        shared_students: one decoder for both students (official) or two separately weighted ones (paper).
        vmamba_depths, vmamba_dims: VMamba teacher configuration (default VMamba-Tiny v0; smaller values are
            only for tests). The taps are the outputs of the 4 stages after patch merging, with channels
            ``dims[1], dims[2], dims[3], dims[3]``.
        vmamba_drop_path_rate: stochastic depth of the VMamba teacher (inactive: teachers stay in eval mode).
        sigma: Gaussian smoothing of the anomaly map.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2.racm_in1k",
        shared_students: bool = True,
        vmamba_depths: Sequence[int] = (2, 2, 9, 2),
        vmamba_dims: Sequence[int] = (96, 192, 384, 768),
        vmamba_drop_path_rate: float = 0.2,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.normalize = ImageNetNormalize()
        self.cnn_teacher = create_feature_extractor(backbone, WRN_LAYERS, requires_grad=False)
        self.mamba_teacher = VMambaTiny(
            depths=tuple(vmamba_depths), dims=tuple(vmamba_dims), drop_path_rate=vmamba_drop_path_rate
        )
        for parameter in [*self.cnn_teacher.parameters(), *self.mamba_teacher.parameters()]:
            parameter.requires_grad_(False)
        cnn_channels = list(self.cnn_teacher.out_dims)
        mamba_channels = [vmamba_dims[1], vmamba_dims[2], vmamba_dims[3], vmamba_dims[3]]
        self.adapters = nn.ModuleList(
            ChannelAdapter(cin, cout) for cin, cout in zip(mamba_channels, cnn_channels, strict=True)
        )
        self.prior = ManifoldPriorAffine(cnn_channels[3], cnn_channels[2], cnn_channels[1])
        _kaiming_init(self.adapters)
        _kaiming_init(self.prior)
        self.students = PDDStudents(backbone, shared=shared_students)
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=sigma)
        self.register_buffer("pretrained_loaded", torch.tensor(False))
        self.teachers_eval()

    # -- weights ----------------------------------------------------------------------------------

    def load_pretrained(
        self, weights_path: str | Path | None = None, vmamba_weights_path: str | Path | None = None
    ) -> tuple[Path, Path]:
        """Load both teachers: local files first, else their standard downloads (see the two loaders).

        ``weights_path`` is the CNN teacher's file (:func:`load_pretrained_backbone`), ``vmamba_weights_path``
        VMamba-Tiny's (:func:`load_pretrained_vmamba`, loaded first: the larger risk of a missing file).
        """
        vmamba_path = load_pretrained_vmamba(self.mamba_teacher, vmamba_weights_path)
        wrn_path = load_pretrained_backbone(self.cnn_teacher, self.backbone, weights_path)
        self.pretrained_loaded.fill_(True)
        return wrn_path, vmamba_path

    def trainable_modules(self) -> list[nn.Module]:
        """Adapters, MPA and students (the official optimizer's parameters)."""
        return [self.adapters, self.prior, self.students]

    def teachers_eval(self) -> None:
        """Teachers always run in eval mode (BN running stats, no VMamba drop-path)."""
        self.cnn_teacher.eval()
        self.mamba_teacher.eval()

    def train(self, mode: bool = True) -> PDDModel:
        """Switch the trainable parts; the frozen teachers stay in eval mode."""
        super().train(mode)
        self.teachers_eval()
        return self

    # -- forward ----------------------------------------------------------------------------------

    @staticmethod
    def check_input_size(images: torch.Tensor) -> None:
        """Both teachers downsample by 32: sides must be multiples of 32."""
        height, width = (int(s) for s in images.shape[-2:])
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            msg = (
                f"PDD needs image sides that are multiples of {INPUT_MULTIPLE} (the WRN and VMamba teachers "
                f"downsample by 32), got {height}x{width}. Resize with e.g. `--model.pre_processor` or "
                "PDD.configure_pre_processor(image_size=(256, 256))."
            )
            raise ValueError(msg)

    def teacher_features(self, images: torch.Tensor) -> tuple[Features, Features]:
        """Frozen teacher features (WRN [y0..y3], VMamba [z0..z3]) of [0, 1] images."""
        self.check_input_size(images)
        normalized = self.normalize(images)
        with torch.no_grad():
            cnn = list(self.cnn_teacher(normalized).values())
            mamba = list(self.mamba_teacher(normalized))
        return cnn, mamba

    def fuse(self, cnn: Features, mamba: Features) -> tuple[Features, torch.Tensor]:
        """InA (levels 0-2: Up2 after the adapter, align_corners=True, + WRN) and MMU (f_t at level 3).

        Returns the fused targets [f_c, f_b, f_a] (trainable, not detached, as the official code) and f_t.
        """
        targets = [
            F.interpolate(adapter(z), scale_factor=2, mode="bilinear", align_corners=True) + y
            for adapter, z, y in zip(self.adapters[:N_LEVELS], mamba[:N_LEVELS], cnn[:N_LEVELS], strict=True)
        ]
        manifold = self.adapters[N_LEVELS](mamba[N_LEVELS]) + cnn[N_LEVELS]
        return targets, manifold

    def features(self, images: torch.Tensor) -> dict[str, Features]:
        """Fused ``targets``, prior student ``s2`` and plain student ``s1`` (each [c, b, a])."""
        cnn, mamba = self.teacher_features(images)
        targets, manifold = self.fuse(cnn, mamba)
        prior1, prior2 = self.prior(manifold)
        s2, s1 = self.students(manifold, prior1, prior2)
        return {"targets": targets, "s2": s2, "s1": s1}

    def forward(self, images: torch.Tensor) -> InferenceBatch | dict[str, Features]:
        """Train mode: the feature dict; eval: map G(sum_l Up(1-cos(S2_l,T_l)) + Up(1-cos(S1_l,T_l))), max."""
        check_finite_images(images, "PDD")  # a NaN score would be labelled normal
        outputs = self.features(images)
        if self.training:
            return outputs
        targets = outputs["targets"]
        anomaly_map = self.anomaly_map_generator(
            [*outputs["s2"], *outputs["s1"]], [*targets, *targets], images.shape[-2:]
        )
        pred_score = torch.amax(anomaly_map, dim=(-2, -1))
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
