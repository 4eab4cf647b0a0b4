"""DHKD teacher: EfficientAD's medium PDN (padding on, 384 channels) and its weight-file loader.

The network is anomalib's
:class:`~anomalib.models.image.efficient_ad.torch_model.MediumPatchDescriptionNetwork`
built with ``padding=True`` (spec 1.3: 384x64x64 output at 256 px; it ImageNet-normalises its [0, 1]
input itself). Its weights come from a local file when there is one, else from anomalib's own EfficientAd
download (:func:`download_anomalib_teacher`: same URL, helper, SHA-256 and cache directory as
``anomalib.models.EfficientAd``). Accepted file layouts:

- anomalib's ``pretrained_teacher_medium.pth`` (keys ``conv1.* .. conv6.*``), also nested or prefixed, e.g.
  an anomalib EfficientAd Lightning checkpoint (``state_dict`` / ``model.teacher.conv1.weight``);
- the EfficientAD pretraining output / nelson1425 ``teacher_medium.pth`` / DHKD's
  ``teacher_medium_final_state.pth`` (``nn.Sequential`` indices ``0, 3, 6, 8, 10, 12``);
- the output of :mod:`anomalib_kd.tools.distill_pdn` (anomalib layout) and its resumable checkpoints.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from anomalib.data.utils.download import download_and_extract
from anomalib.models.image.efficient_ad.lightning_model import WEIGHTS_DOWNLOAD_INFO
from anomalib.models.image.efficient_ad.torch_model import MediumPatchDescriptionNetwork
from anomalib.utils.path import get_pretrained_weights_dir

from anomalib_kd.components.weights import (
    WEIGHTS_ENV,
    ChecksumError,
    MissingWeightsError,
    downloads_disabled,
    explicit_weights_file,
    find_in_weights_dir,
    offline_status,
    read_state_dict,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TEACHER_DOWNLOAD_INFO",
    "TEACHER_FILE_NAMES",
    "anomalib_teacher_dir",
    "build_teacher",
    "convert_pdn_state_dict",
    "download_anomalib_teacher",
    "load_teacher_weights",
    "resolve_teacher_file",
]

# anomalib's EfficientAd teacher archive (URL and SHA-256), downloaded with anomalib's own helper.
TEACHER_DOWNLOAD_INFO = WEIGHTS_DOWNLOAD_INFO
# The folder the archive extracts to, inside anomalib's pre_trained cache (EfficientAd looks for it too).
_ANOMALIB_TEACHER_FOLDER = "efficientad_pretrained_weights"
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


def anomalib_teacher_dir() -> Path:
    """anomalib's EfficientAd teacher folder, ``pre_trained/efficientad_pretrained_weights`` in its cache."""
    return get_pretrained_weights_dir() / _ANOMALIB_TEACHER_FOLDER


def download_anomalib_teacher() -> Path:
    """Download and extract anomalib's EfficientAd teacher archive into anomalib's cache, atomically.

    anomalib's ``download_and_extract`` (its URL, progress bar and SHA-256 check) runs in a staging
    folder inside the cache; only a verified, fully extracted folder is renamed into place, so an
    interrupted or refused download leaves nothing behind. Returns the teacher folder.

    Raises:
        MissingWeightsError: downloads are disabled; nothing is fetched.
        ChecksumError: the archive does not have anomalib's published SHA-256.
    """
    if downloads_disabled():
        msg = f"Not downloading {TEACHER_DOWNLOAD_INFO.url}: {offline_status()}"
        raise MissingWeightsError(msg)
    target = anomalib_teacher_dir()
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_ANOMALIB_TEACHER_FOLDER}.", dir=root))
    try:
        try:
            download_and_extract(staging, TEACHER_DOWNLOAD_INFO)
        except ValueError as error:  # anomalib's check_hash
            msg = f"Download of {TEACHER_DOWNLOAD_INFO.url} refused ({error}). Nothing was kept in {root}."
            raise ChecksumError(msg) from error
        extracted = staging / _ANOMALIB_TEACHER_FOLDER
        if not extracted.is_dir():
            msg = f"{TEACHER_DOWNLOAD_INFO.url} did not contain the folder {_ANOMALIB_TEACHER_FOLDER}/."
            raise RuntimeError(msg)
        try:
            extracted.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("anomalib's EfficientAd teacher weights downloaded to %s", target)
    return target


