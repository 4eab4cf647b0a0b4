"""DHKD teacher: EfficientAD's medium PDN (padding on, 384 channels) and its weight-file loader.

The network is anomalib's
:class:`~anomalib.models.image.efficient_ad.torch_model.MediumPatchDescriptionNetwork`
built with ``padding=True`` (spec 1.3: 384x64x64 output at 256 px; it ImageNet-normalises its [0, 1]
input itself). Weights are never downloaded: they come from a local file. Accepted layouts:

- anomalib's ``pretrained_teacher_medium.pth`` (keys ``conv1.* .. conv6.*``), also nested or prefixed, e.g.
  an anomalib EfficientAd Lightning checkpoint (``state_dict`` / ``model.teacher.conv1.weight``);
- the EfficientAD pretraining output / nelson1425 ``teacher_medium.pth`` / DHKD's
  ``teacher_medium_final_state.pth`` (``nn.Sequential`` indices ``0, 3, 6, 8, 10, 12``);
- the output of :mod:`anomalib_kd.tools.distill_pdn` (anomalib layout) and its resumable checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from anomalib.models.image.efficient_ad.torch_model import MediumPatchDescriptionNetwork

from anomalib_kd.components.backbones import WEIGHTS_ENV, MissingWeightsError, load_state_dict_file

logger = logging.getLogger(__name__)

__all__ = [
    "TEACHER_FILE_NAMES",
    "build_teacher",
    "convert_pdn_state_dict",
    "load_teacher_weights",
    "resolve_teacher_file",
]

# Sequential indices of the six convs in EfficientAD's get_pdn_medium (conv, relu, pool, conv, ...).
_SEQUENTIAL_CONV_INDICES = (0, 3, 6, 8, 10, 12)
# File names looked up in $ANOMALIB_KD_WEIGHTS and in anomalib's EfficientAd weight cache.
TEACHER_FILE_NAMES = (
    "pretrained_teacher_medium.pth",
    "teacher_medium_final_state.pth",
    "teacher_medium.pth",
    "pdn_medium.pth",
)


def build_teacher(out_channels: int = 384) -> MediumPatchDescriptionNetwork:
    """The medium PDN with padding (spec 1.3), randomly initialised."""
    return MediumPatchDescriptionNetwork(out_channels=out_channels, padding=True)


def convert_pdn_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any accepted layout to anomalib's ``conv1..conv6`` keys (see the module docstring).

    Raises:
        KeyError: no PDN-medium weights found; the message lists a few of the keys seen.
    """
    keys = list(state)
    # anomalib layout, possibly under a prefix ("teacher.", "model.teacher.", ...): prefer a teacher prefix.
    prefixes = [k[: -len("conv1.weight")] for k in keys if k.endswith("conv1.weight")]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    prefixes = [p for p in prefixes if all(f"{p}conv{i}.weight" in state for i in range(1, 7))]
    if prefixes:
        prefix = next((p for p in prefixes if "teacher" in p), prefixes[0])
        return {
            f"conv{i}.{kind}": state[f"{prefix}conv{i}.{kind}"]
            for i in range(1, 7)
            for kind in ("weight", "bias")
        }
    # EfficientAD nn.Sequential layout.
    prefixes = [k[: -len("12.weight")] for k in keys if k.endswith("12.weight")]
    prefixes = [p for p in prefixes if (p == "" or p.endswith(".")) and f"{p}0.weight" in state]
    if prefixes:
        prefix = next((p for p in prefixes if "teacher" in p), prefixes[0])
        return {
            f"conv{i + 1}.{kind}": state[f"{prefix}{index}.{kind}"]
            for i, index in enumerate(_SEQUENTIAL_CONV_INDICES)
            for kind in ("weight", "bias")
        }
    msg = (
        "No PDN-medium teacher weights found: expected keys conv1..conv6 (anomalib) or 0,3,6,8,10,12 "
        f"(EfficientAD nn.Sequential). First keys seen: {keys[:8]}"
    )
    raise KeyError(msg)


def _anomalib_cache_dir() -> Path:
    """anomalib's EfficientAd weight cache (already downloaded teacher files); only read, never filled."""
    try:
        from anomalib.utils.path import get_pretrained_weights_dir

        return Path(get_pretrained_weights_dir()) / "efficientad_pretrained_weights"
    except (ImportError, AttributeError):  # pragma: no cover - depends on the anomalib version
        return Path.home() / ".cache" / "anomalib" / "pre_trained" / "efficientad_pretrained_weights"


def resolve_teacher_file(teacher_weights: str | Path | None = None) -> Path:
    """Find the teacher file: explicit path, else ``$ANOMALIB_KD_WEIGHTS``, else anomalib's EfficientAd cache.

    Raises:
        MissingWeightsError: no file; the message says how to supply or create one.
    """
    if teacher_weights is not None:
        path = Path(teacher_weights).expanduser()
        if path.is_file():
            return path
        msg = (
            f"DHKD teacher weights file not found: {path}. Pass an existing PDN-medium file with "
            "`--model.teacher_weights /path/to/pretrained_teacher_medium.pth`, create one with "
            "`python -m anomalib_kd.tools.distill_pdn`, or train with `--model.pre_trained false` "
            "(random teacher)."
        )
        raise MissingWeightsError(msg)
    env_dir = os.environ.get(WEIGHTS_ENV)
    search = [Path(env_dir).expanduser()] if env_dir else []
    search.append(_anomalib_cache_dir())
    for directory in search:
        for name in TEACHER_FILE_NAMES:
            if (directory / name).is_file():
                return directory / name
    msg = (
        "DHKD needs a PDN-medium teacher weights file, and none is available offline (nothing is "
        f"downloaded). Looked for {list(TEACHER_FILE_NAMES)} in {[str(d) for d in search]}. Supply one in "
        "any of these ways: (1) `--model.teacher_weights /path/to/pretrained_teacher_medium.pth` "
        "(anomalib's EfficientAd file from efficientad_pretrained_weights.zip, or EfficientAD's "
        "teacher_medium.pth / teacher_medium_final_state.pth); (2) put it in a directory and set "
        f"{WEIGHTS_ENV}=/that/directory; (3) distil your own from a timm backbone: `python -m "
        "anomalib_kd.tools.distill_pdn --images /path/to/images --output pdn_medium.pth` (WideResNet-101 as "
        "in the paper needs its ImageNet weights file); or (4) train with `--model.pre_trained false` "
        "(random teacher, for testing only)."
    )
    raise MissingWeightsError(msg)


def load_teacher_weights(teacher: torch.nn.Module, teacher_weights: str | Path | None = None) -> Path:
    """Load the teacher (strict) from a local file in any accepted layout; returns the file used."""
    path = resolve_teacher_file(teacher_weights)
    try:
        state = load_state_dict_file(path)
    except Exception as error:
        msg = (
            f"Could not read {path} as a state dict ({error}). If it is a whole pickled module (e.g. "
            "EfficientAD's teacher_final.pth), re-save its state_dict: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'teacher_medium_final_state.pth')."
        )
        raise RuntimeError(msg) from error
    converted = convert_pdn_state_dict(state)
    own = teacher.state_dict()
    mismatched = [k for k in own if converted[k].shape != own[k].shape]
    if mismatched:
        msg = f"Teacher weights in {path} do not fit a PDN-medium with {own['conv6.weight'].shape[0]} " + (
            f"channels: mis-shaped {[(k, tuple(converted[k].shape)) for k in mismatched]}"
        )
        raise RuntimeError(msg)
    teacher.load_state_dict(converted, strict=True)
    logger.info("DHKD teacher loaded from %s", path)
    return path
