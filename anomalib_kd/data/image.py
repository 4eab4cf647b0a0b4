"""One image reader for this package: 8-bit images as anomalib reads them, 16-bit images at full range.

anomalib's ``read_image`` converts every file with Pillow's ``convert("RGB")``, which clips 16-bit
grayscale (CT, MRI, X-ray PNG/TIFF) to 255: a CT-range image becomes all white. :func:`read_image`
gives the same result as anomalib for 8-bit files (Pillow's conversion, scaled by 1/255) and reads
files with more than 8 bits per sample at their full depth (OpenCV), then maps them to [0, 1] with a
*window*:

``window="dtype"`` (default)
    The full range of the stored type: uint16 ``x / 65535``, int16 ``(x + 32768) / 65535``. The same
    mapping for every image, so a brighter or darker region stays brighter or darker across images
    (a per-image window would normalise such an anomaly away). Data that uses only part of the range
    (12-bit X-ray, CT values 0..4095) then fills only part of [0, 1]: give a fixed window for those.
``window=(low, high)``
    A fixed window in the file's raw values (the CT/MRI "window"): ``low`` -> 0, ``high`` -> 1,
    values outside are clipped. Same mapping for every image. Example: ``(0, 4095)`` for 12-bit data.
``window="percentile"``
    Per image: the ``percentiles`` (default 0.5 and 99.5) of its values map to 0 and 1, values
    outside are clipped; a constant image reads as all 0. Each image gets its own contrast, so
    absolute intensity differences between images are lost.

Floating-point files must hold values in [0, 1] for ``"dtype"`` (else give a window). The window only
applies to files with more than 8 bits per sample; 8-bit files always read as anomalib reads them.

Channels: gray is repeated to RGB; an alpha channel is dropped (the colour values are kept as they
are, without compositing, as anomalib's ``convert("RGB")`` does). A file that cannot be read (empty,
truncated, not an image, several frames) raises :class:`ImageReadError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from anomalib.data.utils.image import get_image_filenames
from PIL import Image as PILImage
from torchvision.transforms.v2.functional import to_dtype, to_image
from torchvision.tv_tensors import Image

__all__ = [
    "DEFAULT_PERCENTILES",
    "WINDOWS",
    "ImageReadError",
    "Window",
    "bits_per_sample",
    "check_image",
    "check_percentiles",
    "check_window",
    "image_files",
    "read_image",
]

Window = str | tuple[float, float]
WINDOWS = ("dtype", "percentile")
DEFAULT_PERCENTILES = (0.5, 99.5)
_HIGH_DEPTH_MODES = ("I", "F")  # Pillow's 32-bit integer / float modes; "I;16*" are tested by prefix


class ImageReadError(OSError):
    """An image file that cannot be read (empty, truncated, not an image, several frames)."""


def check_window(window: Window | Sequence[float]) -> Window:
    """``window`` validated: ``"dtype"``, ``"percentile"`` or a ``(low, high)`` pair with ``low < high``."""
    if isinstance(window, str):
        if window not in WINDOWS:
            msg = f"window must be one of {WINDOWS} or a (low, high) pair of raw values, got {window!r}."
            raise ValueError(msg)
        return window
    values = tuple(float(v) for v in window)
    if len(values) != 2 or not values[0] < values[1] or not np.isfinite(values).all():
        msg = f"A fixed window is a (low, high) pair of finite raw values with low < high, got {window!r}."
        raise ValueError(msg)
    return values


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    """``percentiles`` validated: a pair ``0 <= low < high <= 100``."""
    values = tuple(float(v) for v in percentiles)
    if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 100.0:
        msg = f"percentiles must be a pair 0 <= low < high <= 100, got {percentiles!r}."
        raise ValueError(msg)
    return values


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursive, sorted), by anomalib's extension list.

    Raises:
        FileNotFoundError: ``folder`` is not a folder or holds no image file (the message names it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"Image folder {folder} does not exist."
        raise FileNotFoundError(msg)
    try:
        return get_image_filenames(folder)
    except ValueError as error:  # anomalib: "Found 0 images in <folder>"
        msg = f"{folder} holds no image file ({error})."
        raise FileNotFoundError(msg) from error


def _check_file(path: Path) -> None:
    if not path.is_file():
        msg = f"Image file {path} does not exist."
        raise FileNotFoundError(msg)
    if path.stat().st_size == 0:
        msg = f"Cannot read image {path}: the file is empty (0 bytes)."
        raise ImageReadError(msg)


def _read_error(path: Path, error: Exception) -> ImageReadError:
    msg = f"Cannot read image {path}: {type(error).__name__}: {error}"
    return ImageReadError(msg)


def check_image(path: str | Path) -> None:
    """Open ``path``'s header (cheap): raise :class:`ImageReadError` naming the file if it is no image."""
    path = Path(path)
    _check_file(path)
    try:
        with PILImage.open(path) as image:
            _check_frames(path, image)
    except ImageReadError:
        raise
    except Exception as error:
        raise _read_error(path, error) from error


