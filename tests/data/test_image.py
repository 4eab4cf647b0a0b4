"""The shared image reader: 8-bit as anomalib, 16-bit at full range with a window, named read errors."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from anomalib.data.utils.image import read_image as anomalib_read_image
from PIL import Image
from torchvision import tv_tensors

from anomalib_kd.data.image import ImageReadError, check_image, image_files, read_image


def ct_slice(shape: tuple[int, int] = (24, 20)) -> np.ndarray:
    """CT-like raw values 1000..3000 (both ends present) in uint16."""
    values = np.random.default_rng(0).integers(1000, 3001, shape).astype(np.uint16)
    values.flat[0], values.flat[1] = 1000, 3000
    return values


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_keeps_its_full_range(tmp_path: Path, suffix: str) -> None:
    raw = ct_slice()
    path = tmp_path / f"ct{suffix}"
    assert cv2.imwrite(str(path), raw)
    image = read_image(path)
    assert isinstance(image, tv_tensors.Image)
    assert image.shape == (3, *raw.shape)
    assert image.dtype == torch.float32
    expected = torch.from_numpy(raw.astype(np.float32) / 65535.0)  # window="dtype": x / 65535
    for channel in image:
        torch.testing.assert_close(channel, expected, rtol=0, atol=1e-7)
    # anomalib's own reader clips this file to white: the case this reader exists for
    assert float(anomalib_read_image(path, as_tensor=True).min()) == 1.0


def test_windows(tmp_path: Path) -> None:
    raw = ct_slice()
    path = tmp_path / "ct.png"
    cv2.imwrite(str(path), raw)
    fixed = read_image(path, window=(1000, 3000))[0]
    torch.testing.assert_close(
        fixed, torch.from_numpy((raw.astype(np.float32) - 1000) / 2000), atol=1e-6, rtol=0
    )
    narrow = read_image(path, window=[1500, 2500])[0]  # a list (as from a YAML config) works too
    assert float(narrow.min()) == 0.0
    assert float(narrow.max()) == 1.0
    low, high = np.percentile(raw.astype(np.float64), (10, 90))
    expected = np.clip((raw - low) / (high - low), 0, 1).astype(np.float32)
    image = read_image(path, window="percentile", percentiles=(10, 90))[0]
    torch.testing.assert_close(image, torch.from_numpy(expected), atol=1e-6, rtol=0)
    cv2.imwrite(str(path), np.full((8, 8), 1234, np.uint16))
    assert not read_image(path, window="percentile").any()  # constant image: all 0, documented
    with pytest.raises(ValueError, match="window must be one of"):
        read_image(path, window="auto")
    with pytest.raises(ValueError, match="low < high"):
        read_image(path, window=(3000, 1000))
    with pytest.raises(ValueError, match="percentiles"):
        read_image(path, window="percentile", percentiles=(50, 50))


def test_16bit_colour_signed_and_float(tmp_path: Path) -> None:
    raw = ct_slice()
    rgb = np.dstack([raw, raw // 2, raw // 3])
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    image = read_image(tmp_path / "rgb16.png")
    for channel, values in zip(image, np.moveaxis(rgb, 2, 0), strict=True):
        torch.testing.assert_close(channel, torch.from_numpy(values / 65535.0).float(), atol=1e-7, rtol=0)
    signed = (raw.astype(np.int32) - 2000).astype(np.int16)  # e.g. Hounsfield units
    cv2.imwrite(str(tmp_path / "hu.tif"), signed)
    expected = (signed.astype(np.float32) + 32768) / 65535
    torch.testing.assert_close(
        read_image(tmp_path / "hu.tif")[0], torch.from_numpy(expected), atol=1e-6, rtol=0
    )
    cv2.imwrite(str(tmp_path / "unit.tif"), (raw / 3000).astype(np.float32))
    assert float(read_image(tmp_path / "unit.tif").max()) == pytest.approx(1.0)
    cv2.imwrite(str(tmp_path / "hu_float.tif"), signed.astype(np.float32))
    with pytest.raises(ImageReadError, match=r"hu_float.tif: floating-point values in \[-1000, 1000\]"):
        read_image(tmp_path / "hu_float.tif")
    assert float(read_image(tmp_path / "hu_float.tif", window=(-1000, 1000)).max()) == 1.0


def test_8bit_rgba_gray_and_palette_read_as_anomalib(tmp_path: Path) -> None:
    rgba = np.random.default_rng(1).integers(0, 256, (12, 10, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colours are still what is read (alpha dropped)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "photo.jpg")
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (3, 12, 10)
    torch.testing.assert_close(image, torch.from_numpy(rgba[..., :3] / 255.0).permute(2, 0, 1).float())
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (3, 12, 10)
    for channel in gray:
        torch.testing.assert_close(channel, torch.from_numpy(rgba[..., 0] / 255.0).float())
    for name in ("rgba.png", "gray.png", "palette.png", "photo.jpg"):
        assert torch.equal(read_image(tmp_path / name), anomalib_read_image(tmp_path / name, as_tensor=True))
    # the window only applies above 8 bits: an 8-bit file reads the same whatever the window
    assert torch.equal(read_image(tmp_path / "gray.png", window=(100, 120)), gray)


def _truncated_png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_unreadable_files_raise_an_error_naming_the_file(tmp_path: Path) -> None:
    truncated = _truncated_png(tmp_path / "truncated.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    truncated16 = tmp_path / "truncated16.png"
    cv2.imwrite(str(truncated16), ct_slice((64, 64)))
    truncated16.write_bytes(truncated16.read_bytes()[:200])
    for path, reason in (
        (truncated, "image file is truncated"),
        (truncated16, "image file is truncated"),
        (empty, r"the file is empty \(0 bytes\)"),
        (text, "cannot identify image file"),
    ):
        with pytest.raises(ImageReadError, match=re.escape(str(path)) + ".*" + reason):
            read_image(path)
    with pytest.raises(ImageReadError, match=re.escape(str(empty))):
        check_image(empty)
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_image(tmp_path / "missing.png")
    stack = tmp_path / "volume.tif"
    frames = [Image.fromarray(ct_slice()) for _ in range(3)]
    frames[0].save(stack, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match=r"volume.tif: it holds 3 frames"):
        read_image(stack)


def test_image_files_uses_anomalib_extensions(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.tiff", "c.pgm", "sub/d.jpg", "notes.txt", "mask.npy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in image_files(tmp_path)] == ["a.tiff", "b.PNG", "c.pgm", "d.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no image file"):
        image_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_files(tmp_path / "nowhere")
