"""Checkpoints written before the library replacements still load strictly and give identical outputs.

Renamed or dropped keys: VMamba patch merging ``downsample.1/2`` (a Sequential) -> torchvision's
``downsample.norm/reduction``; DHKD's ``stm.ss2d`` -> the shared VSSBlock's ``stm.op``; the 2-D
``blur.kernel`` buffer of anomalib's GaussianBlur2d, no longer saved by GaussianSmoothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn

from anomalib_kd.components.ssm import VMambaTiny, convert_vmamba_v0_state_dict
from anomalib_kd.models.d24fad import D24FADModel
from anomalib_kd.models.dhkd import DHKDModel
from anomalib_kd.models.pdd import PDDModel
from anomalib_kd.models.urd import URDModel

OLD_DOWNSAMPLE = (
    (r"(layers\.\d+\.downsample\.)norm\.", r"\g<1>1."),
    (r"(layers\.\d+\.downsample\.)reduction\.", r"\g<1>2."),
)
OLD_STM = ((r"\.stm\.op\.", ".stm.ss2d."),)


def old_state_dict(
    model: nn.Module, renames: tuple[tuple[str, str], ...], blur_kernels: dict[str, float]
) -> dict[str, torch.Tensor]:
    """The model's state dict under the old names, plus the anomalib blur kernels it used to save."""
    state = {}
    for key, value in model.state_dict().items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        state[key] = value.clone()
    for prefix, sigma in blur_kernels.items():
        kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
        state[f"{prefix}blur.kernel"] = GaussianBlur2d(
            sigma=sigma, channels=1, kernel_size=kernel_size
        ).kernel
    return state


def assert_loads_strictly_with_identical_outputs(
    build: Callable[[], nn.Module],
    renames: tuple[tuple[str, str], ...],
    blur_kernels: dict[str, float],
    old_key_fragment: str,
    run: Callable[[nn.Module], list[torch.Tensor]],
) -> None:
    torch.manual_seed(0)
    source = build().eval()
    state = old_state_dict(source, renames, blur_kernels)
    assert any(old_key_fragment in key for key in state), "the old-key state dict has no old key"
    torch.manual_seed(1)
    target = build().eval()
    with torch.no_grad():
        expected = run(source)
        assert any(not torch.equal(a, b) for a, b in zip(run(target), expected, strict=True))
        target.load_state_dict(state, strict=True)
        actual = run(target)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _scores(model: nn.Module, size: int) -> list[torch.Tensor]:
    torch.manual_seed(2)
    out = model(torch.rand(2, 3, size, size))
    return [out.pred_score, out.anomaly_map]


def test_vmamba_old_patch_merging_keys() -> None:
    assert_loads_strictly_with_identical_outputs(
        lambda: VMambaTiny(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
        OLD_DOWNSAMPLE,
        {},
        "downsample.1.weight",
        lambda model: model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))),
    )


def test_pdd_old_keys_and_blur_kernel() -> None:
    assert_loads_strictly_with_identical_outputs(
        lambda: PDDModel(backbone="resnet18", vmamba_depths=(1, 1, 1, 1), vmamba_dims=(8, 16, 32, 64)),
        OLD_DOWNSAMPLE,
        {"anomaly_map_generator.": 4.0},
        "mamba_teacher.layers.0.downsample.2.weight",
        lambda model: _scores(model, 64),
    )


def test_dhkd_old_stm_keys_and_blur_kernel() -> None:
    def build() -> DHKDModel:
        model = DHKDModel(image_size=64)
        model.set_quantiles(*torch.rand(4).sort().values)  # exercised buffers, saved like the weights
        return model

    assert_loads_strictly_with_identical_outputs(
        build, OLD_STM, {"": 2.0}, ".stm.ss2d.A_logs", lambda model: _scores(model, 64)
    )


def test_urd_old_blur_kernel() -> None:
    assert_loads_strictly_with_identical_outputs(
        lambda: URDModel(backbone="resnet18"),
        (),
        {"anomaly_map_generator.": 4.0},
        "anomaly_map_generator.blur.kernel",
        lambda model: _scores(model, 64),
    )


def test_d24fad_old_blur_kernel() -> None:
    def build() -> D24FADModel:
        model = D24FADModel(backbone="resnet18").eval()
        model.set_supports(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)))
        return model

    assert_loads_strictly_with_identical_outputs(
        build,
        (),
        {"anomaly_map_generator.": 4.0},
        "anomaly_map_generator.blur.kernel",
        lambda m: _scores(m, 64),
    )


def test_torchvision_patch_merging_equals_the_hand_written_merge() -> None:
    """The replaced module: 2x2 concat in VMamba's order (even/even, odd/even, even/odd, odd/odd), LN, Linear.

    The channel order is the one the pretrained ``Linear(4C, 2C)`` expects.
    """
    torch.manual_seed(5)
    model = VMambaTiny(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)).eval()
    merging = model.layers[0].downsample
    x = torch.randn(2, 6, 10, 8)  # channels-last
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    norm = nn.functional.layer_norm(torch.cat(parts, dim=-1), (32,), merging.norm.weight, merging.norm.bias)
    expected = norm @ merging.reduction.weight.T
    with torch.no_grad():
        torch.testing.assert_close(merging(x), expected)


def test_vmamba_key_conversion_keeps_official_and_maps_old_merging_names() -> None:
    keys = [
        "layers.1.downsample.norm.weight",  # official VMamba v0 name = torchvision's
        "layers.1.downsample.reduction.weight",
        "layers.2.downsample.1.bias",  # this package's earlier name
        "layers.2.downsample.2.weight",
    ]
    assert list(convert_vmamba_v0_state_dict(dict.fromkeys(keys, torch.zeros(1)))) == [
        "layers.1.downsample.norm.weight",
        "layers.1.downsample.reduction.weight",
        "layers.2.downsample.norm.bias",
        "layers.2.downsample.reduction.weight",
    ]


def test_vmamba_dims_must_double() -> None:
    with pytest.raises(ValueError, match="dims must double"):
        VMambaTiny(depths=(1, 1, 1, 1), dims=(8, 16, 24, 48))
