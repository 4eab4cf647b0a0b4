"""Synthetic anomalies: foreground restriction (URD's official object masks), switch-off, texture use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image

from anomalib_kd.components import synthesis
from anomalib_kd.components.synthesis import (
    AnomalySynthesizer,
    ForegroundMasker,
    grabcut_foreground,
    otsu_inverted_foreground,
)

SIZE = 64


def object_images(count: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy discs (the object) on a bright noisy background, and the true object masks."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, objects = [], []
    for i in range(count):
        centre, radius = 24 + 3 * i, 14 + i
        disc = ((rows - centre) ** 2 + (cols - (SIZE - centre)) ** 2 <= radius**2).float()
        noise = 0.05 * torch.rand(3, SIZE, SIZE, generator=generator)
        images.append(0.85 - 0.6 * disc + noise)
        objects.append(disc)
    return torch.stack(images).clamp(0, 1), torch.stack(objects).unsqueeze(1)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_otsu_inverted_finds_the_dark_object() -> None:
    images, objects = object_images(1)
    foreground = otsu_inverted_foreground(to_uint8(images[0]))
    assert np.array_equal(foreground, objects[0, 0].numpy().astype(bool))


def test_grabcut_finds_the_object_inside_the_border() -> None:
    images, objects = object_images(1)
    foreground = grabcut_foreground(to_uint8(images[0]))
    truth = objects[0, 0].numpy().astype(bool)
    assert foreground.dtype == bool
    assert foreground.shape == truth.shape
    # Object recovered, background (incl. the one-pixel border GrabCut is told is background) rejected.
    assert (foreground & truth).sum() > 0.9 * truth.sum()
    assert (foreground & ~truth).sum() < 0.05 * (~truth).sum()
    assert not foreground[0].any()
    assert not foreground[:, 0].any()


@pytest.mark.parametrize("method", ["otsu_inverted", "grabcut"])
def test_foreground_restricts_every_anomaly_pixel(method: str) -> None:
    """With a foreground mask, every synthetic-anomaly pixel (mask and changed pixel) lies on the object."""
    images, _ = object_images()
    torch.manual_seed(0)
    synthesizer = AnomalySynthesizer(foreground=method)
    foreground = ForegroundMasker(method)(images)
    total = 0
    for _ in range(4):
        augmented, masks = synthesizer(images)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert not (masks * (1 - foreground)).any()  # mask pixels only inside the foreground
        changed = (augmented - images).abs().amax(dim=1, keepdim=True) > 0
        assert not (changed & (masks == 0)).any()  # image changed only under the mask
        total += int(masks.sum())
    assert total > 0  # the restriction left anomalies to check (not vacuously true)


def test_foreground_off_is_anomalibs_generator() -> None:
    """Switched off, the synthesizer gives exactly anomalib's generator output (the old behaviour), and
    that output does put anomalies on the background, which the foreground mask removes."""
    images, objects = object_images()
    torch.manual_seed(3)
    augmented, masks = AnomalySynthesizer(foreground=None)(images)
    torch.manual_seed(3)
    expected, expected_masks = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.2, 1.0))(images)
    torch.testing.assert_close(augmented, expected.clamp(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(masks, expected_masks, rtol=0, atol=0)
    assert (masks * (1 - objects)).sum() > 0

    torch.manual_seed(3)
    restricted, restricted_masks = AnomalySynthesizer(foreground="otsu_inverted")(images)
    torch.testing.assert_close(restricted_masks, masks * objects, rtol=0, atol=0)  # M <- M * FG
    torch.testing.assert_close(restricted, torch.where(restricted_masks > 0, augmented, images))


def test_foreground_is_computed_once_per_image(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(image: np.ndarray) -> np.ndarray:
        calls.append(1)
        return otsu_inverted_foreground(image)

    monkeypatch.setitem(synthesis.FOREGROUND_METHODS, "otsu_inverted", counting)
    images, objects = object_images(3)
    masker = ForegroundMasker("otsu_inverted")
    first = masker(images)
    second = masker(images.flip(0))  # same images in another order: served from the cache
    assert len(calls) == 3
    torch.testing.assert_close(first, objects)
    torch.testing.assert_close(second, objects.flip(0))
    masker(images[:1] * 0.5)  # a different image is segmented
    assert len(calls) == 4


def test_unknown_foreground_method_is_refused() -> None:
    with pytest.raises(ValueError, match="Unknown foreground method 'threshold'"):
        AnomalySynthesizer(foreground="threshold")


def test_texture_used_unaugmented_when_asked(tmp_path: Path) -> None:
    """URD's official synthesis pastes the DTD texture as it is; anomalib's generator augments it."""
    textures = tmp_path / "dtd" / "banded"
    textures.mkdir(parents=True)
    colour = (200, 40, 90)
    Image.new("RGB", (32, 32), colour).save(textures / "a.png")
    images = torch.zeros(8, 3, SIZE, SIZE)
    expected = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1) / 255
    plain = AnomalySynthesizer(texture_dir=tmp_path / "dtd", blend_factor=(1.0, 1.0), augment_texture=False)
    torch.manual_seed(0)
    augmented, masks = plain(images)
    inside = masks.expand_as(augmented) > 0
    assert inside.any()
    torch.testing.assert_close(augmented[inside], expected.expand_as(augmented)[inside])

    torch.manual_seed(0)
    augmenting = AnomalySynthesizer(texture_dir=tmp_path / "dtd", blend_factor=(1.0, 1.0))
    augmented, masks = augmenting(images)
    inside = masks.expand_as(augmented) > 0
    assert not torch.allclose(augmented[inside], expected.expand_as(augmented)[inside], atol=1e-3)


def test_an_image_without_foreground_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GrabCut on an image with no object (e.g. noise) returns an empty mask: no anomaly is synthesised
    there, which must not go unnoticed (URD would train without anomalies); warned once per masker."""
    empty = lambda image: np.zeros(image.shape[:2], bool)  # noqa: E731
    monkeypatch.setitem(synthesis.FOREGROUND_METHODS, "grabcut", empty)
    masker = ForegroundMasker("grabcut")
    images, _ = object_images(3)
    with caplog.at_level("WARNING", logger=synthesis.__name__):
        assert not masker(images).any()
        masker(images[:1] * 0.5)
    warnings = [r for r in caplog.records if "found no object" in r.getMessage()]
    assert len(warnings) == 1
    assert "foreground_mask null" in warnings[0].getMessage()
