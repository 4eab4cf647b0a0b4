"""anomalib's MVTecAD / Folder read with this package's reader: 16-bit at full range, 8-bit unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from anomalib.data import Folder, MVTecAD
from PIL import Image
from torchvision.transforms.v2 import Compose, RandomHorizontalFlip, Resize

from anomalib_kd.data import HighBitDepthFolder, HighBitDepthMVTecAD, ImageReadError
from tests.helpers import make_tasks


def write_xray_folder(root: Path) -> Path:
    """Folder layout: 16-bit gray normals and defects (raw 1000..3000) with 8-bit masks."""
    rng = np.random.default_rng(0)
    for sub, count in (("good", 4), ("bad", 2)):
        (root / sub).mkdir(parents=True)
        for i in range(count):
            raw = rng.integers(1000, 3001, (16, 16)).astype(np.uint16)
            cv2.imwrite(str(root / sub / f"{i:03d}.png"), raw)
    (root / "masks").mkdir()
    for i in range(2):
        mask = np.zeros((16, 16), np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i:03d}.png")
    return root


def folder_args(root: Path) -> dict:
    return {"name": "xray", "root": root, "normal_dir": "good", "abnormal_dir": "bad", "mask_dir": "masks",
            "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0}  # fmt: skip


def test_folder_reads_16bit_at_full_range(tmp_path: Path) -> None:
    root = write_xray_folder(tmp_path / "xray")
    datamodule = HighBitDepthFolder(**folder_args(root))
    assert isinstance(datamodule, Folder)
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    for image, path in zip(batch.image, batch.image_path, strict=True):
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED).astype(np.float32)
        torch.testing.assert_close(image[0], torch.from_numpy(raw / 65535), atol=1e-7, rtol=0)
    assert batch.gt_mask[batch.gt_label.bool()].any()
    windowed = HighBitDepthFolder(**folder_args(root), window=(1000, 3000))
    windowed.setup()
    train = next(iter(windowed.train_dataloader()))
    assert float(train.image.min()) < 0.05
    assert float(train.image.max()) > 0.95
    with pytest.raises(ValueError, match="low < high"):
        HighBitDepthFolder(**folder_args(root), window=(3, 3))


def test_mvtecad_items_equal_anomalib_on_8bit_data(tmp_path: Path) -> None:
    """Same images, masks, labels and joint augmentations as anomalib's MVTecAD (8-bit data)."""
    root = make_tasks(tmp_path / "mvtec", names=("widget",), n_train=3, sizes=(24,), n_test=2)
    augmentations = Compose([RandomHorizontalFlip(p=1.0), Resize((16, 16), antialias=True)])
    ours = HighBitDepthMVTecAD(root=root, category="widget", augmentations=augmentations, num_workers=0)
    theirs = MVTecAD(root=root, category="widget", augmentations=augmentations, num_workers=0)
    for datamodule in (ours, theirs):
        datamodule.setup()
    for mine, reference in ((ours.train_data, theirs.train_data), (ours.test_data, theirs.test_data)):
        assert len(mine) == len(reference) > 0
        for index in range(len(reference)):
            a, b = mine[index], reference[index]
            assert a.image.shape == (3, 16, 16)
            assert torch.equal(a.image, b.image)
            assert torch.equal(a.gt_label, b.gt_label)
            assert torch.equal(a.gt_mask, b.gt_mask)
    assert any(item.gt_mask.any() for item in ours.test_data)  # defect masks survived the flip


def test_mvtecad_16bit_category_and_unreadable_file(tmp_path: Path) -> None:
    root = tmp_path / "kdbench"
    write_xray_folder(root / "head_ct" / "train")  # train/good (+ bad, masks: ignored by MVTec's parser)
    (root / "head_ct" / "test").mkdir()
    (root / "head_ct" / "train" / "bad").rename(root / "head_ct" / "test" / "bad")
    (root / "head_ct" / "ground_truth").mkdir()
    (root / "head_ct" / "train" / "masks").rename(root / "head_ct" / "ground_truth" / "bad")
    for mask in (root / "head_ct" / "ground_truth" / "bad").iterdir():
        mask.rename(mask.with_name(mask.stem + "_mask.png"))
    datamodule = HighBitDepthMVTecAD(root=root, category="head_ct", train_batch_size=4, eval_batch_size=4)
    datamodule.setup()
    images = next(iter(datamodule.train_dataloader())).image
    assert 1000 / 65535 - 1e-6 <= float(images.min()) < float(images.max()) <= 3000 / 65535 + 1e-6
    empty = root / "head_ct" / "test" / "bad" / "001.png"
    empty.write_bytes(b"")
    datamodule = HighBitDepthMVTecAD(root=root, category="head_ct", eval_batch_size=4)
    datamodule.setup()
    with pytest.raises(ImageReadError, match=re.escape(str(empty)) + r".*empty \(0 bytes\)"):
        list(datamodule.test_dataloader())
