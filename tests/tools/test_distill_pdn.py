"""PDN distillation tool: tiny images, a tiny random backbone; resumable, atomic checkpoints; the output
loads as the DHKD teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_kd.components.backbones import MissingWeightsError
from anomalib_kd.models.dhkd import DHKDModel
from anomalib_kd.tools import distill_pdn as tool

TINY = {
    "backbone": "resnet18",
    "pre_trained": False,
    "batch_size": 2,
    "image_size": 64,
    "backbone_image_size": 128,
    "stats_images": 3,
    "num_workers": 0,
    "progress": False,
}


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images" / "class_a"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return tmp_path / "images"


def test_cli_distils_resumes_and_output_loads_as_dhkd_teacher(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out" / "pdn.pth"
    args = ["--images", str(image_dir), "--output", str(output), "--backbone", "resnet18", "--no-pretrained",
            "--batch-size", "2", "--image-size", "64", "--backbone-image-size", "128", "--stats-images", "3",
            "--num-workers", "0", "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    assert tool.main([*args, "--steps", "2"]) == output
    checkpoint = output.with_name("pdn.pth.ckpt")
    first = torch.load(checkpoint, weights_only=True)
    assert first["step"] == 2

    # Resuming must not recompute the target statistics and must continue from step 2.
    def no_stats(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("statistics recomputed on resume")

    monkeypatch.setattr(tool, "_target_stats", no_stats)
    tool.main([*args, "--steps", "4"])
    second = torch.load(checkpoint, weights_only=True)
    assert second["step"] == 4
    assert torch.equal(second["stats"]["mean"], first["stats"]["mean"])
    assert not torch.equal(second["teacher"]["conv1.weight"], first["teacher"]["conv1.weight"])

    model = DHKDModel(image_size=64)
    model.load_teacher(str(output))
    final = torch.load(output, weights_only=True)
    assert torch.equal(model.teacher.conv6.weight, final["conv6.weight"])
    assert torch.equal(final["conv6.weight"], second["teacher"]["conv6.weight"])
    # The resumable checkpoint is itself a valid teacher file.
    DHKDModel(image_size=64).load_teacher(str(checkpoint))


def test_interrupted_save_keeps_the_good_checkpoint(
    image_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "pdn.pth"
    tool.distill_pdn(image_dir, output, steps=1, checkpoint_every=1, **TINY)
    checkpoint = output.with_name("pdn.pth.ckpt")
    good = checkpoint.read_bytes()
    real_save = torch.save

    def crashing_save(obj: object, path: object, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"partial")  # a crash half-way through writing
        raise KeyboardInterrupt

    monkeypatch.setattr(tool.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        tool.distill_pdn(image_dir, output, steps=2, checkpoint_every=1, **TINY)
    monkeypatch.setattr(tool.torch, "save", real_save)
    assert checkpoint.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert torch.load(checkpoint, weights_only=True)["step"] == 1


def test_target_shape_matches_pdn_and_missing_backbone_weights_are_reported(
    image_dir: Path, tmp_path: Path
) -> None:
    target = tool.PatchFeatureTarget("resnet18", ("layer2", "layer3"), out_channels=384)
    assert target(torch.rand(2, 3, 128, 128), (16, 16)).shape == (2, 384, 16, 16)
    with pytest.raises(MissingWeightsError, match="resnet18"):
        tool.distill_pdn(image_dir, tmp_path / "x.pth", steps=1, **{**TINY, "pre_trained": True})
