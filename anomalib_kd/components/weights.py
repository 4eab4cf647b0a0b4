"""Pretrained weight files: offline switches, verified atomic downloads and reading a state dict.

Every model looks for its weights locally first (an explicit path, the directory named by
``$ANOMALIB_KD_WEIGHTS``, then the cache its standard download fills) and only then downloads, with the
standard mechanism of each source (timm / Hugging Face hub, anomalib's download helper, a release URL).
Downloads are disabled by ``ANOMALIB_KD_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: then a missing file raises
:class:`MissingWeightsError`, which names the file and the ways to supply it.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.request import urlretrieve

import timm
import torch
from anomalib.data.utils.download import DownloadProgressBar, generate_hash
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "OFFLINE_ENV",
    "WEIGHTS_ENV",
    "ChecksumError",
    "MissingWeightsError",
    "UnreadableWeightsError",
    "download_file",
    "downloads_disabled",
    "fetch_url",
    "find_in_weights_dir",
    "load_weights_into",
    "offline_status",
    "read_state_dict",
    "renamed_argument",
]

WEIGHTS_ENV = "ANOMALIB_KD_WEIGHTS"
OFFLINE_ENV = "ANOMALIB_KD_OFFLINE"
HF_OFFLINE_ENV = "HF_HUB_OFFLINE"

# Keys that wrap a state dict in common checkpoint layouts, beyond the ones timm unwraps itself
# ("state_dict", "model"): e.g. the "teacher" entry of distill_pdn's resumable checkpoints.
_NESTED_STATE_KEYS = ("state_dict", "model", "module", "teacher")


class MissingWeightsError(FileNotFoundError):
    """Raised when pretrained weights are requested but no file holds them and none can be downloaded."""


class UnreadableWeightsError(ValueError):
    """Raised when a weights file cannot be read as a state dict (truncated, random bytes, not torch)."""


class ChecksumError(ValueError):
    """Raised when a downloaded file does not have the published checksum (the file is not kept)."""


def _is_set(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def downloads_disabled() -> bool:
    """``True`` when ``ANOMALIB_KD_OFFLINE`` or ``HF_HUB_OFFLINE`` is set (read at call time)."""
    return _is_set(OFFLINE_ENV) or _is_set(HF_OFFLINE_ENV)


def offline_status() -> str:
    """One sentence for error messages: why nothing was downloaded, or that the download failed."""
    switches = [name for name in (OFFLINE_ENV, HF_OFFLINE_ENV) if _is_set(name)]
    if switches:
        return f"Downloads are disabled ({', '.join(f'{name}=1' for name in switches)})."
    return f"Downloads are enabled (set {OFFLINE_ENV}=1 or {HF_OFFLINE_ENV}=1 to forbid them)."


def explicit_weights_file(weights_path: str | Path | None, not_found: str) -> Path | None:
    """``weights_path`` as an existing file (``None`` when not given).

    Raises:
        MissingWeightsError: ``weights_path`` was given but is no file; the message is ``not_found``
            with ``{path}`` filled in. An explicit file is never replaced by another or by a download.
    """
    if weights_path is None:
        return None
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(not_found.format(path=path))
    return path


def find_in_weights_dir(names: Iterable[str]) -> Path | None:
    """The first of ``names`` present in the directory ``$ANOMALIB_KD_WEIGHTS`` (``None``: unset/absent)."""
    env_dir = os.environ.get(WEIGHTS_ENV)
    if not env_dir:
        return None
    for name in names:
        path = Path(env_dir).expanduser() / name
        if path.is_file():
            return path
    return None


def weights_dir_status() -> str:
    """``$ANOMALIB_KD_WEIGHTS``'s current value, for error messages."""
    env_dir = os.environ.get(WEIGHTS_ENV)
    return f"currently {'set to ' + repr(env_dir) if env_dir else 'unset'}"


def renamed_argument(
    owner: str, new: str, new_value: str | Path | None, old: str, old_value: str | Path | None
) -> str | None:
    """Value of a renamed weights argument: the old name still works, with a ``DeprecationWarning``.

    Old checkpoints pass their saved ``old`` hyper-parameter this way too.

    Raises:
        ValueError: both names are given with different values.
    """
    if old_value is None:
        return None if new_value is None else str(new_value)
    warnings.warn(
        f"{owner}({old}=...) is deprecated, use {new}=... (same meaning).", DeprecationWarning, stacklevel=3
    )
    if new_value is not None and str(new_value) != str(old_value):
        msg = f"{owner}: got {new}={new_value!r} and its old name {old}={old_value!r}; pass only {new}."
        raise ValueError(msg)
    return str(old_value)


