"""Teacher backbones with offline-first pretrained weights.

Backbones are built by timm with ``pretrained=False`` (nothing touches the network), and pretrained
weights are loaded later, on demand, from a local file. The file is looked up, in order, in:

1. an explicit path given by the user (argument ``weights_path``),
2. the directory named by the environment variable ``ANOMALIB_KD_WEIGHTS``,
3. the caches timm itself fills when it downloads (Hugging Face hub cache, torch hub cache).

When no file is found, :class:`MissingWeightsError` names the expected files and these three ways.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "ANOMALIB_KD_WEIGHTS"

# Keys that wrap a state dict in common checkpoint layouts (timm/torchvision save bare dicts,
# training scripts often nest them).
_NESTED_STATE_KEYS = ("state_dict", "model", "module", "teacher")


class MissingWeightsError(FileNotFoundError):
    """Raised when pretrained weights are requested but no local file holds them."""


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


def _timm_cache_files(backbone: str) -> list[Path]:
    """Where timm would have cached the weights after an earlier (online) download."""
    cfg = _pretrained_cfg(backbone)
    found: list[Path] = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for filename in ("model.safetensors", "pytorch_model.bin"):
                path = try_to_load_from_cache(hub_id, filename)
                if isinstance(path, str):
                    found.append(Path(path))
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            pass
    if cfg.get("url"):
        found.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg["url"]).name)
    return [path for path in found if path.is_file()]


def resolve_weights_file(
    backbone: str,
    weights_path: str | Path | None = None,
    extra_names: Sequence[str] = (),
) -> Path:
    """Find the local weights file of ``backbone`` (explicit path, then env dir, then timm's cache).

    Args:
        backbone: timm model name, optionally with a pretrained tag (``wide_resnet50_2.tv_in1k``).
        weights_path: explicit file. If given it must exist: no silent fallback to another file.
        extra_names: further accepted file names in the ``$ANOMALIB_KD_WEIGHTS`` directory.

    Raises:
        MissingWeightsError: no file found; the message says which files and how to supply one.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path
        msg = f"Pretrained weights file for '{backbone}' not found: {path}"
        raise MissingWeightsError(msg)

    names = candidate_file_names(backbone, extra_names)
    env_dir = os.environ.get(WEIGHTS_ENV)
    if env_dir:
        for name in names:
            path = Path(env_dir).expanduser() / name
            if path.is_file():
                return path
    cached = _timm_cache_files(backbone)
    if cached:
        return cached[0]

    msg = (
        f"No pretrained weights for backbone '{backbone}' are available offline. Expected one of the "
        f"files {names}. Supply it in one of three ways: (1) pass the file path explicitly "
        f"(e.g. `--model.weights_path /path/to/{names[0]}`), (2) put it in a directory and set "
        f"{WEIGHTS_ENV}=/that/directory (currently {'set to ' + repr(env_dir) if env_dir else 'unset'}), "
        f"or (3) let timm cache it once on a machine with internet (timm.create_model('{backbone}', "
        f"pretrained=True)) and copy the cache. Or train without pretrained weights with "
        f"`pre_trained=False` (much lower accuracy)."
    )
    raise MissingWeightsError(msg)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``), unwrapping nesting."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in _NESTED_STATE_KEYS if k in state), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, Mapping):
        msg = f"{path} does not hold a state dict (found {type(state).__name__})."
        raise TypeError(msg)
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_weights_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module``: every parameter/buffer of ``module`` must be present and match.

    Keys of ``state`` that ``module`` lacks (e.g. a classifier head or the layers a features-only
    backbone drops) are ignored; a missing or mis-shaped key raises, naming the keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        msg = (
            f"Weights in {source} do not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(mismatched)} mis-shaped keys {mismatched[:8]}."
        )
        raise RuntimeError(msg)
    module.load_state_dict({k: state[k] for k in own}, strict=True)


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
    """Load local pretrained weights of ``backbone`` into a feature extractor (or a plain timm model).

    Returns the file that was loaded.
    """
    path = resolve_weights_file(backbone, weights_path, extra_names)
    target = getattr(extractor, "feature_extractor", extractor)
    load_weights_into(target, load_state_dict_file(path), str(path))
    logger.info("Loaded pretrained weights of %s from %s", backbone, path)
    return path
