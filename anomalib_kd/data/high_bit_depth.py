"""anomalib's ``MVTecAD`` and ``Folder`` datamodules reading their images with this package's reader.

Same arguments, layout and splits as anomalib's classes, plus ``window`` / ``percentiles`` (see
:mod:`anomalib_kd.data.image`): 16-bit grayscale (CT, MRI, X-ray) reads at full range instead of
being clipped to white; 8-bit images give exactly anomalib's tensors. Masks are read by anomalib.

Example::

    anomalib train --model anomalib_kd.URD --data anomalib_kd.data.HighBitDepthFolder \\
        --data.name xray --data.root ./datasets/xray --data.normal_dir good --data.abnormal_dir bad \\
        --data.window "[0, 4095]"

Inference outside these datamodules (``anomalib predict`` on a folder, the OpenVINO / Torch
inferencers on a path) reads files with anomalib's reader again: read the image with
:func:`~anomalib_kd.data.image.read_image` and pass the tensor, or convert the files once with
``python -m anomalib_kd.data.convert`` and use anomalib's own classes throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import TaskType
from anomalib.data import Folder, MVTecAD
from anomalib.data.dataclasses import DatasetItem, ImageItem
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.datasets.image.folder import FolderDataset
from anomalib.data.datasets.image.mvtecad import MVTecADDataset
from anomalib.data.utils import LabelName, Split, read_mask
from torchvision.tv_tensors import Mask

from .image import DEFAULT_PERCENTILES, Window, check_percentiles, check_window, read_image

__all__ = [
    "HighBitDepthFolder",
    "HighBitDepthFolderDataset",
    "HighBitDepthMVTecAD",
    "HighBitDepthMVTecADDataset",
    "ImageReaderMixin",
]


class ImageReaderMixin:
    """``AnomalibDataset.__getitem__`` (anomalib 2.7) with :func:`read_image` in place of anomalib's reader.

    anomalib's item assembly calls its module-level reader directly, with no hook, so the steps are
    repeated here unchanged (the tests compare items with anomalib's on 8-bit data).
    """

    window: Window = "dtype"
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    def configure_reader(
        self, window: Window | Sequence[float] = "dtype", percentiles: Sequence[float] = DEFAULT_PERCENTILES
    ) -> None:
        """Set the window used for images with more than 8 bits per sample."""
        self.window = check_window(window)
        self.percentiles = check_percentiles(percentiles)

    def __getitem__(self: Any, index: int) -> DatasetItem:
        sample = self.samples.iloc[index]
        image = read_image(sample.image_path, window=self.window, percentiles=self.percentiles)
        gt_mask = None
        if self.task == TaskType.SEGMENTATION:
            if sample.label_index == LabelName.NORMAL:
                gt_mask = Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
            elif sample.label_index == LabelName.ABNORMAL:
                gt_mask = read_mask(sample.mask_path, as_tensor=True)
        if self.augmentations:
            if self.task == TaskType.CLASSIFICATION:
                image = self.augmentations(image)
            elif self.task == TaskType.SEGMENTATION:
                # a zero mask stands in for UNKNOWN samples, whose gt_mask stays None
                mask = gt_mask if gt_mask is not None else Mask(torch.zeros(image.shape[-2:])).to(torch.uint8)
                image, augmented = self.augmentations(image, mask)
                if gt_mask is not None:
                    gt_mask = augmented
        gt_label = None if sample.label_index == LabelName.UNKNOWN else torch.tensor(sample.label_index)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=gt_label,
            image_path=sample.image_path,
            mask_path=sample.mask_path,
        )


class HighBitDepthMVTecADDataset(ImageReaderMixin, MVTecADDataset):
    """anomalib's ``MVTecADDataset`` read with :func:`read_image` (``window``: module docstring)."""

    def __init__(
        self,
        root: Path | str | None = None,
        category: str = "bottle",
        augmentations: Any = None,
        split: str | Split | None = None,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(root=root, category=category, augmentations=augmentations, split=split)
        self.configure_reader(window, percentiles)


class HighBitDepthFolderDataset(ImageReaderMixin, FolderDataset):
    """anomalib's ``FolderDataset`` read with :func:`read_image` (extra ``window``, ``percentiles``)."""

    def __init__(
        self,
        *args: Any,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.configure_reader(window, percentiles)


class HighBitDepthMVTecAD(MVTecAD):
    """anomalib's ``MVTecAD`` datamodule whose images are read with :func:`read_image`.

    Args:
        root, category: as ``MVTecAD``.
        window: ``"dtype"`` (default), ``"percentile"`` or ``(low, high)``: how images with more than
            8 bits per sample map to [0, 1] (:mod:`anomalib_kd.data.image`).
        percentiles: the per-image percentiles of ``window="percentile"``.
        **kwargs: the rest of ``MVTecAD``'s arguments (batch sizes, workers, augmentations, splits, seed).
    """

    def __init__(
        self,
        root: Path | str | None = "./datasets/MVTecAD",
        category: str = "bottle",
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)
        self.window = check_window(window)
        self.percentiles = check_percentiles(percentiles)

    def _make_dataset(self, split: Split) -> AnomalibDataset:
        return HighBitDepthMVTecADDataset(
            split=split,
            root=self.root,
            category=self.category,
            window=self.window,
            percentiles=self.percentiles,
        )

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = self._make_dataset(Split.TRAIN)
        self.test_data = self._make_dataset(Split.TEST)
        if len(self.train_data) == 0:  # anomalib would train on nothing, silently
            folder = Path(self.root) / self.category / "train" / "good"
            msg = f"{type(self).__name__}: no training image in {folder} (an empty or missing folder)."
            raise FileNotFoundError(msg)


class HighBitDepthFolder(Folder):
    """anomalib's ``Folder`` datamodule whose images are read with :func:`read_image`.

    Args:
        name, normal_dir, root, abnormal_dir, normal_test_dir, mask_dir, normal_split_ratio, extensions:
            as ``Folder``.
        window: ``"dtype"`` (default), ``"percentile"`` or ``(low, high)``: how images with more than
            8 bits per sample map to [0, 1] (:mod:`anomalib_kd.data.image`).
        percentiles: the per-image percentiles of ``window="percentile"``.
        **kwargs: the rest of ``Folder``'s arguments (batch sizes, workers, augmentations, splits, seed).
    """

    def __init__(
        self,
        name: str,
        normal_dir: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, normal_dir=normal_dir, root=root, **kwargs)
        self.window = check_window(window)
        self.percentiles = check_percentiles(percentiles)

    def _setup(self, _stage: str | None = None) -> None:
        common = {
            "name": self.name,
            "root": self.root,
            "normal_dir": self.normal_dir,
            "abnormal_dir": self.abnormal_dir,
            "normal_test_dir": self.normal_test_dir,
            "mask_dir": self.mask_dir,
            "extensions": self.extensions,
            "window": self.window,
            "percentiles": self.percentiles,
        }
        self.train_data = HighBitDepthFolderDataset(split=Split.TRAIN, **common)
        self.test_data = HighBitDepthFolderDataset(split=Split.TEST, **common)
