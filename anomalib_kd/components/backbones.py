"""Teacher backbones and their pretrained weights: local files first, then timm's own download.

Backbones are built by timm with ``pretrained=False`` (building never touches the network);
pretrained weights are loaded later, at the start of training, by :func:`load_pretrained_backbone`:

1. an explicit file given by the user (argument ``weights_path``),
2. the directory named by the environment variable ``ANOMALIB_KD_WEIGHTS``,
3. the caches timm itself fills (Hugging Face hub cache, torch hub cache),
4. otherwise timm's own pretrained loading (``timm.create_model(name, pretrained=True)``, from the
   Hugging Face hub), unless ``HF_HUB_OFFLINE=1`` or ``ANOMALIB_KD_OFFLINE=1``.

When nothing is found and nothing may be downloaded, :class:`MissingWeightsError` names the expected
files and the ways to supply one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

from .weights import (
    WEIGHTS_ENV,
    MissingWeightsError,
    downloads_disabled,
    explicit_weights_file,
    find_in_weights_dir,
    load_weights_into,
    offline_status,
    read_state_dict,
    weights_dir_status,
)

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHTS_ENV",
    "MissingWeightsError",
    "candidate_file_names",
    "create_feature_extractor",
    "load_pretrained_backbone",
    "load_state_dict_file",
    "load_weights_into",
    "resolve_weights_file",
]


def _pretrained_cfg(backbone: str) -> dict:
    """timm's pretrained config of ``backbone`` (offline: reads timm's registry only)."""
    model_name, _, tag = backbone.partition(".")
    cfg = timm.models.get_pretrained_cfg(backbone) or timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return {"architecture": model_name, "tag": tag}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def candidate_file_names(backbone: str, extra_names: Sequence[str] = ()) -> list[str]:
    """File names under which the weights of ``backbone`` are accepted in ``$ANOMALIB_KD_WEIGHTS``."""
    cfg = _pretrained_cfg(backbone)
    arch = cfg.get("architecture") or backbone.partition(".")[0]
    tag = cfg.get("tag") or ""
    full = f"{arch}.{tag}" if tag else arch
    names = [*extra_names, f"{backbone}.safetensors", f"{backbone}.pth", f"{full}.safetensors", f"{full}.pth"]
    if cfg.get("url"):
        names.append(Path(cfg["url"]).name)  # the file timm/torchvision download, e.g. ...-95faca4d.pth
    if cfg.get("hf_hub_id"):
        names += [f"{cfg['hf_hub_id']}/model.safetensors", f"{cfg['hf_hub_id']}/pytorch_model.bin"]
    return list(dict.fromkeys(names))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME``/hub).

    Read at call time, so a changed environment is honoured even after ``huggingface_hub`` was imported.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _timm_cache_files(backbone: str) -> list[Path]:
    """Where timm's download would have cached the weights (Hugging Face hub cache, torch hub cache)."""
    cfg = _pretrained_cfg(backbone)
    found: list[Path] = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(hub_id, filename, cache_dir=hub_cache_dir())
            if isinstance(path, str):
                found.append(Path(path))
    if cfg.get("url"):
        found.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name)
    return [path for path in found if path.is_file()]


def _missing_message(backbone: str, names: Sequence[str], cause: str) -> str:
    return (
        f"No pretrained weights for backbone '{backbone}': {cause} Expected one of the files {list(names)}. "
        f"Supply it in one of these ways: (1) pass the file path explicitly "
        f"(e.g. `--model.weights_path /path/to/{names[0]}`), (2) put it in a directory and set "
        f"{WEIGHTS_ENV}=/that/directory ({weights_dir_status()}), (3) let timm download it once "
        f"(online, without HF_HUB_OFFLINE / ANOMALIB_KD_OFFLINE: timm.create_model('{backbone}', "
        f"pretrained=True)) and copy its cache ({hub_cache_dir()}). Or train without pretrained weights "
        f"with `pre_trained=False` (much lower accuracy)."
    )


