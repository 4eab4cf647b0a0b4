"""The 16-bit -> 8-bit converter for anomalib's own Folder/MVTecAD: windowed images, untouched masks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from anomalib.data.utils.image import read_image as anomalib_read_image
from PIL import Image

from anomalib_kd.data.convert import convert_folder, main
from anomalib_kd.data.image import read_image


def write_source(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = rng.integers(1000, 3001, (12, 10)).astype(np.uint16)
    raw.flat[:2] = 1000, 3000
    mask16 = np.zeros((12, 10), np.uint16)
    mask16[2:5, 3:7] = 1  # a 16-bit mask with values 0/1
    rgb8 = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    cv2.imwrite(str(root / "good" / "000.png"), raw)
    cv2.imwrite(str(root / "good" / "001.tif"), raw[::-1])
    Image.fromarray(rgb8).save(root / "bad" / "000.png")
    cv2.imwrite(str(root / "masks" / "000.png"), mask16)
    (root / "notes.txt").write_text("kept")
    return {"raw": raw, "mask": mask16, "rgb8": rgb8}


def test_converts_16bit_and_copies_the_rest(tmp_path: Path) -> None:
    arrays = write_source(tmp_path / "src")
    counts = convert_folder(tmp_path / "src", tmp_path / "dst", window=(1000, 3000))
    assert counts == {"converted": 3, "copied": 2}
    converted = np.asarray(Image.open(tmp_path / "dst" / "good" / "000.png"))
    assert converted.dtype == np.uint8
    assert converted.ndim == 2  # gray stays gray
    expected = np.round((arrays["raw"].astype(np.float64) - 1000) / 2000 * 255).astype(np.uint8)
    assert np.array_equal(converted, expected)
    assert (tmp_path / "dst" / "good" / "001.png").is_file()  # .tif -> .png
    assert not (tmp_path / "dst" / "good" / "001.tif").exists()
    # anomalib's own reader now sees the windowed image (to 8-bit rounding) instead of white
    ours = read_image(tmp_path / "src" / "good" / "000.png", window=(1000, 3000))
    theirs = anomalib_read_image(tmp_path / "dst" / "good" / "000.png", as_tensor=True)
    torch.testing.assert_close(theirs, ours, atol=0.5 / 255 + 1e-6, rtol=0)
    mask = np.asarray(Image.open(tmp_path / "dst" / "masks" / "000.png"))
    assert np.array_equal(mask, (arrays["mask"] > 0).astype(np.uint8) * 255)  # not windowed to 0
    src_bytes = (tmp_path / "src" / "bad" / "000.png").read_bytes()
    assert (tmp_path / "dst" / "bad" / "000.png").read_bytes() == src_bytes  # 8-bit: unchanged
    assert (tmp_path / "dst" / "notes.txt").read_text() == "kept"


def test_command_line_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_source(tmp_path / "src")
    main([str(tmp_path / "src"), str(tmp_path / "out"), "--window", "0,4095"])
    assert "3 image(s) converted" in capsys.readouterr().out
    image = np.asarray(Image.open(tmp_path / "out" / "good" / "000.png"))
    assert image.max() == round(3000 / 4095 * 255)
    with pytest.raises(ValueError, match="outside the source folder"):
        convert_folder(tmp_path / "src", tmp_path / "src" / "converted")
    cv2.imwrite(str(tmp_path / "src" / "good" / "001.png"), np.full((4, 4), 2000, np.uint16))
    with pytest.raises(ValueError, match=r"001\.tif and .*001\.png would both be written"):
        convert_folder(tmp_path / "src", tmp_path / "again")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "src"), str(tmp_path / "x"), "--window", "wide"])
