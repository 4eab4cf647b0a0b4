"""Textures: a small MVTec-style anomaly dataset generated locally from scikit-image's bundled textures.

Nothing is downloaded. On first use (``prepare_data``) the datamodule renders one category from the
grayscale textures shipped with scikit-image (``skimage.data.brick``, ``grass`` and ``gravel``) and
writes it to disk in the MVTec AD layout, which anomalib's ``MVTecAD`` datamodule (this class's base)
then reads::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png      (0 / 255)
    <root>/<category>/.textures.json                          (marker, written last)

Normal images are random crops (with flips, 90 degree rotations and a slight contrast / brightness
jitter) of the texture. Train crops come from the left half of the source image and test crops from
the right half, so no test pixel is ever seen during training. Defective test images get one
synthetic defect each:

- ``scratch``: one to three anti-aliased bright or dark line strokes,
- ``blob``: a smooth-edged, irregular stain that shifts the intensity and softens the texture,
- ``cut``: CutPaste, a rotated and intensity-jittered patch of the same image pasted elsewhere.

Generation is deterministic: a given ``generation_seed`` and set of parameters always gives
byte-identical files. The marker file holds the generation parameters; if it is missing, differs from
the requested parameters, or any expected file is missing, the category is regenerated.

Example:
    >>> from anomalib_kd.data.textures import Textures
    >>> datamodule = Textures(category="grass")
    >>> datamodule.prepare_data()   # writes ./datasets/textures/grass once
    >>> datamodule.setup()

    From the command line::

        anomalib train --model Padim --data anomalib_kd.data.Textures --data.category grass
"""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from anomalib.utils.path import resolve_dataset_root
from torchvision.transforms.v2 import Transform
from tqdm.auto import tqdm

from .high_bit_depth import HighBitDepthMVTecAD, HighBitDepthMVTecADDataset

logger = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "DEFECT_TYPES",
    "Textures",
    "TexturesDataset",
    "expected_files",
    "generate_category",
    "is_generated",
    "synthesize_sample",
]

CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "blob", "cut")

MARKER_NAME = ".textures.json"
_FORMAT_VERSION = 1
_MAX_ATTEMPTS = 100
_MIN_MEAN_CHANGE = 12.0  # mean absolute change (gray levels) required inside a defect mask


# --------------------------------------------------------------------------------------------------
# Pure generation functions
# --------------------------------------------------------------------------------------------------


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        msg = f"Unknown Textures category {category!r}. Valid categories: {', '.join(CATEGORIES)}."
        raise ValueError(msg)


def _check_defects(defect_types: Sequence[str]) -> tuple[str, ...]:
    defects = tuple(defect_types)
    unknown = [d for d in defects if d not in DEFECT_TYPES]
    if unknown or not defects or len(set(defects)) != len(defects):
        msg = (
            f"Invalid Textures defect types {list(defects)!r}: give a non-empty list without duplicates "
            f"chosen from {', '.join(DEFECT_TYPES)}."
        )
        raise ValueError(msg)
    return defects


