"""Convert a dataset folder's 16-bit images to 8-bit PNG once, for anomalib's own classes and tools.

    python -m anomalib_kd.data.convert SRC DST [--window dtype | percentile | LOW,HIGH]
                                               [--percentiles LOW HIGH]

Every file under ``SRC`` is written to the same place under ``DST``. Images with more than 8 bits per
sample are read with :func:`~anomalib_kd.data.image.read_image` (the window maps them to [0, 1]) and
written as 8-bit PNG (gray when the channels are equal), the suffix becoming ``.png``; a 16-bit file
holding only 0 and one other value is a mask and is written 0/255. Everything else (8-bit images,
masks, other files) is copied unchanged. anomalib's ``Folder``/``MVTecAD``, ``anomalib predict``, the
inferencers and the visualizer then all see the same pixels.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anomalib.data.utils.image import is_image_file
from PIL import Image as PILImage

from .image import DEFAULT_PERCENTILES, Window, bits_per_sample, check_percentiles, check_window, read_image

__all__ = ["convert_folder", "main"]


def _to_8bit(path: Path, window: Window, percentiles: tuple[float, float]) -> np.ndarray:
    with PILImage.open(path) as image:
        raw = np.asarray(image)
    if raw.ndim == 2:
        values = np.unique(raw)
        if len(values) <= 2 and values[0] == 0:  # a mask: 0 stays 0, the other value becomes 255
            return (raw > 0).astype(np.uint8) * 255
    image = read_image(path, window=window, percentiles=percentiles).permute(1, 2, 0).numpy()
    array = np.round(image * 255.0).astype(np.uint8)
    return array[..., 0] if (array == array[..., :1]).all() else array


def convert_folder(
    source: str | Path,
    destination: str | Path,
    window: Window | Sequence[float] = "dtype",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, int]:
    """Write ``source`` to ``destination`` with >8-bit images as 8-bit PNG (module docstring).

    Returns:
        ``{"converted": n, "copied": m}``.

    Raises:
        ValueError: ``destination`` is ``source`` or inside it, or two files would land on one name.
    """
    source, destination = Path(source).resolve(), Path(destination).resolve()
    window, percentiles = check_window(window), check_percentiles(percentiles)
    if not source.is_dir():
        msg = f"Source folder {source} does not exist."
        raise FileNotFoundError(msg)
    if destination == source or source in destination.parents:
        msg = f"Destination {destination} must be outside the source folder {source}."
        raise ValueError(msg)
    counts = {"converted": 0, "copied": 0}
    written: dict[Path, Path] = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        convert = is_image_file(path) and bits_per_sample(path) > 8
        target = destination / path.relative_to(source)
        target = target.with_suffix(".png") if convert else target
        if target in written:
            msg = f"{path} and {written[target]} would both be written to {target}; rename one."
            raise ValueError(msg)
        written[target] = path
        target.parent.mkdir(parents=True, exist_ok=True)
        if convert:
            PILImage.fromarray(_to_8bit(path, window, percentiles)).save(target)
        else:
            shutil.copy2(path, target)
        counts["converted" if convert else "copied"] += 1
    return counts


def _window_argument(text: str) -> Window:
    if text in ("dtype", "percentile"):
        return text
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as error:
        msg = f"window is 'dtype', 'percentile' or LOW,HIGH (e.g. 0,4095), got {text!r}"
        raise argparse.ArgumentTypeError(msg) from error
    return (low, high)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_kd.data.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("source", type=Path, help="dataset folder (any layout: Folder, MVTec AD, ...)")
    parser.add_argument("destination", type=Path, help="new folder, written with the same layout")
    parser.add_argument(
        "--window", type=_window_argument, default="dtype", help="dtype | percentile | LOW,HIGH"
    )
    parser.add_argument("--percentiles", type=float, nargs=2, default=DEFAULT_PERCENTILES)
    args = parser.parse_args(argv)
    counts = convert_folder(args.source, args.destination, args.window, args.percentiles)
    converted, copied = counts["converted"], counts["copied"]
    print(f"{converted} image(s) converted to 8-bit PNG, {copied} file(s) copied to {args.destination}")


if __name__ == "__main__":
    main()
