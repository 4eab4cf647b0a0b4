"""examples/line_inspection.py: a corrupt file is counted, CSV scores match OpenVINOInferencer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ..helpers import LINE_INSPECTION, f32_openvino_inferencer, load_script

SIZE = 32


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small URD exported at 32 px (raw scores: nothing saturates)."""
    from anomalib_kd import URD

    torch.manual_seed(0)
    model = URD(
        backbone="resnet18", pre_trained=False, pre_processor=URD.configure_pre_processor((SIZE, SIZE))
    )
    return model.eval().to_openvino(tmp_path_factory.mktemp("ir"), input_size=(SIZE, SIZE))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        pixels = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
        if i % 2:
            pixels[4:12, 4:12] = 255
        Image.fromarray(pixels).save(images / f"{i:03d}.png")
    (images / "002_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return images


def test_folder_with_a_corrupt_file_matches_openvino_inferencer(
    tiny_ir: Path, folder: Path, tmp_path: Path
) -> None:
    runner = load_script(LINE_INSPECTION)
    out = tmp_path / "out"
    summary = runner.run(tiny_ir, folder, out, overlays=True)

    assert summary.inspected == 4
    assert len(summary.unreadable) == 1
    assert summary.unreadable[0].endswith("002_broken.png")
    with (out / "verdicts.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5
    broken = [row for row in rows if row["error"]]
    assert [Path(row["source"]).name for row in broken] == ["002_broken.png"]
    assert broken[0]["score"] == ""

    inferencer = f32_openvino_inferencer(tiny_ir)
    scores = []
    for row in rows:
        if row["error"]:
            continue
        expected = float(inferencer.predict(row["source"]).pred_score.reshape(-1)[0])
        assert abs(float(row["score"]) - expected) < 1e-4, row
        assert Path(row["mask_path"]).is_file()
        scores.append(expected)
    assert np.ptp(scores) > 0  # distinct images, distinct scores: the comparison means something
    assert len(list((out / "overlays").glob("*.png"))) == 4


def test_other_sizes_are_resized_to_the_ir_input(tiny_ir: Path, tmp_path: Path) -> None:
    from PIL import Image

    runner = load_script(LINE_INSPECTION)
    images = tmp_path / "big"
    images.mkdir()
    Image.fromarray((np.random.default_rng(1).random((2 * SIZE, 2 * SIZE, 3)) * 255).astype(np.uint8)).save(
        images / "a.png"
    )
    summary = runner.run(tiny_ir, images, tmp_path / "out")
    assert summary.inspected == 1
    assert not summary.unreadable


def test_missing_source_is_a_clear_error(tiny_ir: Path, tmp_path: Path) -> None:
    runner = load_script(LINE_INSPECTION)
    with pytest.raises(FileNotFoundError, match="neither a folder of images nor a video"):
        runner.run(tiny_ir, tmp_path / "nowhere", tmp_path / "out")