@lru_cache(maxsize=len(CATEGORIES))
def _source_texture(category: str) -> np.ndarray:
    """Grayscale source texture (float32, 0..255) bundled with scikit-image."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, category)())
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    image = image.astype(np.float32)
    image.setflags(write=False)
    return image


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent generator per (seed, keys); strings hashed with crc32 so it is stable across runs."""
    words = [int(seed) & 0xFFFFFFFF]
    words += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _normal_crop(category: str, split: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Random augmented crop of the split's half of the source texture, resized to ``image_size``."""
    source = _source_texture(category)
    width = source.shape[1]
    half = width // 2
    region = source[:, :half] if split == "train" else source[:, half:]
    max_side = min(region.shape)
    side = int(np.rint(max_side * rng.uniform(0.68, 0.92)))
    y = int(rng.integers(0, region.shape[0] - side + 1))
    x = int(rng.integers(0, region.shape[1] - side + 1))
    crop = region[y : y + side, x : x + side]
    crop = np.rot90(crop, k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if side >= image_size else cv2.INTER_CUBIC
    crop = cv2.resize(np.ascontiguousarray(crop), (image_size, image_size), interpolation=interp)
    mean = float(crop.mean())
    contrast = rng.uniform(0.92, 1.08)
    brightness = rng.uniform(-8.0, 8.0)
    crop = (crop - mean) * contrast + mean + brightness
    return np.clip(crop, 0.0, 255.0).astype(np.float32)


def _contrasting_level(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> float:
    """Gray level far from the local mean of ``image`` in ``region`` (dark on bright, bright on dark)."""
    local = float(image[region].mean()) if region.any() else float(image.mean())
    return float(rng.uniform(0, 40)) if local > 110 else float(rng.uniform(215, 255))


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    canvas = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        thickness = max(1, int(np.rint(size / 100 * rng.uniform(0.8, 2.0))))
        point = rng.uniform(0.1, 0.9, size=2) * size
        angle = rng.uniform(0, 2 * np.pi)
        points = [point.copy()]
        for _ in range(int(rng.integers(2, 5))):
            angle += rng.uniform(-0.5, 0.5)
            step = rng.uniform(0.08, 0.2) * size
            point = point + step * np.array([np.cos(angle), np.sin(angle)])
            points.append(point.copy())
        # draw with 4 bits of sub-pixel precision for smooth anti-aliased strokes
        pts = np.round(np.array(points) * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], False, 255, thickness, cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0
    level = _contrasting_level(image, alpha >= 0.5, rng)
    out = image * (1 - alpha) + level * alpha
    return out, alpha >= 0.5


def _blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    radius = rng.uniform(0.06, 0.14) * size
    margin = 1.6 * radius
    center = rng.uniform(margin, size - margin, size=2)
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0, 0.18) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.3)
    rot = rng.uniform(0, np.pi)
    px = radius * r * np.cos(theta) * aspect
    py = radius * r * np.sin(theta) / aspect
    xs = center[0] + px * np.cos(rot) - py * np.sin(rot)
    ys = center[1] + px * np.sin(rot) + py * np.cos(rot)
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(np.stack([xs, ys], axis=1) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [pts], 255, cv2.LINE_AA, shift=4)
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), max(0.8, 0.3 * radius))
    alpha = np.clip(alpha / max(float(alpha.max()), 1e-6), 0.0, 1.0)
    region = alpha >= 0.5
    local = float(image[region].mean()) if region.any() else float(image.mean())
    delta = rng.uniform(45, 85) * (-1.0 if local > 128 else 1.0)
    smooth = cv2.GaussianBlur(image, (0, 0), max(1.0, size / 128))
    stained = 0.5 * image + 0.5 * smooth + delta
    out = image * (1 - alpha) + stained * alpha
    return out, region


