"""VMamba-Tiny v0: stage taps, patch-merging order, official-checkpoint key renames and strict loading."""

from __future__ import annotations

import re

import pytest
import torch

from anomalib_kd.components.ssm import (
    PatchMerge,
    VMambaTiny,
    convert_vmamba_v0_state_dict,
    load_vmamba_checkpoint,
)

# Inverse of the v0 renames, applied to our keys to build a state dict with the official (old) names.
_TO_OFFICIAL = (
    (r"^patch_embed\.0\.", "patch_embed.proj."),
    (r"^patch_embed\.2\.", "patch_embed.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.norm\.", r"\1.ln_1."),
    (r"^(layers\.\d+\.blocks\.\d+)\.op\.", r"\1.self_attention."),
    (r"^(layers\.\d+\.downsample)\.1\.", r"\1.norm."),
    (r"^(layers\.\d+\.downsample)\.2\.", r"\1.reduction."),
)


def official_state_dict(model: VMambaTiny) -> dict[str, torch.Tensor]:
    """Our state dict under the key names of ``vssmtiny_dp01_ckpt_epoch_292.pth`` (plus its classifier)."""
    out = {}
    for key, value in model.state_dict().items():
        new = key
        for ours, theirs in _TO_OFFICIAL:
            new = re.sub(ours, theirs, new)
        out[new] = value.clone()
    dim = model.dims[-1]
    out.update(
        {
            "norm.weight": torch.ones(dim),
            "norm.bias": torch.zeros(dim),
            "head.weight": torch.zeros(1000, dim),
            "head.bias": torch.zeros(1000),
        }
    )
    return out


@pytest.fixture(scope="module")
def tiny_vmamba() -> VMambaTiny:
    torch.manual_seed(0)
    return VMambaTiny().eval()


def test_stage_taps_at_256(tiny_vmamba):
    with torch.no_grad():
        feats = tiny_vmamba(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [
        (1, 192, 32, 32),
        (1, 384, 16, 16),
        (1, 768, 8, 8),
        (1, 768, 8, 8),
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def test_architecture(tiny_vmamba):
    assert [len(layer.blocks) for layer in tiny_vmamba.layers] == [2, 2, 9, 2]
    n_params = sum(p.numel() for p in tiny_vmamba.parameters())
    assert 21.5e6 < n_params < 22.5e6  # 22.9 M with the 0.77 M ImageNet classifier, which is left out
    block = tiny_vmamba.layers[2].blocks[8]
    assert (block.op.d_inner, block.op.dt_rank, block.op.d_state) == (768, 24, 16)
    rates = [b.drop_path.drop_prob for layer in tiny_vmamba.layers for b in layer.blocks]
    assert rates[0] == 0.0
    assert rates[-1] == pytest.approx(0.2)


def test_patch_merge_channel_order():
    x = torch.arange(16.0).view(1, 4, 4, 1)  # value = 4 * row + col
    y = PatchMerge()(x)
    assert y.shape == (1, 2, 2, 4)
    # (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
    assert y[0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert y[0, 1, 1].tolist() == [10.0, 14.0, 11.0, 15.0]


def test_key_renames():
    keys = [
        "patch_embed.proj.weight",
        "patch_embed.norm.bias",
        "layers.0.blocks.1.ln_1.weight",
        "layers.2.blocks.8.self_attention.x_proj_weight",
        "layers.2.blocks.8.self_attention.out_norm.weight",
        "layers.1.downsample.norm.weight",
        "layers.1.downsample.reduction.weight",
        "norm.weight",
        "head.bias",
        "module.layers.3.blocks.0.self_attention.A_logs",
    ]
    renamed = list(convert_vmamba_v0_state_dict(dict.fromkeys(keys, torch.zeros(1))))
    assert renamed == [
        "patch_embed.0.weight",
        "patch_embed.2.bias",
        "layers.0.blocks.1.norm.weight",
        "layers.2.blocks.8.op.x_proj_weight",
        "layers.2.blocks.8.op.out_norm.weight",
        "layers.1.downsample.1.weight",
        "layers.1.downsample.2.weight",
        "classifier.norm.weight",
        "classifier.head.bias",
        "layers.3.blocks.0.op.A_logs",
    ]


def test_load_official_checkpoint(tmp_path, tiny_vmamba):
    source = VMambaTiny()
    path = tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth"
    torch.save({"model": official_state_dict(source), "epoch": 292}, path)
    target = load_vmamba_checkpoint(VMambaTiny(), path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def test_load_rejects_wrong_keys(tmp_path):
    state = official_state_dict(VMambaTiny())
    state["layers.0.blocks.0.self_attention.typo_weight"] = state.pop("layers.0.blocks.0.self_attention.Ds")
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match=r"missing keys \(1\).*layers\.0\.blocks\.0\.op\.Ds") as info:
        load_vmamba_checkpoint(VMambaTiny(), path)
    assert "unexpected keys (1): ['layers.0.blocks.0.op.typo_weight']" in str(info.value)


def test_load_rejects_wrong_shapes(tmp_path):
    state = official_state_dict(VMambaTiny())
    state["patch_embed.proj.bias"] = torch.zeros(5)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)  # a bare state dict is accepted too
    with pytest.raises(RuntimeError, match=r"patch_embed\.0\.bias: checkpoint \(5,\) vs model \(96,\)"):
        load_vmamba_checkpoint(VMambaTiny(), path)


def test_missing_file_message(tmp_path):
    missing = tmp_path / "nowhere" / "vssmtiny_dp01_ckpt_epoch_292.pth"
    with pytest.raises(FileNotFoundError, match=r"vssmtiny_dp01_ckpt_epoch_292\.pth") as info:
        load_vmamba_checkpoint(VMambaTiny(), missing)
    assert str(missing) in str(info.value)
    assert "github.com/MzeroMiko/VMamba/releases" in str(info.value)
