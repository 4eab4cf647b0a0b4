"""Same seed, same data, same machine -> the same trained model and the same scores, for the four models.

Seeding as ``anomalib train --seed_everything S`` does it (Lightning's ``seed_everything(S, workers=True)``
before the model and data are built), then ``Engine.fit`` on a tiny MVTec-layout folder. Two fits with the
same seed must give bit-identical weights and raw scores (tolerance: exact; on a CPU with a fixed thread
count the kernels used here are deterministic). A fit with another seed must give other weights, so the
test can fail if the seed were ignored.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from .models.test_anomalib_sequence import CATEGORY, MODELS, _write_mvtec


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mvtec(tmp_path_factory.mktemp("mvtec_determinism"))


class _Losses(Callback):
    """The training loss of every step (it depends on every random draw of the step, e.g. URD's synthetic
    anomalies, which two steps of Adam's nearly sign-only first updates can leave out of the weights)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: object, module: object, outputs: object, *args: object) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _fit_and_score(name: str, seed: int, root: Path, workdir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Seed, build, fit two steps; returns the state dict, the raw scores/maps on the test images and the
    training losses."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    build, train_batch_size = MODELS[name]
    seed_everything(seed, workers=True)
    datamodule = MVTecAD(
        root=root, category=CATEGORY, train_batch_size=train_batch_size, eval_batch_size=4, num_workers=0
    )
    model = build()
    if name == "URD":
        # "auto" picks GrabCut for MVTec AD bottle, which finds no object in these noise images and so leaves
        # nothing to synthesise: without it the step's random anomalies are drawn and used.
        model.foreground_mask = None
    losses = _Losses()
    engine = Engine(
        callbacks=[losses],
        max_epochs=1,
        limit_train_batches=2,  # two training batches (URD: two optimizer steps each)
        default_root_dir=workdir,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    engine.fit(model, datamodule=datamodule)
    model.eval()
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        predictions = model(batch.image)
    scores = {
        "pred_score": predictions.pred_score,
        "anomaly_map": predictions.anomaly_map,
        "train_loss": torch.tensor(losses.losses, dtype=torch.float64),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, scores


@pytest.mark.parametrize("name", list(MODELS))
def test_same_seed_same_scores(name: str, mvtec_root: Path, tmp_path: Path) -> None:
    first_state, first_scores = _fit_and_score(name, 7, mvtec_root, tmp_path / "a")
    second_state, second_scores = _fit_and_score(name, 7, mvtec_root, tmp_path / "b")
    other_state, _ = _fit_and_score(name, 8, mvtec_root, tmp_path / "c")

    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert torch.equal(first_state[key], second_state[key]), (
            f"{name}: {key} differs between same-seed fits"
        )
    for key, value in first_scores.items():
        assert torch.isfinite(value).all(), f"{name}: {key} not finite"
        assert torch.equal(value, second_scores[key]), f"{name}: {key} differs between same-seed fits"
    assert first_scores["train_loss"].numel() == 2, f"{name}: expected two training steps"
    assert first_scores["pred_score"].std() > 0, f"{name}: scores do not vary across images"
    changed = [
        k
        for k in first_state
        if first_state[k].is_floating_point() and not torch.equal(first_state[k], other_state[k])
    ]
    assert changed, f"{name}: another seed gave the same weights (the seed is not used)"
