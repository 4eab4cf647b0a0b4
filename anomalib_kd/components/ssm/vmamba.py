"""VMamba-Tiny v0 backbone (the PDD global teacher) and a loader for the official v0 checkpoint.

Architecture (MzeroMiko/VMamba ``vanilla_vmamba_tiny``, ``forward_type="v0"``, ``mlp_ratio=0``):
patch embed (4x4 conv, LayerNorm) -> 4 stages of ``VSSBlock`` (x + DropPath(SS2D(LN(x)))), depths
(2, 2, 9, 2), dims (96, 192, 384, 768), each stage but the last followed by Swin patch merging
(torchvision's ``PatchMerging``: 2x2 neighbours concatenated, LayerNorm(4C), Linear(4C -> 2C)).
Channels-last inside, like VMamba. Stochastic depth is timm's ``DropPath``.

Module names reproduce the official model after its own v0 key renames (``patch_embed.0/2``,
``layers.i.blocks.j.norm/op``), see :func:`convert_vmamba_v0_state_dict`; the patch merging keeps the
checkpoint's own names ``layers.i.downsample.norm/reduction``.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging

from ..weights import (
    WEIGHTS_ENV,
    MissingWeightsError,
    download_file,
    downloads_disabled,
    explicit_weights_file,
    find_in_weights_dir,
    offline_status,
    read_state_dict,
    weights_dir_status,
)
from .ss2d import SS2D

__all__ = [
    "VMAMBA_TINY_CHECKPOINT",
    "VMambaTiny",
    "VSSBlock",
    "convert_vmamba_v0_state_dict",
    "load_vmamba_checkpoint",
]

VMAMBA_TINY_CHECKPOINT = "vssmtiny_dp01_ckpt_epoch_292.pth"
_VMAMBA_TINY_URL = (
    "https://github.com/MzeroMiko/VMamba/releases/download/%23v0cls/vssmtiny_dp01_ckpt_epoch_292.pth"
)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (keeps the official Sequential indices)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class VSSBlock(nn.Module):
    """VMamba block without MLP: ``x + DropPath(SS2D(LayerNorm(x)))``, channels-last.

    Also DHKD's ``STMBlock`` (MTMamba's VSS block with ``mlp_ratio=0``, used as ``VSSBlock(64)`` with no
    drop path). Extra keyword arguments go to :class:`SS2D`.
    """

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, **ss2d_kwargs: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.op = SS2D(d_model=hidden_dim, **ss2d_kwargs)  # type: ignore[arg-type]
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``."""
        return x + self.drop_path(self.op(self.norm(x)))


class VMambaTiny(nn.Module):
    """VMamba-Tiny v0 feature extractor returning the 4 stage outputs that PDD taps.

    ``forward(x)`` with ``x`` ``(B, 3, H, W)`` (ImageNet-normalised) returns a list of 4 NCHW tensors,
    each taken after a whole stage (its blocks and then its patch merging; no output norm):
    at 256x256 these are 192@32x32, 384@16x16, 768@8x8 and 768@8x8.

    Args:
        depths: blocks per stage.
        dims: channels per stage.
        d_state: SSM state size.
        ssm_ratio: SS2D inner-width ratio.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (0.2 for vanilla_vmamba_tiny).
        in_chans: image channels.
        patch_size: patch-embedding stride.
        chunk_size: chunk length of the pure-PyTorch scan (``None``: automatic).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: Sequence[int] = (96, 192, 384, 768),
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        patch_size: int = 4,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dims = list(dims)
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            Permute(0, 2, 3, 1),
            nn.LayerNorm(dims[0]),
        )
        if any(nxt != 2 * dim for dim, nxt in itertools.pairwise(dims)):
            msg = f"VMambaTiny: patch merging doubles the channels, so dims must double per stage, got {dims}"
            raise ValueError(msg)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        start = 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            blocks = nn.Sequential(
                *(
                    VSSBlock(
                        dim,
                        drop_path=rates[start + j],
                        d_state=d_state,
                        ssm_ratio=ssm_ratio,
                        chunk_size=chunk_size,
                    )
                    for j in range(depth)
                )
            )
            start += depth
            downsample: nn.Module = PatchMerging(dim) if i < len(depths) - 1 else nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=blocks, downsample=downsample)))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # VMamba's init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorm (SS2D's raw
        # parameters keep their own Mamba init).
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints written before the switch to torchvision's PatchMerging name its LayerNorm and
        # Linear ``downsample.1`` / ``downsample.2``; rename them to ``downsample.norm`` / ``.reduction``.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + _rename_legacy_downsample(key[len(prefix) :])
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[z0, z1, z2, z3]``, NCHW, each after stage ``i``'s blocks and merging."""
        x = self.patch_embed(x)
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x.permute(0, 3, 1, 2))
        return features


# Official v0 names -> this module's names (PDD's/VMamba's own rename list minus the patch-merging
# renames: torchvision's PatchMerging has the checkpoint's own ``downsample.norm/reduction``); prefix matches.
_V0_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^patch_embed\.proj\.", "patch_embed.0."),
    (r"^patch_embed\.norm\.", "patch_embed.2."),
    (r"^(layers\.\d+\.blocks\.\d+\.)ln_1\.", r"\1norm."),
    (r"^(layers\.\d+\.blocks\.\d+\.)self_attention\.", r"\1op."),
    (r"^norm\.", "classifier.norm."),
    (r"^head\.", "classifier.head."),
)


# This package's earlier names of the patch-merging LayerNorm / Linear (a Sequential's indices 1 / 2).
_LEGACY_DOWNSAMPLE_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(layers\.\d+\.downsample\.)1\.", r"\1norm."),
    (r"^(layers\.\d+\.downsample\.)2\.", r"\1reduction."),
)


