"""Shared fixtures: tiny data made on the fly (no ../shared, no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the test-suite may reach a hub: point every cache at an empty folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ANOMALIB_KD_OFFLINE", "1")  # the non-hub downloads (anomalib, VMamba release)


@pytest.fixture(autouse=True)
def _isolated_weight_caches(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test may pick up weights from the developer's caches or $ANOMALIB_KD_WEIGHTS."""
    empty = tmp_path_factory.mktemp("empty_cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(empty / "torch"))
    monkeypatch.delenv("ANOMALIB_KD_WEIGHTS", raising=False)


@pytest.fixture(scope="session")
def tiny_textures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Textures dataset (brick, 64 px) shared by the model tests."""
    root = tmp_path_factory.mktemp("textures")
    tiny_textures(root).prepare_data()
    return root


TINY_TEXTURES = {
    "category": "brick",
    "image_size": 64,
    "num_train": 8,
    "num_test_good": 4,
    "num_test_defect": 2,
    "defect_types": ["scratch", "blob"],
    "train_batch_size": 4,
    "eval_batch_size": 4,
    "num_workers": 0,
}


def tiny_textures(root: Path) -> "Textures":  # noqa: F821, UP037  (imported lazily)
    """The tiny Textures datamodule over ``root`` (made by ``tiny_textures_root``)."""
    from anomalib_kd.data import Textures

    return Textures(root=root, **TINY_TEXTURES)