def _check_frames(path: Path, image: PILImage.Image) -> None:
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1:
        msg = (
            f"Cannot read image {path}: it holds {frames} frames (a stack, volume or animation); "
            "save one image per file."
        )
        raise ImageReadError(msg)


def _bits_per_sample(path: Path, image: PILImage.Image) -> int:
    """Bits per sample as stored (Pillow reduces 16-bit colour PNG/TIFF to 8 bits without saying so)."""
    if image.mode.startswith("I;16"):
        return 16
    if image.mode in _HIGH_DEPTH_MODES:
        return 32
    if image.format == "PNG":
        with path.open("rb") as file:
            header = file.read(25)  # signature (8) + IHDR length/type (8) + width, height (8) + bit depth
        return int(header[24]) if len(header) == 25 else 8
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))  # BitsPerSample
        return max(int(b) for b in (bits if isinstance(bits, tuple | list) else (bits,)))
    return 8


def bits_per_sample(path: str | Path) -> int:
    """Bits per sample stored in the image file ``path`` (8 for ordinary images, 16 for CT/MRI PNG/TIFF)."""
    path = Path(path)
    _check_file(path)
    try:
        with PILImage.open(path) as image:
            return _bits_per_sample(path, image)
    except Exception as error:
        raise _read_error(path, error) from error


def _to_unit_range(
    array: np.ndarray, path: Path, window: Window, percentiles: tuple[float, float]
) -> np.ndarray:
    """Raw samples to float32 in [0, 1] by ``window`` (module docstring)."""
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        msg = f"Cannot read image {path}: it holds NaN or infinite values."
        raise ImageReadError(msg)
    if isinstance(window, tuple):
        low, high = window
    elif window == "percentile":
        low, high = (float(v) for v in np.percentile(values, percentiles))
        if high <= low:
            return np.zeros(array.shape, np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        low, high = float(info.min), float(info.max)
    else:
        if values.min() < 0.0 or values.max() > 1.0:
            msg = (
                f"Cannot read image {path}: floating-point values in [{values.min():g}, {values.max():g}] "
                "have no fixed range; give window=(low, high) or window='percentile'."
            )
            raise ImageReadError(msg)
        low, high = 0.0, 1.0
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _full_depth_rgb(path: Path, image: PILImage.Image) -> np.ndarray:
    """The samples at their stored depth as (H, W, 3) RGB (OpenCV decodes 16-bit colour; Pillow does not)."""
    array = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:  # a format OpenCV cannot decode: Pillow's I/F modes still hold the full values
        if not (image.mode.startswith("I;16") or image.mode in _HIGH_DEPTH_MODES):
            msg = f"Cannot read image {path}: {image.mode} with more than 8 bits per sample is not decodable."
            raise ImageReadError(msg)
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    channels = array.shape[2]
    if channels == 2:  # gray + alpha: alpha dropped
        return np.repeat(array[..., :1], 3, axis=2)
    if channels in (3, 4):  # OpenCV's BGR(A): alpha dropped
        return np.ascontiguousarray(array[..., 2::-1])
    msg = f"Cannot read image {path}: {channels} channels (expected gray, gray+alpha, RGB or RGBA)."
    raise ImageReadError(msg)


def read_image(
    path: str | Path,
    window: Window | Sequence[float] = "dtype",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> Image:
    """Read an image file as a (3, H, W) float32 ``tv_tensors.Image`` in [0, 1] (module docstring).

    8-bit files give exactly anomalib's ``read_image(path, as_tensor=True)``; files with more than 8
    bits per sample are read at full depth and mapped to [0, 1] by ``window``.

    Args:
        path: the image file.
        window: ``"dtype"`` (the stored type's full range), ``"percentile"`` (per image) or a fixed
            ``(low, high)`` window in raw values. Used for files with more than 8 bits per sample.
        percentiles: the low/high percentiles of ``window="percentile"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ImageReadError: the file is empty, truncated, not an image, holds several frames, or holds
            values the window cannot map (the message names the file).
    """
    path = Path(path)
    window = check_window(window)
    percentiles = check_percentiles(percentiles)
    _check_file(path)
    try:
        with PILImage.open(path) as image:
            _check_frames(path, image)
            image.load()  # decodes now, so truncation is reported here with the file name
            if _bits_per_sample(path, image) <= 8:
                # anomalib's own conversion (gray repeated, alpha dropped, palette expanded)
                return to_dtype(to_image(image.convert("RGB")), torch.float32, scale=True)
            rgb = _full_depth_rgb(path, image)
    except (ImageReadError, FileNotFoundError):
        raise
    except Exception as error:  # Pillow/OpenCV errors rarely name the file: add it
        raise _read_error(path, error) from error
    return Image(torch.from_numpy(_to_unit_range(rgb, path, window, percentiles)).permute(2, 0, 1))
