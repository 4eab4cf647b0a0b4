"""URD losses (RD with Expert, AAAI 2025): teacher sensitivity loss and student denoising loss.

Follows the official code's current losses (see the spec, part 2.6): sums over the three levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.anomaly_map import cosine_distance_map

Features = Sequence[torch.Tensor]


def global_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """g(a, b) = mean_b [1 - cos(vec(a_b), vec(b_b))], each sample flattened to one vector (ReContrast)."""
    return (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)).mean()


def mask_pyramid(mask: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Cascaded binarised masks M_l = 1[bilinear(M_{l-1}, size_l) >= 0.5], finest level first."""
    pyramid = []
    current = mask
    for size in sizes:
        current = (
            F.interpolate(current, size=tuple(size), mode="bilinear", align_corners=True) >= 0.5
        ).float()
        pyramid.append(current)
    return pyramid


class TeacherSensitivityLoss(nn.Module):
    """L_T (paper Eq. 4, official-code form).

    L_T = sum_l mean d_l(T(x), E(x)) + sum_l mean |d_l(T(x~), E(x)) - M_l| + sum_l g_l(T(x~), E(x~)),
    with d the per-pixel cosine distance and M_l the cascaded mask pyramid. The last (global) term is
    the one the current official code adds to the paper's loss.
    """

    def forward(
        self,
        teacher_normal: Features,
        teacher_anomalous: Features,
        expert_normal: Features,
        expert_anomalous: Features,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        masks = mask_pyramid(mask, [f.shape[-2:] for f in teacher_normal])
        loss = torch.zeros((), device=mask.device)
        for t_n, t_a, e_n, e_a, m in zip(
            teacher_normal, teacher_anomalous, expert_normal, expert_anomalous, masks, strict=True
        ):
            loss = loss + cosine_distance_map(t_n, e_n).mean()
            loss = loss + F.l1_loss(cosine_distance_map(t_a, e_n), m)
            loss = loss + global_cosine_distance(t_a, e_a)
        return loss


class StudentDenoisingLoss(nn.Module):
    """L_S (paper Eq. 6): the student maps teacher features of x and x~ back to *normal* features.

    L_S = sum_l [g(S(x), T(x)) + g(S(x~), T(x)) + g(S(x), E(x)) + g(S(x~), E(x))].
    """

    def forward(
        self,
        student_normal: Features,
        student_anomalous: Features,
        teacher_normal: Features,
        expert_normal: Features,
    ) -> torch.Tensor:
        loss = torch.zeros((), device=student_normal[0].device)
        for s_n, s_a, t_n, e_n in zip(
            student_normal, student_anomalous, teacher_normal, expert_normal, strict=True
        ):
            for student in (s_n, s_a):
                loss = loss + global_cosine_distance(student, t_n) + global_cosine_distance(student, e_n)
        return loss
