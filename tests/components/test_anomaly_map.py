"""Shared anomaly scoring: SciPy-compatible smoothing border, kernel size, and map values by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.models.components import GaussianBlur2d

from anomalib_kd.components.anomaly_map import (
    AnomalyMapGenerator,
    GaussianSmoothing,
    cosine_distance_map,
    pad_symmetric,
)


def reference_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(image, sigma) written out: numpy 'symmetric' pad + explicit taps."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.array([math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(-radius, radius + 1)])
    taps /= taps.sum()
    padded = np.pad(image.astype(np.float64), radius, mode="symmetric")
    height, width = image.shape
    out = np.zeros((height, width))
    for di in range(2 * radius + 1):
        for dj in range(2 * radius + 1):
            out += taps[di] * taps[dj] * padded[di : di + height, dj : dj + width]
    return out


@pytest.mark.parametrize(("sigma", "shape"), [(4.0, (40, 36)), (2.0, (23, 30)), (4.0, (7, 5))])
def test_smoothing_equals_half_sample_symmetric_blur(sigma: float, shape: tuple[int, int]) -> None:
    """Official border (SciPy 'reflect' = numpy 'symmetric'), also for maps smaller than the radius."""
    torch.manual_seed(0)
    maps = torch.rand(2, 1, *shape)
    smoothed = GaussianSmoothing(sigma)(maps)
    for index in range(2):
        expected = reference_blur(maps[index, 0].numpy(), sigma)
        np.testing.assert_allclose(smoothed[index, 0].numpy(), expected, rtol=0, atol=1e-6)


def test_smoothing_equals_scipy_gaussian_filter() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    torch.manual_seed(1)
    maps = torch.rand(1, 3, 64, 48, dtype=torch.float64)
    smoothed = GaussianSmoothing(4.0)(maps)
    for channel in range(3):
        expected = ndimage.gaussian_filter(maps[0, channel].numpy(), sigma=4.0)  # truncate 4, reflect
        np.testing.assert_allclose(smoothed[0, channel].numpy(), expected, rtol=0, atol=1e-6)


def test_pad_symmetric_matches_numpy_symmetric_pad() -> None:
    x = torch.arange(12.0).view(1, 1, 3, 4)
    for pad in (1, 3, 9):  # 9 > both sizes: the extension repeats
        padded = pad_symmetric(pad_symmetric(x, pad, dim=2), pad, dim=3)
        np.testing.assert_array_equal(padded[0, 0].numpy(), np.pad(x[0, 0].numpy(), pad, mode="symmetric"))


def test_border_differs_from_anomalib_blur_only_within_the_radius() -> None:
    """anomalib's GaussianBlur2d pads like SciPy's 'mirror'; the interior is the same filter."""
    torch.manual_seed(2)
    maps = torch.rand(1, 1, 96, 96)
    ours = GaussianSmoothing(4.0)(maps)[0, 0]
    anomalib = GaussianBlur2d(sigma=4.0, channels=1, kernel_size=33)(maps)[0, 0]
    difference = (ours - anomalib).abs()
    assert difference[16:-16, 16:-16].max() < 1e-5  # radius int(4 * 4 + 0.5) = 16
    assert difference.max() > 1e-3
    assert difference[:, 0].max() > 1e-3
    assert difference[0, :].max() > 1e-3


def test_kernel_radius_and_normalisation() -> None:
    """SciPy's truncate=4: radius 16 at the official sigma 4 (URD, PDD, D24FAD), 8 at DHKD's sigma 2."""
    for sigma, radius in ((4.0, 16), (2.0, 8), (0.5, 2)):
        smoothing = GaussianSmoothing(sigma)
        assert smoothing.radius == radius
        assert smoothing.kernel.numel() == 2 * radius + 1
        assert float(smoothing.kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    constant = torch.full((1, 1, 20, 20), 0.7)
    torch.testing.assert_close(GaussianSmoothing(4.0)(constant), constant)


def test_bad_sigma_and_shape_are_named() -> None:
    with pytest.raises(ValueError, match="sigma"):
        GaussianSmoothing(0.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        GaussianSmoothing(2.0)(torch.rand(8, 8))


def _unit_vectors(angle: torch.Tensor) -> torch.Tensor:
    """(h, w) angles -> (1, 2, h, w) unit vectors (cos a, sin a)."""
    return torch.stack([torch.cos(angle), torch.sin(angle)]).unsqueeze(0)


def test_anomaly_map_values_on_a_hand_made_case() -> None:
    """Known cosine distances in, known smoothed map out.

    Level 1 (12x12, image size): student and target agree (distance 0) except at pixel (5, 5), where
    they are orthogonal (distance 1), and at the corner (0, 0), where they are opposite (distance 2).
    Level 2 (3x3): every target is rotated by 60 degrees (distance 0.5 everywhere, so 0.5 after upsampling).
    With sigma 0.5 (radius 2, taps k_i = exp(-2 i^2) / sum) the map is 0.5 plus each spike times k_i k_j;
    at the corner the half-sample symmetric border folds taps -1 onto 0: 2 (k_0 + k_1)^2.
    """
    angle = torch.zeros(12, 12)
    angle[5, 5] = math.pi / 2
    angle[0, 0] = math.pi
    student_1, target_1 = _unit_vectors(torch.zeros(12, 12)), _unit_vectors(angle)
    student_2, target_2 = _unit_vectors(torch.zeros(3, 3)), _unit_vectors(torch.full((3, 3), math.pi / 3))

    distances = cosine_distance_map(student_1, target_1)[0, 0]
    assert distances[5, 5].item() == pytest.approx(1.0, abs=1e-6)
    assert distances[0, 0].item() == pytest.approx(2.0, abs=1e-6)
    assert distances[3, 8].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(
        cosine_distance_map(student_2, target_2), torch.full((1, 1, 3, 3), 0.5), rtol=0, atol=1e-6
    )

    anomaly_map = AnomalyMapGenerator(sigma=0.5)([student_1, student_2], [target_1, target_2], (12, 12))[0, 0]
    taps = [math.exp(-2 * i * i) for i in range(-2, 3)]
    k0, k1, k2 = (t / sum(taps) for t in taps[2:])
    expected = {
        (5, 5): 0.5 + k0 * k0,
        (5, 6): 0.5 + k0 * k1,
        (7, 4): 0.5 + k2 * k1,
        (0, 0): 0.5 + 2 * (k0 + k1) ** 2,
        (0, 1): 0.5 + 2 * (k0 + k1) * (k1 + k2),
        (10, 10): 0.5,
    }
    for (row, col), value in expected.items():
        assert anomaly_map[row, col].item() == pytest.approx(value, abs=1e-6), (row, col)
    assert anomaly_map.shape == (12, 12)


def test_smoothing_exports_to_onnx_and_openvino(tmp_path: Path) -> None:
    """The symmetric border is plain slicing / flip / concat: it survives anomalib's dynamo ONNX export."""
    ov = pytest.importorskip("openvino")
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    smoothing = GaussianSmoothing(4.0)
    onnx_path = tmp_path / "smoothing.onnx"
    example = (torch.rand(2, 1, 64, 48),)
    torch.onnx.export(smoothing, example, str(onnx_path), dynamo=True, dynamic_shapes=(dims,))
    ir = ov.convert_model(onnx_path)
    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    maps = torch.rand(3, 1, 40, 72)  # another batch and size than the export example
    exported = compiled(maps.numpy())[0]
    np.testing.assert_allclose(exported, smoothing(maps).numpy(), rtol=0, atol=1e-6)