def resolve_weights_file(
    backbone: str,
    weights_path: str | Path | None = None,
    extra_names: Sequence[str] = (),
) -> Path:
    """Find a local weights file of ``backbone`` (explicit path, then env dir, then timm's caches).

    Args:
        backbone: timm model name, optionally with a pretrained tag (``wide_resnet50_2.tv_in1k``).
        weights_path: explicit file. If given it must exist: no silent fallback to another file.
        extra_names: further accepted file names in the ``$ANOMALIB_KD_WEIGHTS`` directory.

    Raises:
        MissingWeightsError: no local file; the message says which files and how to supply one.
    """
    explicit = explicit_weights_file(
        weights_path, f"Pretrained weights file for '{backbone}' not found: {{path}}"
    )
    if explicit is not None:
        return explicit
    names = candidate_file_names(backbone, extra_names)
    found = find_in_weights_dir(names)
    if found is not None:
        return found
    cached = _timm_cache_files(backbone)
    if cached:
        return cached[0]
    raise MissingWeightsError(_missing_message(backbone, names, f"no local file. {offline_status()}"))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (timm's loader, ``weights_only``)."""
    return read_state_dict(path)


def download_pretrained_state(backbone: str) -> dict[str, torch.Tensor]:
    """timm's own pretrained loading of ``backbone`` (Hugging Face hub, cached as timm caches it).

    Raises:
        MissingWeightsError: downloads are disabled (nothing is fetched) or timm's download failed.
    """
    names = candidate_file_names(backbone)
    if downloads_disabled():
        raise MissingWeightsError(_missing_message(backbone, names, f"no local file. {offline_status()}"))
    cfg = _pretrained_cfg(backbone)
    # The hub cache as the environment names it now (timm's default would be fixed at import time).
    cache = {"cache_dir": hub_cache_dir()} if cfg.get("hf_hub_id") else {}
    try:
        model = timm.create_model(backbone, pretrained=True, **cache)
    except Exception as error:  # network, hub or registry errors: one message with the ways out
        cause = f"timm's download failed ({type(error).__name__}: {error})."
        raise MissingWeightsError(_missing_message(backbone, names, cause)) from error
    return model.state_dict()


def create_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    requires_grad: bool = False,
) -> TimmFeatureExtractor:
    """anomalib's ``TimmFeatureExtractor`` built without downloading (``pre_trained=False``).

    Load weights afterwards with :func:`load_pretrained_backbone`.
    """
    return TimmFeatureExtractor(
        backbone=backbone, layers=list(layers), pre_trained=False, requires_grad=requires_grad
    )


def load_pretrained_backbone(
    extractor: TimmFeatureExtractor | nn.Module,
    backbone: str,
    weights_path: str | Path | None = None,
    extra_names: Sequence[str] = (),
) -> Path:
    """Load pretrained weights of ``backbone`` into a feature extractor (or a plain timm model).

    A local file (see :func:`resolve_weights_file`) is used when there is one; otherwise timm downloads
    the weights (:func:`download_pretrained_state`). An explicit ``weights_path`` that does not exist is
    an error, never a reason to download. Returns the file loaded (after a download: the file timm cached,
    found in its caches, else the hub cache folder).
    """
    target = getattr(extractor, "feature_extractor", extractor)
    try:
        path = resolve_weights_file(backbone, weights_path, extra_names)
    except MissingWeightsError:
        if weights_path is not None:
            raise
        state = download_pretrained_state(backbone)
        cached = _timm_cache_files(backbone)
        source = cached[0] if cached else hub_cache_dir()
        load_weights_into(target, state, str(source))
        logger.info("Loaded pretrained weights of %s downloaded by timm (%s)", backbone, source)
        return source
    load_weights_into(target, read_state_dict(path), str(path))
    logger.info("Loaded pretrained weights of %s from %s", backbone, path)
    return path