def fetch_url(url: str, destination: Path, description: str) -> None:
    """Write the resource at ``url`` (http/https only) to ``destination``, with a progress bar.

    The one place a URL is fetched (tests replace it with a local copy).
    """
    if not url.startswith(("https://", "http://")):
        msg = f"Refusing to download from {url!r}: only http(s) URLs are supported."
        raise ValueError(msg)
    with DownloadProgressBar(unit="B", unit_scale=True, miniters=1, desc=description) as progress_bar:
        urlretrieve(url, filename=destination, reporthook=progress_bar.update_to)


def download_file(
    url: str,
    destination: str | Path,
    sha256: str | None = None,
    verify: Callable[[Path], object] | None = None,
) -> Path:
    """Download ``url`` to ``destination`` atomically: a partial or refused file is never left behind.

    The file is fetched into a temporary file beside ``destination``, checked (``sha256`` when one is
    published; ``verify(path)``, e.g. strict loading, otherwise), then renamed over ``destination``.

    Raises:
        MissingWeightsError: downloads are disabled (:func:`downloads_disabled`); nothing is fetched.
        ChecksumError: the download's SHA-256 differs from ``sha256``.
    """
    destination = Path(destination)
    if downloads_disabled():
        msg = f"Not downloading {url} to {destination}: {offline_status()}"
        raise MissingWeightsError(msg)
    destination.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{destination.name}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=destination.parent)
    os.close(handle)
    partial = Path(temporary)
    try:
        logger.info("Downloading %s to %s", url, destination)
        fetch_url(url, partial, destination.name)
        if sha256 is not None:
            actual = generate_hash(partial, "sha256")
            if actual != sha256.lower():
                msg = (
                    f"Download of {url} refused: its SHA-256 is {actual}, the published one is {sha256}. "
                    f"Nothing was written to {destination}."
                )
                raise ChecksumError(msg)
        if verify is not None:
            verify(partial)
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def _inert_global(full_name: str) -> tuple[type, str]:
    """A stand-in for a pickled class/function outside the weights: it rebuilds as a plain dict."""
    module, _, name = full_name.rpartition(".")
    stand_in = type(name, (), {"__module__": module, "__qualname__": name, "__new__": _new_ordered_dict})
    return stand_in, full_name


def _new_ordered_dict(cls: type, *args: object, **kwargs: object) -> OrderedDict:
    del cls, args, kwargs
    return OrderedDict()


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in _NESTED_STATE_KEYS if k in state), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, Mapping):
        msg = f"{path} does not hold a state dict (found {type(state).__name__})."
        raise TypeError(msg)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with timm's loader (``.safetensors`` or torch file, ``weights_only``).

    timm unwraps ``state_dict`` / ``model`` and strips DDP / ``torch.compile`` prefixes; further nesting
    (``module``, ``teacher``) is unwrapped here. Training checkpoints that also pickle their own config
    objects (e.g. VMamba's yacs ``CfgNode``) are read without executing or importing those objects: each
    is rebuilt as a plain dict inside torch's ``weights_only`` unpickler.
    """
    path = Path(path)
    try:
        state = _load_state(path)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as error:  # torch/safetensors errors do not name the file: add it
        msg = (
            f"Cannot read weights file {path} ({path.stat().st_size} bytes) as a state dict: "
            f"{type(error).__name__}: {error}. Is it truncated, or not a torch/safetensors weights file?"
        )
        raise UnreadableWeightsError(msg) from error
    return _unwrap(state, path)


def _load_state(path: Path) -> object:
    try:
        return timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except RuntimeError as error:
        if not isinstance(error.__cause__, pickle.UnpicklingError):
            raise
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if not unsafe:
            raise
        logger.info("%s also pickles %s; read as plain data (not imported).", path, unsafe)
        with torch.serialization.safe_globals([_inert_global(name) for name in unsafe]):
            return timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)


def load_weights_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``: every parameter/buffer of ``module`` must be present and match.

    Keys of ``state`` under submodules ``module`` lacks (e.g. a classifier head or the layers a
    features-only backbone drops) are ignored; a missing or mis-shaped key raises, naming the file and
    the keys. So does an extra key *inside* a submodule ``module`` has (e.g. ``layer1.2.*`` of a
    ResNet-34 file given to a ResNet-18, whose own keys would all fit): another architecture.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    own_modules = {k.split(".")[0] for k in own}
    extra = [k for k in state if k not in own and k.split(".")[0] in own_modules]
    if missing or mismatched or extra:
        msg = (
            f"Weights in {source} do not fit {type(module).__name__}: {len(missing)} missing keys "
            f"{missing[:8]}, {len(mismatched)} mis-shaped keys {mismatched[:8]}, {len(extra)} unexpected "
            f"keys inside its layers {extra[:8]} (a file of another architecture?)."
        )
        raise RuntimeError(msg)
    module.load_state_dict({k: state[k] for k in own}, strict=True)
