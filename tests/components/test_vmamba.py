"""VMamba-Tiny v0: stage taps, official-checkpoint key renames and strict loading."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_kd.components.ssm import (
    VMambaTiny,
    convert_vmamba_v0_state_dict,
    load_vmamba_checkpoint,
)


def official_vmamba_tiny_v0_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``vssmtiny_dp01_ckpt_epoch_292.pth`` (its ``"model"`` state dict), written from
    the spec's description of the official model (pdd_d24fad_official_code.md, part 1.2.2), not from ours.

    VSSM(depths [2, 2, 9, 2], dims 96): patch embed Conv(3 -> 96, k4 s4) + LayerNorm; per block ``ln_1`` and
    SS2D v0 ``self_attention`` (d_inner 2C, d_state 16, dt_rank ceil(C/16), K = 4 directions: in_proj
    C -> 4C without bias, depth-wise 3x3 conv2d with bias, x_proj_weight (K, R + 2N, 2C), dt_projs_weight
    (K, 2C, R), dt_projs_bias (K, 2C), A_logs (K * 2C, N), Ds (K * 2C), out_norm(2C), out_proj 2C -> C
    without bias); after stages 1-3 a Swin PatchMerging2D (``norm`` LayerNorm(4C), ``reduction`` Linear
    4C -> 2C without bias); the ImageNet classifier ``norm`` (768) and ``head`` (1000 x 768).
    """
    depths, dims, n_state, k_dirs = (2, 2, 9, 2), (96, 192, 384, 768), 16, 4
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.proj.bias": (96,),
        "patch_embed.norm.weight": (96,),
        "patch_embed.norm.bias": (96,),
    }
    for stage, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        inner, rank = 2 * dim, math.ceil(dim / 16)
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}"
            ssm = f"{prefix}.self_attention"
            shapes |= {
                f"{prefix}.ln_1.weight": (dim,),
                f"{prefix}.ln_1.bias": (dim,),
                f"{ssm}.x_proj_weight": (k_dirs, rank + 2 * n_state, inner),
                f"{ssm}.dt_projs_weight": (k_dirs, inner, rank),
                f"{ssm}.dt_projs_bias": (k_dirs, inner),
                f"{ssm}.A_logs": (k_dirs * inner, n_state),
                f"{ssm}.Ds": (k_dirs * inner,),
                f"{ssm}.in_proj.weight": (2 * inner, dim),
                f"{ssm}.conv2d.weight": (inner, 1, 3, 3),
                f"{ssm}.conv2d.bias": (inner,),
                f"{ssm}.out_norm.weight": (inner,),
                f"{ssm}.out_norm.bias": (inner,),
                f"{ssm}.out_proj.weight": (dim, inner),
            }
        if stage < len(depths) - 1:
            shapes |= {
                f"layers.{stage}.downsample.norm.weight": (4 * dim,),
                f"layers.{stage}.downsample.norm.bias": (4 * dim,),
                f"layers.{stage}.downsample.reduction.weight": (2 * dim, 4 * dim),
            }
    return shapes | {
        "norm.weight": (768,),
        "norm.bias": (768,),
        "head.weight": (1000, 768),
        "head.bias": (1000,),
    }


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A fake official checkpoint: every official key with its shape, filled with distinct random values."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=generator)
        for key, shape in official_vmamba_tiny_v0_shapes().items()
    }


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
        "layers.1.downsample.norm.weight",  # torchvision's PatchMerging has VMamba's own names
        "layers.1.downsample.reduction.weight",
        "classifier.norm.weight",
        "classifier.head.bias",
        "layers.3.blocks.0.op.A_logs",
    ]


def test_official_key_list_matches_the_reported_size() -> None:
    """Sanity check of the hand-written key list: VMamba-Tiny v0 has ~22.9 M parameters (classifier incl.)."""
    shapes = official_vmamba_tiny_v0_shapes()
    assert len(shapes) == 4 + 15 * 13 + 3 * 3 + 4
    assert 22.8e6 < sum(math.prod(shape) for shape in shapes.values()) < 23.0e6


def test_load_official_checkpoint(tmp_path):
    """Every official tensor (classifier aside) lands in exactly one parameter/buffer, loaded strictly."""
    state = official_state_dict()
    path = tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth"
    torch.save({"model": state, "epoch": 292}, path)
    model = load_vmamba_checkpoint(VMambaTiny(), path)
    loaded = model.state_dict()
    backbone_keys = [k for k in state if not k.startswith(("norm.", "head."))]
    assert len(loaded) == len(backbone_keys)
    # Each checkpoint tensor is unique, so a bijection of values shows nothing was left at its init,
    # duplicated or skipped.
    unmatched = dict(loaded)
    for key in backbone_keys:
        match = [name for name, value in unmatched.items() if torch.equal(value, state[key])]
        assert len(match) == 1, (key, match)
        del unmatched[match[0]]
    assert not unmatched
    # And the names mean the same modules (spec renames: ln_1 -> norm, self_attention -> op, ...).
    pairs = {
        "patch_embed.proj.weight": model.patch_embed[0].weight,
        "patch_embed.norm.bias": model.patch_embed[2].bias,
        "layers.0.blocks.1.ln_1.weight": model.layers[0].blocks[1].norm.weight,
        "layers.2.blocks.8.self_attention.A_logs": model.layers[2].blocks[8].op.A_logs,
        "layers.3.blocks.1.self_attention.x_proj_weight": model.layers[3].blocks[1].op.x_proj_weight,
        "layers.1.blocks.0.self_attention.out_norm.weight": model.layers[1].blocks[0].op.out_norm.weight,
    }
    for key, parameter in pairs.items():
        assert torch.equal(parameter, state[key]), key


def test_load_rejects_wrong_keys(tmp_path):
    state = official_state_dict()
    state["layers.0.blocks.0.self_attention.typo_weight"] = state.pop("layers.0.blocks.0.self_attention.Ds")
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError, match=r"missing keys \(1\).*layers\.0\.blocks\.0\.op\.Ds") as info:
        load_vmamba_checkpoint(VMambaTiny(), path)
    assert "unexpected keys (1): ['layers.0.blocks.0.op.typo_weight']" in str(info.value)


def test_load_rejects_wrong_shapes(tmp_path):
    state = official_state_dict()
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
