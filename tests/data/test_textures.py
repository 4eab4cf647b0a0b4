"""Tests for the generated Textures dataset / datamodule."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalib_kd.data.textures import (
    CATEGORIES,
    DEFECT_TYPES,
    MARKER_NAME,
    Textures,
    synthesize_sample,
)

SIZE = 64
COUNTS = {"num_train": 4, "num_test_good": 2, "num_test_defect": 2}


def _datamodule(root: Path, **kwargs) -> Textures:
    args = {"root": str(root), "category": "brick", "image_size": SIZE, "num_workers": 0, **COUNTS}
    args.update(kwargs)
    return Textures(**args)


def _png_files(category_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(category_dir)): p.read_bytes() for p in sorted(category_dir.rglob("*.png"))}


def test_layout_and_counts(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path, category="grass")
    dm.prepare_data()
    cat = tmp_path / "grass"
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(4)]
    assert len(list((cat / "test" / "good").glob("*.png"))) == 2
    for defect in DEFECT_TYPES:
        assert sorted(p.name for p in (cat / "test" / defect).iterdir()) == ["000.png", "001.png"]
        masks = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
        assert masks == ["000_mask.png", "001_mask.png"]
    assert json.loads((cat / MARKER_NAME).read_text())["category"] == "grass"
    image = cv2.imread(str(cat / "train" / "good" / "000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (SIZE, SIZE, 3)
    assert image.dtype == np.uint8


def test_masks_binary_nonempty_and_match_change(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path)
    dm.prepare_data()
    for mask_path in (tmp_path / "brick" / "ground_truth").rglob("*_mask.png"):
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.ndim == 2
        assert set(np.unique(mask).tolist()) == {0, 255}
        assert (mask > 0).sum() >= 12


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defect_changes_image_inside_mask(category: str, defect: str) -> None:
    for index in range(3):
        clean, image, mask = synthesize_sample(
            category, "test", index, defect=defect, seed=3, image_size=SIZE
        )
        assert clean.shape == image.shape == (SIZE, SIZE, 3)
        assert mask.shape == (SIZE, SIZE)
        inside = mask > 0
        assert inside.sum() >= 12
        diff = np.abs(image.astype(np.int16) - clean.astype(np.int16)).mean(axis=2)
        assert diff[inside].mean() >= 10
        assert diff[inside].mean() > 3 * diff[~inside].mean()


def test_normal_sample_is_clean() -> None:
    clean, image, mask = synthesize_sample("gravel", "train", 0, image_size=SIZE)
    assert np.array_equal(clean, image)
    assert not mask.any()


def test_train_and_test_come_from_disjoint_halves(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib_kd.data import textures

    # source texture whose left half is dark and right half bright: train crops must be dark only
    fake = np.zeros((512, 512), np.float32)
    fake[:, 256:] = 200.0
    monkeypatch.setattr(textures, "_source_texture", lambda category: fake)
    for index in range(20):
        train, _, _ = synthesize_sample("brick", "train", index, image_size=SIZE)
        test, _, _ = synthesize_sample("brick", "test", index, image_size=SIZE)
        assert train.max() < 20
        assert test.min() > 180
    with pytest.raises(ValueError, match="split"):
        synthesize_sample("gravel", "val", 0)


def test_deterministic_by_seed(tmp_path: Path) -> None:
    _datamodule(tmp_path / "a", generation_seed=7).prepare_data()
    _datamodule(tmp_path / "b", generation_seed=7).prepare_data()
    _datamodule(tmp_path / "c", generation_seed=8).prepare_data()
    files_a = _png_files(tmp_path / "a" / "brick")
    files_b = _png_files(tmp_path / "b" / "brick")
    files_c = _png_files(tmp_path / "c" / "brick")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)


def test_second_prepare_does_not_regenerate(tmp_path: Path) -> None:
    _datamodule(tmp_path).prepare_data()
    cat = tmp_path / "brick"
    before = {p: p.stat().st_mtime_ns for p in cat.rglob("*") if p.is_file()}
    _datamodule(tmp_path).prepare_data()
    after = {p: p.stat().st_mtime_ns for p in cat.rglob("*") if p.is_file()}
    assert before == after


def test_incomplete_cache_regenerates(tmp_path: Path) -> None:
    _datamodule(tmp_path).prepare_data()
    cat = tmp_path / "brick"
    reference = _png_files(cat)
    victim = cat / "test" / "scratch" / "001.png"
    victim.unlink()
    _datamodule(tmp_path).prepare_data()
    assert victim.is_file()
    assert _png_files(cat) == reference

    (cat / MARKER_NAME).unlink()  # interrupted run: marker is written last
    (cat / "train" / "good" / "000.png").write_bytes(b"garbage")
    _datamodule(tmp_path).prepare_data()
    assert _png_files(cat) == reference


def test_changed_parameters_regenerate(tmp_path: Path) -> None:
    _datamodule(tmp_path).prepare_data()
    _datamodule(tmp_path, num_train=6, image_size=48).prepare_data()
    cat = tmp_path / "brick"
    assert len(list((cat / "train" / "good").glob("*.png"))) == 6
    assert cv2.imread(str(cat / "train" / "good" / "005.png")).shape == (48, 48, 3)
    assert json.loads((cat / MARKER_NAME).read_text())["num_train"] == 6


def test_setup_dataloaders(tmp_path: Path) -> None:
    dm = _datamodule(tmp_path, category="gravel", train_batch_size=3, eval_batch_size=4)
    assert not (tmp_path / "gravel").exists()  # nothing generated in __init__
    dm.setup()  # without prepare_data: generates defensively
    assert dm.name == "Textures"
    assert dm.category == "gravel"
    assert len(dm.train_data) == 4
    assert len(dm.test_data) == 2 + 2 * len(DEFECT_TYPES)
    assert len(dm.val_data) == len(dm.test_data)

    train = next(iter(dm.train_dataloader()))
    assert train.image.shape == (3, 3, SIZE, SIZE)
    assert (train.gt_label == 0).all()

    labels, masks = [], []
    for batch in dm.test_dataloader():
        assert batch.image.shape[1:] == (3, SIZE, SIZE)
        assert batch.gt_mask.shape == (batch.image.shape[0], SIZE, SIZE)
        labels.append(batch.gt_label)
        masks.append(batch.gt_mask)
    labels_t, masks_t = torch.cat(labels), torch.cat(masks)
    assert int(labels_t.sum()) == 2 * len(DEFECT_TYPES)
    assert masks_t[labels_t.bool()].flatten(1).any(dim=1).all()
    assert not masks_t[~labels_t.bool()].any()


def test_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="brick, grass, gravel"):
        _datamodule(tmp_path, category="carpet")


def test_unknown_defect(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scratch"):
        _datamodule(tmp_path, defect_types=["crack"])


def test_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    dm = _datamodule(blocker / "textures")
    with pytest.raises(OSError, match="Cannot write the Textures dataset"):
        dm.prepare_data()


def test_defaults() -> None:
    dm = Textures()
    assert dm.root == Path("./datasets/textures")
    assert dm.category == "brick"
    assert dm.image_size == 256
    assert (dm.num_train, dm.num_test_good, dm.num_test_defect) == (60, 16, 8)
    assert dm.defect_types == list(DEFECT_TYPES)


def test_textures_is_anomalib_mvtecad_with_identical_items(tmp_path: Path) -> None:
    """Textures is anomalib's MVTecAD (generated in prepare_data); its items equal MVTecAD's own."""
    from anomalib.data import MVTecAD
    from anomalib.data.datasets.image.mvtecad import MVTecADDataset
    from anomalib.data.utils import Split

    dm = _datamodule(tmp_path, category="grass")
    assert isinstance(dm, MVTecAD)
    dm.setup()
    for split, ours in ((Split.TRAIN, dm.train_data), (Split.TEST, dm.test_data)):
        assert isinstance(ours, MVTecADDataset)
        reference = MVTecADDataset(root=tmp_path, category="grass", split=split)
        assert len(ours) == len(reference) > 0
        for index in range(len(reference)):
            mine, theirs = ours[index], reference[index]
            assert mine.image_path == theirs.image_path
            assert torch.equal(mine.image, theirs.image)
            assert torch.equal(mine.gt_label, theirs.gt_label)
            assert (mine.gt_mask is None) == (theirs.gt_mask is None)
            if theirs.gt_mask is not None:
                assert torch.equal(mine.gt_mask, theirs.gt_mask)
