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

Example:
    >>> from anomalib_kd.data.fewshot import FewShotTasks
    >>> datamodule = FewShotTasks(root="../shared/data/kdbench", target="brick", k_shot=4)
    >>> datamodule.setup()                                          # doctest: +SKIP
    >>> datamodule.support_images("brick").shape                    # doctest: +SKIP
    torch.Size([4, 3, 256, 256])

    From the command line::

        anomalib train --model anomalib_kd.models.d24fad.D24FAD \\
            --data anomalib_kd.data.fewshot.FewShotTasks --data.root ../shared/data/kdbench \\
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
from anomalib.data.utils.image import read_image
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import Transform
from torchvision.transforms.v2.functional import resize

from .kdbench import resolve_kdbench_root

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
    "sample_supports",
    "scan_task",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
MODES = ("episodic", "one_class")


class FewShotDataError(ValueError):
    """Bad few-shot data: missing folder, no normals, K too large, mixed image sizes or channels."""


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
    image_size: tuple[int, int]  # (width, height) as PIL reports it
    channels: int


def _images_in(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_uniform(task: str, paths: Sequence[str]) -> tuple[tuple[int, int], int]:
    """All images of a task must share one size and channel count (header reads only)."""
    reference: tuple[tuple[int, int], int] | None = None
    reference_path = ""
    for path in paths:
        try:
            with Image.open(path) as image:
                current = (image.size, len(image.getbands()))
        except OSError as error:
            msg = f"Task '{task}': cannot read image {path}: {error}"
            raise FewShotDataError(msg) from error
        if reference is None:
            reference, reference_path = current, path
        elif current != reference:
            kind = "sizes" if current[0] != reference[0] else "channels"
            msg = (
                f"Task '{task}' mixes image {kind}: {path} is {current[0][0]}x{current[0][1]} with "
                f"{current[1]} channel(s) but {reference_path} is {reference[0][0]}x{reference[0][1]} with "
                f"{reference[1]} channel(s). Every image of a task must have the same size and channels "
                "(resize/convert the folder first)."
            )
            raise FewShotDataError(msg)
    assert reference is not None
    return reference


def scan_task(name: str, path: str | Path, check_images: bool = True) -> TaskInfo:
    """Read the file lists of one MVTec-layout task, with clear errors naming task and path."""
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
        msg = f"Task '{name}' has no normal images: {normal_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} file."
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

    size, channels = _check_uniform(name, [*normals, *samples.image_path]) if check_images else ((0, 0), 0)
    return TaskInfo(name, path, normals, samples, size, channels)


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
        sizes = {tuple(item.image.shape[-2:]) for item in items}
        images = [item.image for item in items]
        supports = [item.support for item in items]
        if len(sizes) > 1:
            size = max(sizes)
            images = [resize(image, list(size), antialias=True) for image in images]
            supports = [resize(support, list(size), antialias=True) for support in supports]
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
    """

    def __init__(
        self,
        tasks: Sequence[TaskInfo],
        k_shot: int,
        seed: int = 0,
        resample: bool = False,
        augmentations: Transform | None = None,
        task_type: TaskType = TaskType.CLASSIFICATION,
    ) -> None:
        super().__init__()
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
        image = read_image(path, as_tensor=True)
        return self.augmentations(image) if self.augmentations else image

    def __getitem__(self, index: int) -> EpisodeItem:
        name, query, _ = self.episodes[index]
        normals = self.tasks[name].normals
        support_paths = [normals[i] for i in self.support_indices(index)]
        return EpisodeItem(
            image=self._load(normals[query]),
            support=torch.stack([self._load(p) for p in support_paths]),
            task=name,
            image_path=normals[query],
            support_paths=support_paths,
        )

    @property
    def collate_fn(self) -> Callable:
        return EpisodeBatch.collate


class FewShotTaskDataset(AnomalibDataset):
    """An ordinary anomalib dataset over given samples of one task (test set or k-shot normals)."""

    def __init__(self, task: str, samples: pd.DataFrame, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.task_name = task
        self.category = task
        self.samples = samples


# --------------------------------------------------------------------------------------------------
# Datamodule
# --------------------------------------------------------------------------------------------------


class FewShotTasks(AnomalibDataModule):
    """Leave-one-task-out few-shot datamodule (episodic) and its k-shot one-class variant.

    Args:
        root: folder holding the tasks (each sub-folder with a ``train`` folder is a task); ``None``:
            kdbench, found as :func:`~anomalib_kd.data.kdbench.resolve_kdbench_root` does.
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
        check_images: read every image header to reject mixed sizes/channels within a task.
    """

    def __init__(
        self,
        root: str | Path | None = None,
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
        # None: the kdbench folder (argument, $ANOMALIB_KD_KDBENCH or ../shared/data/kdbench).
        self.root = resolve_kdbench_root(None) if root is None else Path(root).expanduser()
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

        Raw images (no resize / normalisation): models apply their own pre-processing transform.
        """
        return torch.stack([read_image(path, as_tensor=True) for path in self.support_paths(task)])

    # -- anomalib hooks ---------------------------------------------------------------------------

    def _setup(self, _stage: str | None = None) -> None:
        tasks = self.tasks
        target = tasks[self.target]
        if target.test_samples.empty:
            msg = f"Target task '{self.target}' has no test images under {target.path / 'test'}."
            raise FewShotDataError(msg)
        test_type = TaskType(target.test_samples.attrs["task"])
        self.test_data = FewShotTaskDataset(self.target, target.test_samples.copy())
        if self.mode == "episodic":
            self.train_data = EpisodicDataset(
                [tasks[name] for name in self.train_task_names],
                k_shot=self.k_shot,
                seed=self.support_seed,
                resample=self.resample_supports,
                task_type=test_type,
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
            self.train_data = FewShotTaskDataset(self.target, samples)

    def _create_test_split(self) -> None:
        """The test set is the target's test folder as it is (no normals are taken from train)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        """Shuffled episodes (or k-shot normals); the last incomplete batch is kept."""
        return torch.utils.data.DataLoader(
            dataset=self.train_data,
            shuffle=True,
            batch_size=min(self.train_batch_size, len(self.train_data)),
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
        )