def resolve_teacher_file(weights_path: str | Path | None = None, download: bool = True) -> Path:
    """Find the teacher file: explicit path, ``$ANOMALIB_KD_WEIGHTS``, anomalib's cache, else download.

    Args:
        weights_path: explicit file. If given it must exist (never replaced by a download).
        download: allow anomalib's EfficientAd download when no local file exists (and downloads are
            not disabled by ``ANOMALIB_KD_OFFLINE`` / ``HF_HUB_OFFLINE``).

    Raises:
        MissingWeightsError: no file; the message says how to supply or create one.
    """
    not_found = (
        "DHKD teacher weights file not found: {path}. Pass an existing PDN-medium file with "
        "`--model.weights_path /path/to/pretrained_teacher_medium.pth`, create one with "
        "`python -m anomalib_kd.tools.distill_pdn`, or train with `--model.pre_trained false` "
        "(random teacher)."
    )
    found = explicit_weights_file(weights_path, not_found) or find_in_weights_dir(TEACHER_FILE_NAMES)
    if found is not None:
        return found
    cache = anomalib_teacher_dir()
    for name in TEACHER_FILE_NAMES:
        if (cache / name).is_file():
            return cache / name
    if download and not downloads_disabled():
        downloaded = download_anomalib_teacher() / TEACHER_FILE_NAMES[0]
        if downloaded.is_file():
            return downloaded
        msg = (
            f"anomalib's EfficientAd archive ({TEACHER_DOWNLOAD_INFO.url}) holds no {TEACHER_FILE_NAMES[0]}."
        )
        raise MissingWeightsError(msg)
    status = offline_status() if download else "Downloading was not allowed here."
    msg = (
        f"DHKD needs a PDN-medium teacher weights file, and none is available locally. {status} Looked "
        f"for {list(TEACHER_FILE_NAMES)} in ${WEIGHTS_ENV} and {cache}. Supply one in any of these ways: "
        "(1) `--model.weights_path /path/to/pretrained_teacher_medium.pth` (anomalib's EfficientAd file, "
        "or EfficientAD's teacher_medium.pth / teacher_medium_final_state.pth); (2) put it in a directory "
        f"and set {WEIGHTS_ENV}=/that/directory; (3) online, unset ANOMALIB_KD_OFFLINE / HF_HUB_OFFLINE and "
        f"it is downloaded as anomalib's EfficientAd does ({TEACHER_DOWNLOAD_INFO.url} into {cache.parent}); "
        "(4) distil your own from a timm backbone: `python -m anomalib_kd.tools.distill_pdn --images "
        "/path/to/images --output pdn_medium.pth`; or (5) train with `--model.pre_trained false` (random "
        "teacher, for testing only)."
    )
    raise MissingWeightsError(msg)


def load_teacher_weights(
    teacher: torch.nn.Module, weights_path: str | Path | None = None, download: bool = True
) -> Path:
    """Load the teacher (strict) from a file in any accepted layout (see :func:`resolve_teacher_file`).

    Returns the file used.
    """
    path = resolve_teacher_file(weights_path, download=download)
    try:
        state = read_state_dict(path)
    except Exception as error:
        msg = (
            f"Could not read {path} as a state dict ({error}). If it is a whole pickled module (e.g. "
            "EfficientAD's teacher_final.pth), re-save its state_dict: "
            "torch.save(torch.load(path, weights_only=False).state_dict(), 'teacher_medium_final_state.pth')."
        )
        raise RuntimeError(msg) from error
    try:
        converted = convert_pdn_state_dict(state)
    except KeyError as error:  # name the file: the layout message alone does not say which one
        msg = f"{path}: {error.args[0]}"
        raise KeyError(msg) from error
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