def _rename_legacy_downsample(key: str) -> str:
    for pattern, repl in _LEGACY_DOWNSAMPLE_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def convert_vmamba_v0_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official VMamba v0 state dict to this module's keys (already-new keys pass unchanged).

    ``patch_embed.proj/norm -> patch_embed.0/2``, ``ln_1 -> norm``, ``self_attention -> op``,
    ``norm/head -> classifier.norm/head``; ``downsample.norm/reduction`` keep their names; a DDP
    ``module.`` prefix is stripped, and this package's earlier ``downsample.1/2`` become
    ``downsample.norm/reduction``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = key.removeprefix("module.")
        for pattern, repl in _V0_RENAMES:
            new = re.sub(pattern, repl, new)
        out[_rename_legacy_downsample(new)] = value
    return out


def load_vmamba_checkpoint(model: VMambaTiny, path: str | Path) -> VMambaTiny:
    """Load the official ``vssmtiny_dp01_ckpt_epoch_292.pth`` from the local file ``path``.

    The state dict (under ``"model"``, or the file itself) is read with timm's loader (the training
    config pickled beside it is read as plain data, never imported), renamed with
    :func:`convert_vmamba_v0_state_dict`, the ImageNet classifier (``classifier.norm/head``) is dropped
    because :class:`VMambaTiny` has none, and the rest is loaded strictly. To find or download the file,
    use :func:`load_pretrained_vmamba`.

    Raises:
        FileNotFoundError: the file does not exist (the message says where to get it).
        RuntimeError: keys or shapes differ; lists the missing and unexpected keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = (
            f"VMamba-Tiny v0 checkpoint not found: {path}. Pass an existing {VMAMBA_TINY_CHECKPOINT} "
            f"(VMamba release '#v0cls': {VMAMBA_TINY_URL}), or pass no path and let "
            "load_pretrained_vmamba find or download it."
        )
        raise FileNotFoundError(msg)
    try:
        state = read_state_dict(path)
    except (TypeError, RuntimeError) as error:
        msg = f"{path}: expected a state dict (or a dict with key 'model'): {error}"
        raise RuntimeError(msg) from error
    state = convert_vmamba_v0_state_dict(state)
    own = model.state_dict()
    if not any(k.startswith("classifier.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        msg = (
            f"{path} does not match {type(model).__name__} after the v0 key renames.\n"
            f"missing keys ({len(missing)}): {missing}\n"
            f"unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"shape mismatches ({len(mismatched)}): {mismatched}"
        )
        raise RuntimeError(msg)
    model.load_state_dict(state, strict=True)
    return model


# The official release file (spec: PDD's code downloads it from here).
VMAMBA_TINY_URL = _VMAMBA_TINY_URL
# The VMamba release publishes no checksum for this file: a download is verified by loading it strictly.
VMAMBA_TINY_SHA256: str | None = None


def vmamba_cache_file() -> Path:
    """Where a downloaded checkpoint is kept: torch hub's checkpoints folder (``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VMAMBA_TINY_CHECKPOINT


def find_vmamba_checkpoint(weights_path: str | Path | None = None) -> Path | None:
    """The local checkpoint: explicit path, else ``$ANOMALIB_KD_WEIGHTS/<name>``, else the download cache.

    Raises:
        MissingWeightsError: an explicit ``weights_path`` that does not exist (never replaced by another).
    """
    not_found = (
        f"VMamba-Tiny v0 checkpoint not found: {{path}} (expected the official {VMAMBA_TINY_CHECKPOINT})."
    )
    found = explicit_weights_file(weights_path, not_found) or find_in_weights_dir([VMAMBA_TINY_CHECKPOINT])
    if found is not None:
        return found
    cached = vmamba_cache_file()
    return cached if cached.is_file() else None


def load_pretrained_vmamba(model: VMambaTiny, weights_path: str | Path | None = None) -> Path:
    """Load the official VMamba-Tiny v0 weights into ``model``: a local file, else the release download.

    Local files come first (:func:`find_vmamba_checkpoint`). Otherwise the official release file is
    downloaded with a progress bar into :func:`vmamba_cache_file`, through a temporary file that is
    loaded strictly into ``model`` before it is renamed into place (no checksum is published), unless
    ``ANOMALIB_KD_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``. Returns the file loaded.

    Raises:
        MissingWeightsError: no local file and downloads disabled (names the file and the ways to supply it).
    """
    path = find_vmamba_checkpoint(weights_path)
    if path is not None:
        load_vmamba_checkpoint(model, path)
        return path
    if downloads_disabled():
        msg = (
            f"No VMamba-Tiny v0 checkpoint available locally. {offline_status()} Supply "
            f"{VMAMBA_TINY_CHECKPOINT} (VMamba GitHub release '#v0cls', {VMAMBA_TINY_URL}) in one of these "
            f"ways: (1) pass it (`--model.vmamba_weights_path /path/to/{VMAMBA_TINY_CHECKPOINT}`), "
            f"(2) put it in the directory named by {WEIGHTS_ENV} ({weights_dir_status()}), (3) put it in "
            f"{vmamba_cache_file().parent}, or (4) go online and it is downloaded there. Or train with "
            "`pre_trained=False` (random teachers, much lower accuracy)."
        )
        raise MissingWeightsError(msg)
    return download_file(
        VMAMBA_TINY_URL,
        vmamba_cache_file(),
        sha256=VMAMBA_TINY_SHA256,
        verify=lambda downloaded: load_vmamba_checkpoint(model, downloaded),
    )
