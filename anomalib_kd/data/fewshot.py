"""Few-shot anomaly detection data: several tasks in MVTec layout, one held out (leave-one-out).

A *task* is one folder in the MVTec AD layout::

    <task>/train/good/*.png                 normal images (queries and supports come from here)
    <task>/test/good/*.png                  normal test images
    <task>/test/<defect>/*.png              anomalous test images
    <task>/ground_truth/<defect>/<stem>_mask.png   optional pixel masks

:class:`FewShotTasks` takes a root holding several such tasks (or an explicit name -> path mapping),
holds out one ``target`` task and works in one of two modes:

``mode="episodic"`` (few-shot models such as D24FAD, the paper's leave-one-out protocol)
    Training items are *episodes*: one query and ``k_shot`` supports, all normal images of the same
    **training** task (never the target). Each query's supports are drawn once by ``support_seed``
    and kept for the whole run (the official D24FAD behaviour), or redrawn every time the episode is
    read (``resample_supports=True``). A query is never among its own supports. Batches mix tasks.
    Test/validation: the target's test set. Its ``k_shot`` supports, drawn by ``support_seed`` from
    the target's ``train/good``, are exposed through :meth:`FewShotTasks.support_images`, which
    few-shot models read in their test/predict hooks.

``mode="one_class"`` (the paper's protocol for unsupervised baselines)
    Training data is only the ``k_shot`` normal images of the target (the same images
    :meth:`support_images` returns), as an ordinary anomalib dataset: any one-class model (URD,
    ReverseDistillation, PatchCore, ...) trains on it unchanged.

Images are read with :func:`~anomalib_kd.data.image.read_image`: 8-bit files as anomalib reads them,
16-bit grayscale (CT, MRI, X-ray) at full range through ``window``. Tasks may mix image sizes and
gray/RGB files: every image is read as RGB, and images of different sizes in one episode or batch are
resized to the largest, as anomalib's collate does (the model's resize normally makes them equal first).

Example:
    >>> from anomalib_kd.data.fewshot import FewShotTasks
    >>> datamodule = FewShotTasks(root="datasets/my_tasks", target="brick", k_shot=4)
    >>> datamodule.setup()                                          # doctest: +SKIP
    >>> datamodule.support_images("brick").shape                    # doctest: +SKIP
    torch.Size([4, 3, 256, 256])

    From the command line::

        anomalib train --model anomalib_kd.models.d24fad.D24FAD \\
            --data anomalib_kd.data.fewshot.FewShotTasks --data.root datasets/my_tasks \\
            --data.target brick --data.k_shot 4
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anomalib import TaskType
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, ValSplitMode
from torch.utils.data import Dataset
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import resize

from .high_bit_depth import ImageReaderMixin
from .image import (
    DEFAULT_PERCENTILES,
    Window,
    check_image,
    check_percentiles,
    check_window,
    image_files,
    read_image,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EpisodeBatch",
    "EpisodeItem",
    "EpisodicDataset",
    "FewShotDataError",
    "FewShotTaskDataset",
    "FewShotTasks",
    "TaskInfo",
    "discover_tasks",
    "largest_shape",
    "resize_to_common",
    "sample_supports",
    "scan_task",
]

MODES = ("episodic", "one_class")


class FewShotDataError(ValueError):
    """Bad few-shot data: missing folder or root, no normals, K too large, an unreadable image."""


# --------------------------------------------------------------------------------------------------
# Task scanning
# --------------------------------------------------------------------------------------------------


@dataclass
class TaskInfo:
    """Files of one task: sorted normal training images and the labelled test samples."""

    name: str
    path: Path
    normals: list[str]
    test_samples: pd.DataFrame


def _images_in(folder: Path) -> list[str]:
    """Image files under ``folder`` (anomalib's extension list), or none."""
    try:
        return [str(path) for path in image_files(folder)]
    except FileNotFoundError:
        return []


def _check_readable(task: str, paths: Sequence[str]) -> None:
    """Open every image's header, so an unreadable file fails at setup, named, not mid-epoch."""
    for path in paths:
        try:
            check_image(path)
        except OSError as error:
            msg = f"Task '{task}': {error}"
            raise FewShotDataError(msg) from error


def largest_shape(shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) holding the largest side, anomalib's choice when a batch mixes sizes."""
    index = max(range(2 * len(shapes)), key=lambda i: shapes[i // 2][i % 2])
    return tuple(shapes[index // 2])


def resize_to_common(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Images (or stacks) resized to :func:`largest_shape` of their sizes when the sizes differ."""
    shapes = [tuple(int(side) for side in image.shape[-2:]) for image in images]
    if len(set(shapes)) == 1:
        return list(images)
    size = list(largest_shape(shapes))
    return [
        image if list(image.shape[-2:]) == size else resize(image, size, antialias=True) for image in images
    ]


def scan_task(name: str, path: str | Path, check_images: bool = True) -> TaskInfo:
    """Read the file lists of one MVTec-layout task, with clear errors naming task and path.

    ``check_images``: open every image's header now (an unreadable file fails here, named).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        msg = f"Task '{name}': folder {path} does not exist."
        raise FewShotDataError(msg)
    normal_dir = path / "train" / "good"
    if not normal_dir.is_dir():
        msg = f"Task '{name}': missing normal image folder {normal_dir} (MVTec layout: <task>/train/good)."
        raise FewShotDataError(msg)
    normals = _images_in(normal_dir)
    if not normals:
        msg = f"Task '{name}' has no normal images: {normal_dir} holds no image file."
        raise FewShotDataError(msg)

    rows = []
    test_dir = path / "test"
    if test_dir.is_dir():
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            images = _images_in(defect_dir)
            if not images:
                msg = f"Task '{name}': test folder {defect_dir} is empty."
                raise FewShotDataError(msg)
            label = LabelName.NORMAL if defect_dir.name == "good" else LabelName.ABNORMAL
            for image in images:
                mask = ""
                if label == LabelName.ABNORMAL:
                    mask_dir = path / "ground_truth" / defect_dir.name
                    for candidate in (Path(image).stem + "_mask.png", Path(image).stem + ".png"):
                        if (mask_dir / candidate).is_file():
                            mask = str(mask_dir / candidate)
                            break
                rows.append(
                    {
                        "image_path": image,
                        "mask_path": mask,
                        "label_index": int(label),
                        "split": "test",
                        "defect": defect_dir.name,
                    }
                )
    samples = pd.DataFrame(rows, columns=["image_path", "mask_path", "label_index", "split", "defect"])
    abnormal = samples[samples.label_index == int(LabelName.ABNORMAL)]
    segmentation = len(abnormal) > 0 and bool((abnormal.mask_path != "").all())
    samples.attrs["task"] = TaskType.SEGMENTATION if segmentation else TaskType.CLASSIFICATION

    if check_images:
        _check_readable(name, [*normals, *samples.image_path])
    return TaskInfo(name, path, normals, samples)


def discover_tasks(root: str | Path) -> dict[str, Path]:
    """Task folders directly under ``root``: every sub-folder that has a ``train`` folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        msg = f"Few-shot root folder {root} does not exist."
        raise FewShotDataError(msg)
    tasks = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "train").is_dir()}
    if not tasks:
        msg = f"No tasks under {root}: expected sub-folders in MVTec layout (<task>/train/good, <task>/test)."
        raise FewShotDataError(msg)
    return tasks


def _task_rng(seed: int, task: str, *keys: int) -> np.random.Generator:
    """Generator that depends only on (seed, task name, keys): stable across runs and task orders."""
    words = [int(seed) & 0xFFFFFFFF, *(ord(c) for c in task), *(int(k) & 0xFFFFFFFF for k in keys)]
    return np.random.default_rng(np.random.SeedSequence(words))


def sample_supports(
    n_images: int,
    k_shot: int,
    rng: np.random.Generator,
    exclude: int | None = None,
) -> list[int]:
    """K distinct indices in ``range(n_images)``, never ``exclude`` (the query)."""
    pool = np.arange(n_images)
    if exclude is not None:
        pool = pool[pool != exclude]
    return sorted(int(i) for i in rng.choice(pool, size=k_shot, replace=False))


# --------------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------------


@dataclass
class EpisodeItem:
    """One training episode: a query and its K supports (normal images of one task)."""

    image: torch.Tensor  # (C, H, W)
    support: torch.Tensor  # (K, C, H, W)
    task: str
    image_path: str
    support_paths: list[str]
    gt_label: torch.Tensor = field(default_factory=lambda: torch.tensor(0))
    gt_mask: torch.Tensor | None = None


@dataclass
class EpisodeBatch:
    """A batch of episodes. ``image`` (B, C, H, W) queries; ``support`` (B, K, C, H, W).

    It has the ``image``/``gt_mask`` attributes anomalib's ``PreProcessor`` transforms, so the model's
    transform reaches the queries as usual; models apply it to ``support`` themselves.
    """

    image: torch.Tensor
    support: torch.Tensor
    task: list[str]
    image_path: list[str]
    support_paths: list[list[str]]
    gt_label: torch.Tensor
    gt_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def collate(cls, items: Sequence[EpisodeItem]) -> EpisodeBatch:
        """Stack episodes; tasks of different sizes are resized to the largest (as anomalib's collate)."""
        common = resize_to_common([*(item.image for item in items), *(item.support for item in items)])
        images, supports = common[: len(items)], common[len(items) :]
        return cls(
            image=torch.stack(images),
            support=torch.stack(supports),
            task=[item.task for item in items],
            image_path=[item.image_path for item in items],
            support_paths=[item.support_paths for item in items],
            gt_label=torch.stack([item.gt_label for item in items]),
        )


class EpisodicDataset(Dataset):
    """Episodes over the normal images of the training tasks.

    One episode per normal image of every training task (that image is the query). Supports: K other
    normal images of the same task, fixed per query by ``seed`` (official), or redrawn at each read
    when ``resample`` is set (torch's global RNG, so ``seed_everything`` makes runs repeatable).

    Args:
        tasks: training tasks.
        k_shot: supports per episode.
        seed: support-sampling seed.
        resample: redraw the supports every time an episode is read.
        augmentations: transform applied to the query and to each support (the datamodule appends
            the model's Resize, as for any anomalib dataset).
        task_type: reported ``task`` (that of the target's test set).
        window, percentiles: how images with more than 8 bits per sample map to [0, 1]
            (:func:`~anomalib_kd.data.image.read_image`).
    """

    def __init__(
        self,
        tasks: Sequence[TaskInfo],
        k_shot: int,
        seed: int = 0,
        resample: bool = False,
        augmentations: Transform | None = None,
        task_type: TaskType = TaskType.CLASSIFICATION,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__()
        self.window = check_window(window)
        self.percentiles = check_percentiles(percentiles)
        if not tasks:
            msg = "Episodic training needs at least one training task besides the target."
            raise FewShotDataError(msg)
        self.tasks = {task.name: task for task in tasks}
        self.k_shot = k_shot
        self.seed = seed
        self.resample = resample
        self.augmentations = augmentations
        self.task = TaskType(task_type)
        for task in tasks:
            if k_shot > len(task.normals) - 1:
                msg = (
                    f"k_shot={k_shot} is too large for training task '{task.name}': it has "
                    f"{len(task.normals)} normal images in {task.path / 'train' / 'good'} and an episode "
                    f"needs K supports besides its query (at most {len(task.normals) - 1})."
                )
                raise FewShotDataError(msg)
        # (task, query index, fixed support indices)
        self.episodes: list[tuple[str, int, list[int]]] = []
        for task in tasks:
            rng = _task_rng(seed, task.name)
            for query in rng.permutation(len(task.normals)):
                supports = sample_supports(len(task.normals), k_shot, rng, exclude=int(query))
                self.episodes.append((task.name, int(query), supports))

    def __len__(self) -> int:
        return len(self.episodes)

    def support_indices(self, index: int) -> list[int]:
        """The support indices the episode ``index`` uses now."""
        name, query, supports = self.episodes[index]
        if not self.resample:
            return supports
        n_images = len(self.tasks[name].normals)
        pool = torch.randperm(n_images - 1)[: self.k_shot]
        return sorted(int(i) + int(i >= query) for i in pool)  # skip the query's own index

    def _load(self, path: str) -> torch.Tensor:
        image = read_image(path, window=self.window, percentiles=self.percentiles)
        return self.augmentations(image) if self.augmentations else image

    def __getitem__(self, index: int) -> EpisodeItem:
        name, query, _ = self.episodes[index]
        normals = self.tasks[name].normals
        support_paths = [normals[i] for i in self.support_indices(index)]
        image, *supports = resize_to_common([self._load(p) for p in [normals[query], *support_paths]])
        return EpisodeItem(
            image=image,
            support=torch.stack(supports),
            task=name,
            image_path=normals[query],
            support_paths=support_paths,
        )

    @property
    def collate_fn(self) -> Callable:
        return EpisodeBatch.collate


class FewShotTaskDataset(ImageReaderMixin, AnomalibDataset):
    """An ordinary anomalib dataset over given samples of one task (test set or k-shot normals).

    Read with :func:`~anomalib_kd.data.image.read_image` (``window``, ``percentiles``).
    """

    def __init__(
        self,
        task: str,
        samples: pd.DataFrame,
        augmentations: Transform | None = None,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.configure_reader(window, percentiles)
        self.task_name = task
        self.category = task
        self.samples = samples


# --------------------------------------------------------------------------------------------------
# Datamodule
# --------------------------------------------------------------------------------------------------


class FewShotTasks(AnomalibDataModule):
    """Leave-one-task-out few-shot datamodule (episodic) and its k-shot one-class variant.

    Args:
        root: folder holding the tasks (each sub-folder with a ``train`` folder is a task). Required
            (kdbench's search: :class:`~anomalib_kd.data.kdbench.KDBenchTasks`).
        target: held-out task tested on (its K supports come from its ``train/good``). ``None`` is
            accepted only when ``root`` holds a single task... which leaves nothing to train on in
            episodic mode, so normally give it.
        tasks: restrict/define the tasks: a list of folder names under ``root``, or a mapping (or list
            of ``[name, path]`` pairs) of name -> folder (relative paths are taken under ``root``).
            ``None``: every task under ``root``.
        k_shot: K, the number of supports per query (and of target normals in ``one_class`` mode).
        mode: ``"episodic"`` (train on episodes of the other tasks) or ``"one_class"`` (train on the
            target's K normals only).
        support_seed: seed of every support draw (training episodes and the target's supports).
        resample_supports: redraw the supports of each episode whenever it is read (default: drawn once,
            as the official code).
        train_batch_size, eval_batch_size, num_workers: dataloader settings.
        train_augmentations, val_augmentations, test_augmentations, augmentations: dataset transforms.
        val_split_mode: ``"same_as_test"`` (default), ``"from_test"`` or ``"none"``; validation only fits
            the thresholds/normalisation of the post-processor.
        val_split_ratio: share of the test set used for validation with ``"from_test"``.
        seed: seed of the validation split.
        check_images: open every image's header at setup, so an unreadable file fails then, named.
        window: how images with more than 8 bits per sample (16-bit CT/MRI/X-ray) map to [0, 1]:
            ``"dtype"`` (default: the stored type's full range), ``"percentile"`` (per image) or a
            fixed ``(low, high)`` window of raw values (:mod:`anomalib_kd.data.image`).
        percentiles: the per-image percentiles of ``window="percentile"``.

    Raises:
        FewShotDataError: ``root`` is ``None`` (and, at setup, bad task folders or images).
    """

    def __init__(
        self,
        root: str | Path,
        target: str | None = None,
        tasks: list[str] | dict[str, str] | list[list[str]] | None = None,
        k_shot: int = 4,
        mode: str = "episodic",
        support_seed: int = 0,
        resample_supports: bool = False,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
        check_images: bool = True,
        window: Window | Sequence[float] = "dtype",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        if mode not in MODES:
            msg = f"mode must be one of {MODES}, got {mode!r}."
            raise ValueError(msg)
        if k_shot < 1:
            msg = f"k_shot must be >= 1, got {k_shot}."
            raise ValueError(msg)
        allowed = (ValSplitMode.SAME_AS_TEST, ValSplitMode.FROM_TEST, ValSplitMode.NONE)
        if self.val_split_mode not in allowed:
            msg = f"val_split_mode must be in {[m.value for m in allowed]}, not {val_split_mode!r}."
            raise ValueError(msg)
        if root is None:
            msg = (
                "FewShotTasks needs root: the folder holding the tasks, one sub-folder per task in MVTec "
                "layout (<task>/train/good, <task>/test/<defect>). CLI: --data.root <folder>."
            )
            raise FewShotDataError(msg)
        self.root = Path(root).expanduser()
        self.window = check_window(window)
        self.percentiles = check_percentiles(percentiles)
        self.target = target
        self.task_spec = tasks
        self.k_shot = k_shot
        self.mode = mode
        self.support_seed = support_seed
        self.resample_supports = resample_supports
        self.check_images = check_images
        self._tasks: dict[str, TaskInfo] | None = None
        self._category = target or ""

    # -- tasks ------------------------------------------------------------------------------------

    def _task_paths(self) -> dict[str, Path]:
        spec = self.task_spec
        if spec is None:
            return discover_tasks(self.root)
        pairs: list[tuple[str, Path]] = []
        if isinstance(spec, Mapping):
            pairs = [(str(k), Path(v)) for k, v in spec.items()]
        else:
            for entry in spec:
                if isinstance(entry, str):
                    pairs.append((entry, Path(entry)))
                elif isinstance(entry, Sequence) and len(entry) == 2:
                    pairs.append((str(entry[0]), Path(entry[1])))
                else:
                    msg = f"tasks entries must be names or (name, path) pairs, got {entry!r}."
                    raise FewShotDataError(msg)
        paths = {}
        for name, path in pairs:
            if name in paths:
                msg = f"Task '{name}' is listed twice in tasks."
                raise FewShotDataError(msg)
            paths[name] = path.expanduser() if path.is_absolute() else self.root / path
        if not paths:
            msg = "tasks is empty."
            raise FewShotDataError(msg)
        return paths

    @property
    def tasks(self) -> dict[str, TaskInfo]:
        """All tasks (scanned and checked on first access)."""
        if self._tasks is None:
            paths = self._task_paths()
            if self.target is None:
                if len(paths) != 1:
                    msg = f"Give the held-out target task (--data.target), one of {sorted(paths)}."
                    raise FewShotDataError(msg)
                self.target = next(iter(paths))
                self._category = self.target
            if self.target not in paths:
                msg = (
                    f"Target task '{self.target}' is not among the tasks {sorted(paths)} (root {self.root})."
                )
                raise FewShotDataError(msg)
            self._tasks = {name: scan_task(name, path, self.check_images) for name, path in paths.items()}
        return self._tasks

    @property
    def train_task_names(self) -> list[str]:
        """Training tasks: every task except the target (leave-one-out)."""
        return [name for name in self.tasks if name != self.target]

    def support_paths(self, task: str | None = None) -> list[str]:
        """The K normal images of ``task`` (default: the target) drawn by ``support_seed``."""
        task = task or self.target
        info = self.tasks.get(task) if task is not None else None
        if info is None:
            msg = f"Unknown task {task!r}; tasks are {sorted(self.tasks)}."
            raise FewShotDataError(msg)
        if self.k_shot > len(info.normals):
            msg = (
                f"k_shot={self.k_shot} is larger than the {len(info.normals)} normal images of task "
                f"'{task}' in {info.path / 'train' / 'good'}."
            )
            raise FewShotDataError(msg)
        indices = sample_supports(len(info.normals), self.k_shot, _task_rng(self.support_seed, task, 1))
        return [info.normals[i] for i in indices]

    def support_images(self, task: str | None = None) -> torch.Tensor:
        """The K supports of ``task`` (default: the target) as a (K, 3, H, W) float tensor in [0, 1].

        Raw images (no normalisation; supports of different sizes resized to the largest, as anomalib's
        collate): models apply their own pre-processing transform.
        """
        images = [
            read_image(p, window=self.window, percentiles=self.percentiles) for p in self.support_paths(task)
        ]
        return torch.stack(resize_to_common(images))

    # -- anomalib hooks ---------------------------------------------------------------------------

    def _setup(self, _stage: str | None = None) -> None:
        tasks = self.tasks
        target = tasks[self.target]
        if target.test_samples.empty:
            msg = f"Target task '{self.target}' has no test images under {target.path / 'test'}."
            raise FewShotDataError(msg)
        test_type = TaskType(target.test_samples.attrs["task"])
        reader = {"window": self.window, "percentiles": self.percentiles}
        self.test_data = FewShotTaskDataset(self.target, target.test_samples.copy(), **reader)
        if self.mode == "episodic":
            self.train_data = EpisodicDataset(
                [tasks[name] for name in self.train_task_names],
                k_shot=self.k_shot,
                seed=self.support_seed,
                resample=self.resample_supports,
                task_type=test_type,
                **reader,
            )
        else:
            paths = self.support_paths(self.target)
            samples = pd.DataFrame(
                {
                    "image_path": paths,
                    "mask_path": [""] * len(paths),
                    "label_index": [int(LabelName.NORMAL)] * len(paths),
                    "split": ["train"] * len(paths),
                }
            )
            samples.attrs["task"] = test_type
            self.train_data = FewShotTaskDataset(self.target, samples, **reader)

    def _create_test_split(self) -> None:
        """The test set is the target's test folder as it is (no normals are taken from train)."""