def test_levels_are_upsampled_bilinearly_with_aligned_corners() -> None:
    """One 3x3 level, distances by column (0, 0.5, 1.5), to 12x12 with ``align_corners=True`` (official).

    Output column j samples input x = 2 j / 11; away from the kink at x = 1 and from the border the
    linear profile passes the symmetric Gaussian unchanged: 0.5 x for x <= 1, 0.5 + (x - 1) above.
    """
    distances = torch.tensor([0.0, 0.5, 1.5])
    angle = torch.acos(1 - distances).expand(3, 3)
    student, target = _unit_vectors(torch.zeros(3, 3)), _unit_vectors(angle)
    anomaly_map = AnomalyMapGenerator(sigma=0.5)([student], [target], (12, 12))[0, 0]
    for row in (0, 6, 11):
        assert anomaly_map[row, 2].item() == pytest.approx(0.5 * 4 / 11, abs=1e-6)
        assert anomaly_map[row, 9].item() == pytest.approx(0.5 + 7 / 11, abs=1e-6)


def _official_smoothing(model_name: str) -> tuple[GaussianSmoothing, float]:
    """Each model's smoothing module as built by default, and the official sigma (specs)."""
    if model_name == "dhkd":
        from anomalib_kd.models.dhkd import DHKDModel

        return DHKDModel(image_size=64).blur, 2.0
    if model_name == "pdd":
        from anomalib_kd.models.pdd import PDDModel

        model = PDDModel(backbone="resnet18", vmamba_depths=(1, 1, 1, 1), vmamba_dims=(8, 16, 32, 64))
        return model.anomaly_map_generator.blur, 4.0
    if model_name == "d24fad":
        from anomalib_kd.models.d24fad import D24FADModel

        return D24FADModel(backbone="resnet18").anomaly_map_generator.blur, 4.0
    from anomalib_kd.models.urd import URDModel

    return URDModel(backbone="resnet18").anomaly_map_generator.blur, 4.0


@pytest.mark.parametrize("model_name", ["urd", "pdd", "d24fad", "dhkd"])
def test_every_model_smooths_with_the_official_sigma_and_border(model_name: str) -> None:
    smoothing, sigma = _official_smoothing(model_name)
    torch.manual_seed(3)
    maps = torch.rand(1, 1, 48, 40)
    np.testing.assert_allclose(
        smoothing(maps)[0, 0].numpy(), reference_blur(maps[0, 0].numpy(), sigma), rtol=0, atol=1e-6
    )