def _cut(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    pw, ph = rng.uniform(0.12, 0.28, size=2) * size
    src = rng.uniform([pw / 2, ph / 2], [size - pw / 2, size - ph / 2])
    half_diag = 0.5 * float(np.hypot(pw, ph))
    dst = rng.uniform(half_diag, size - half_diag, size=2)
    angle = float(rng.uniform(20, 70) + 90 * int(rng.integers(0, 4)))
    matrix = cv2.getRotationMatrix2D((float(src[0]), float(src[1])), angle, 1.0)
    matrix[:, 2] += dst - src
    warped = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    rect = np.zeros((size, size), np.float32)
    x0, y0 = int(np.rint(src[0] - pw / 2)), int(np.rint(src[1] - ph / 2))
    rect[y0 : y0 + int(np.rint(ph)), x0 : x0 + int(np.rint(pw))] = 1.0
    alpha = cv2.warpAffine(rect, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    alpha = np.clip(alpha, 0.0, 1.0)
    gain = rng.uniform(0.85, 1.15)
    offset = rng.uniform(10, 25) * rng.choice([-1.0, 1.0])
    patch = (warped - warped.mean()) * gain + warped.mean() + offset
    out = image * (1 - alpha) + patch * alpha
    return out, alpha >= 0.5


_DEFECT_FUNCTIONS = {"scratch": _scratch, "blob": _blob, "cut": _cut}


def _min_mask_pixels(image_size: int) -> int:
    return max(12, round(image_size * image_size * 0.0005))


def synthesize_sample(
    category: str,
    split: str,
    index: int,
    defect: str | None = None,
    seed: int = 0,
    image_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one sample of the Textures dataset.

    Args:
        category: One of :data:`CATEGORIES`.
        split: ``"train"`` (crops from the left half of the texture) or ``"test"`` (right half).
        index: Sample index inside its folder.
        defect: ``None`` for a normal image, else one of :data:`DEFECT_TYPES` (test split only).
        seed: Generation seed.
        image_size: Side of the square output image in pixels.

    Returns:
        ``(clean, image, mask)``: ``clean`` and ``image`` are ``(H, W, 3)`` uint8 RGB arrays, ``mask`` is an
        ``(H, W)`` uint8 array with values 0/255. For normal samples ``image`` equals ``clean`` and
        ``mask`` is all zero. For defects the mask is non-empty and marks the altered pixels.
    """
    _check_category(category)
    if split not in ("train", "test"):
        msg = f"split must be 'train' or 'test', got {split!r}"
        raise ValueError(msg)
    if defect is not None:
        _check_defects([defect])
        if split != "test":
            msg = "Defects are only generated for the test split."
            raise ValueError(msg)
    if image_size < 16:
        msg = f"image_size must be >= 16, got {image_size}"
        raise ValueError(msg)

    rng = _rng(seed, category, split, defect or "good", index)
    clean_f = _normal_crop(category, split, rng, image_size)
    clean = np.round(clean_f).astype(np.uint8)
    mask = np.zeros((image_size, image_size), np.uint8)
    image = clean
    if defect is not None:
        base = clean.astype(np.float32)
        for _ in range(_MAX_ATTEMPTS):
            out, region = _DEFECT_FUNCTIONS[defect](base, rng)
            candidate = np.round(np.clip(out, 0, 255)).astype(np.uint8)
            change = np.abs(candidate.astype(np.int16) - clean.astype(np.int16))
            if region.sum() >= _min_mask_pixels(image_size) and change[region].mean() >= _MIN_MEAN_CHANGE:
                image, mask = candidate, region.astype(np.uint8) * 255
                break
        else:  # pragma: no cover - the defect parameters make this practically impossible
            msg = f"Could not draw a visible {defect!r} defect for {category}/{index}"
            raise RuntimeError(msg)
    return np.dstack([clean] * 3), np.dstack([image] * 3), mask


# --------------------------------------------------------------------------------------------------
# On-disk cache
# --------------------------------------------------------------------------------------------------


def _generation_params(
    category: str,
    image_size: int,
    num_train: int,
    num_test_good: int,
    num_test_defect: int,
    defect_types: Sequence[str],
    seed: int,
) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "category": category,
        "image_size": int(image_size),
        "num_train": int(num_train),
        "num_test_good": int(num_test_good),
        "num_test_defect": int(num_test_defect),
        "defect_types": list(defect_types),
        "seed": int(seed),
    }


def _file_name(index: int, count: int) -> str:
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def _plan(params: dict) -> list[tuple[str, str | None, int, Path, Path | None]]:
    """(split, defect, index, image path, mask path) relative to the category directory."""
    jobs: list[tuple[str, str | None, int, Path, Path | None]] = []
    n = params["num_train"]
    jobs += [("train", None, i, Path("train", "good", f"{_file_name(i, n)}.png"), None) for i in range(n)]
    n = params["num_test_good"]
    jobs += [("test", None, i, Path("test", "good", f"{_file_name(i, n)}.png"), None) for i in range(n)]
    n = params["num_test_defect"]
    for defect in params["defect_types"]:
        for i in range(n):
            stem = _file_name(i, n)
            image_path = Path("test", defect, f"{stem}.png")
            jobs.append(("test", defect, i, image_path, Path("ground_truth", defect, f"{stem}_mask.png")))
    return jobs


def expected_files(params: dict) -> list[Path]:
    """All files (relative to the category directory) a complete generation writes, marker excluded."""
    files: list[Path] = []
    for _, _, _, image_path, mask_path in _plan(params):
        files.append(image_path)
        if mask_path is not None:
            files.append(mask_path)
    return files


def is_generated(category_dir: str | Path, params: dict) -> bool:
    """Whether ``category_dir`` holds a complete generation made with exactly ``params``."""
    category_dir = Path(category_dir)
    marker = category_dir / MARKER_NAME
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if stored != params:
        return False
    return all((category_dir / f).is_file() for f in expected_files(params))


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover
        msg = f"Could not encode {path}"
        raise RuntimeError(msg)
    path.write_bytes(buffer.tobytes())


def generate_category(root: str | Path, params: dict, progress: bool = True) -> Path:
    """Write one category to ``<root>/<category>`` (old files of that category are removed first).

    The marker file with ``params`` is written last, so an interrupted generation is detected as
    incomplete and redone next time.

    Raises:
        PermissionError / OSError: if ``root`` cannot be written, with a message naming the path.
    """
    category_dir = Path(root) / params["category"]
    try:
        category_dir.mkdir(parents=True, exist_ok=True)
        (category_dir / MARKER_NAME).unlink(missing_ok=True)
        for sub in ("train", "test", "ground_truth"):
            if (category_dir / sub).exists():
                shutil.rmtree(category_dir / sub)
        probe = category_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        msg = (
            f"Cannot write the Textures dataset to {category_dir.resolve()} "
            f"({err.__class__.__name__}: {err}). "
            "Choose a writable directory with `root` (CLI: --data.root)."
        )
        raise type(err)(msg) if isinstance(err, PermissionError) else OSError(msg) from err

    jobs = _plan(params)
    logger.info(
        "Generating Textures category '%s' (%d images) in %s",
        params["category"],
        len(jobs),
        category_dir.resolve(),
    )
    for split, defect, index, image_path, mask_path in tqdm(
        jobs, desc=f"Textures/{params['category']}", unit="img", disable=not progress
    ):
        _, image, mask = synthesize_sample(
            params["category"],
            split,
            index,
            defect=defect,
            seed=params["seed"],
            image_size=params["image_size"],
        )
        (category_dir / image_path).parent.mkdir(parents=True, exist_ok=True)
        _write_png(category_dir / image_path, image)
        if mask_path is not None:
            (category_dir / mask_path).parent.mkdir(parents=True, exist_ok=True)
            _write_png(category_dir / mask_path, mask)
    (category_dir / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return category_dir


# --------------------------------------------------------------------------------------------------
# anomalib dataset / datamodule
# --------------------------------------------------------------------------------------------------


class TexturesDataset(HighBitDepthMVTecADDataset):
    """One split of a generated Textures category (anomalib's ``MVTecADDataset``, this package's reader).

    Args:
        root: Dataset root holding the category folders.
        category: One of :data:`CATEGORIES`.
        augmentations: Augmentations applied jointly to image and mask.
        split: ``"train"`` / ``"test"`` (or :class:`~anomalib.data.utils.Split`); ``None`` for both.
    """

    def __init__(
        self,
        root: str | Path = "./datasets/textures",
        category: str = "brick",
        augmentations: Transform | None = None,
        split: str | Split | None = None,
    ) -> None:
        _check_category(category)
        super().__init__(root=root, category=category, augmentations=augmentations, split=split)


class Textures(HighBitDepthMVTecAD):
    """anomalib's ``MVTecAD`` datamodule over a category generated from scikit-image's textures (no download).

    ``prepare_data`` generates the category (instead of ``MVTecAD``'s download); everything else is
    ``MVTecAD``'s.

    Args:
        root: Dataset root; each category is written to ``<root>/<category>``.
            Defaults to ``"./datasets/textures"``.
        category: ``"brick"``, ``"grass"`` or ``"gravel"``. Defaults to ``"brick"``.
        image_size: Side of the generated square images in pixels (an ``(h, w)`` pair with h == w is
            accepted too: anomalib's ``get_datamodule`` turns ``image_size`` into a tuple).
            Defaults to ``256``.
        num_train: Number of normal training images. Defaults to ``60``.
        num_test_good: Number of normal test images. Defaults to ``16``.
        num_test_defect: Number of test images per defect type. Defaults to ``8``.
        defect_types: Defect types to generate (subset of ``scratch``, ``blob``, ``cut``);
            ``None`` for all three. Defaults to ``None``.
        generation_seed: Seed of the image synthesis; the same seed gives byte-identical files.
            Independent of ``seed`` (which only drives anomalib's split sampling). Defaults to ``0``.
        train_batch_size: Training batch size. Defaults to ``16``.
        eval_batch_size: Validation / test batch size. Defaults to ``16``.
        num_workers: Dataloader workers. Defaults to ``2``.
        train_augmentations: Augmentations for the training images. Defaults to ``None``.
        val_augmentations: Augmentations for the validation images. Defaults to ``None``.
        test_augmentations: Augmentations for the test images. Defaults to ``None``.
        augmentations: Augmentations used where no stage-specific ones are given. Defaults to ``None``.
        test_split_mode: How to obtain the test set. Defaults to ``TestSplitMode.FROM_DIR``.
        test_split_ratio: Fraction of train images used as test normals when the test set has none.
            Defaults to ``0.2``.
        val_split_mode: How to obtain the validation set. Defaults to ``ValSplitMode.SAME_AS_TEST``.
        val_split_ratio: Fraction of data used for validation. Defaults to ``0.5``.
        seed: Seed for anomalib's random splits. Defaults to ``None``.

    Raises:
        ValueError: unknown category or defect type, or non-positive counts.
    """

    def __init__(
        self,
        root: str | Path | None = "./datasets/textures",
        category: str = "brick",
        image_size: int | tuple[int, int] = 256,
        num_train: int = 60,
        num_test_good: int = 16,
        num_test_defect: int = 8,
        defect_types: list[str] | None = None,
        generation_seed: int = 0,
        train_batch_size: int = 16,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        _check_category(category)
        defects = _check_defects(DEFECT_TYPES if defect_types is None else defect_types)
        if not isinstance(image_size, int):
            sides = {int(side) for side in image_size}
            if len(sides) != 1:
                msg = f"Textures generates square images; got image_size={tuple(image_size)}"
                raise ValueError(msg)
            image_size = sides.pop()
        if image_size < 16:
            msg = f"image_size must be >= 16, got {image_size}"
            raise ValueError(msg)
        if num_train < 1 or num_test_good < 0 or num_test_defect < 1:
            msg = (
                "Textures needs num_train >= 1, num_test_good >= 0 and num_test_defect >= 1, got "
                f"{num_train}, {num_test_good}, {num_test_defect}"
            )
            raise ValueError(msg)
        super().__init__(
            root=resolve_dataset_root(root, "textures"),
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.image_size = image_size
        self.num_train = num_train
        self.num_test_good = num_test_good
        self.num_test_defect = num_test_defect
        self.defect_types = list(defects)
        self.generation_seed = generation_seed

    @property
    def generation_params(self) -> dict:
        """Parameters stored in the marker file; any change triggers regeneration."""
        return _generation_params(
            self.category,
            self.image_size,
            self.num_train,
            self.num_test_good,
            self.num_test_defect,
            self.defect_types,
            self.generation_seed,
        )

    @property
    def category_dir(self) -> Path:
        """Directory of the current category, ``<root>/<category>``."""
        return self.root / self.category

    def prepare_data(self) -> None:
        """Generate the category on disk unless a complete copy with the same parameters exists."""
        if is_generated(self.category_dir, self.generation_params):
            logger.info("Found Textures category '%s' in %s", self.category, self.category_dir)
            return
        generate_category(self.root, self.generation_params)

    def _make_dataset(self, split: Split) -> TexturesDataset:
        return TexturesDataset(root=self.root, category=self.category, split=split)

    def _setup(self, _stage: str | None = None) -> None:
        if not is_generated(self.category_dir, self.generation_params):
            # prepare_data is skipped when the datamodule is used without a Trainer
            generate_category(self.root, self.generation_params)
        super()._setup(_stage)
