"""anomalib's model-integration sequence for the four models, on a tiny MVTec-layout dataset.

As anomalib's own ``tests/integration/model/test_models.py`` walks each model: ``Engine(max_epochs=1)``
``fit``, then ``test``, ``train``, ``validate`` and ``predict`` from the checkpoint, then ``export`` to
torch, ONNX and OpenVINO from the checkpoint, and each export loaded and run (TorchInferencer,
OpenVINO on the ONNX file, OpenVINOInferencer). The data is anomalib's ``MVTecAD`` datamodule over a
folder this test writes (64 px, 4 training normals, 2 good + 2 defective test images with masks), so
a model that breaks anomalib's generic one-class path (D24FAD included) fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ..helpers import f32_openvino_inferencer

SIZE = 64
CATEGORY = "bottle"


def _write_mvtec(root: Path) -> Path:
    """root/bottle/{train/good, test/good, test/broken, ground_truth/broken} with 64 px PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / CATEGORY
    for sub, count in (("train/good", 4), ("test/good", 2), ("test/broken", 2)):
        folder = base / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = (rng.random((SIZE, SIZE, 3)) * 80 + 60).astype(np.uint8)
            if sub == "test/broken":
                image[8:24, 8:24] = 255
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[8:24, 8:24] = 255
                (base / "ground_truth/broken").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(base / "ground_truth/broken" / f"{i:03d}_mask.png")
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mvtec(tmp_path_factory.mktemp("mvtec"))


def _urd() -> object:
    from anomalib_kd.models.urd import URD

    return URD(
        backbone="resnet18",
        pre_trained=False,
        iterations=2,
        foreground_mask=None,  # "auto" picks GrabCut for "bottle", which finds no object in noise images
        pre_processor=URD.configure_pre_processor((SIZE, SIZE)),
    )


def _dhkd() -> object:
    from anomalib_kd.models.dhkd import DHKD

    return DHKD(pre_trained=False, image_size=SIZE)


def _pdd() -> object:
    from anomalib_kd.models.pdd import PDD

    return PDD(
        pre_trained=False,
        backbone="resnet18",
        vmamba_depths=(1, 1, 1, 1),
        vmamba_dims=(8, 16, 32, 64),
        pre_processor=PDD.configure_pre_processor((SIZE, SIZE)),
    )


def _d24fad() -> object:
    from anomalib_kd.models.d24fad import D24FAD

    return D24FAD(
        backbone="resnet18",
        pre_trained=False,
        k_shot=2,
        pre_processor=D24FAD.configure_pre_processor((SIZE, SIZE)),
    )


# DHKD trains with batch size 1 (paper and official code); the others take 2.
MODELS: dict[str, tuple[Callable[[], object], int]] = {
    "URD": (_urd, 2),
    "DHKD": (_dhkd, 1),
    "PDD": (_pdd, 2),
    "D24FAD": (_d24fad, 2),
}


@pytest.mark.slow
# PDD and DHKD take minutes each on a 2-core CPU: marked heavy (`.ci/run` runs them with `-m heavy`).
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in {"PDD", "DHKD"} else n for n in MODELS]
)
def test_anomalib_model_sequence(
    name: str, mvtec_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov
    from anomalib.data import MVTecAD
    from anomalib.deploy import ExportType, TorchInferencer
    from anomalib.engine import Engine

    build, train_batch_size = MODELS[name]
    torch.manual_seed(0)
    datamodule = MVTecAD(
        root=mvtec_root,
        category=CATEGORY,
        train_batch_size=train_batch_size,
        eval_batch_size=4,
        num_workers=0,
    )
    model = build()
    engine = Engine(
        max_epochs=1,
        limit_train_batches=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )

    engine.fit(model, datamodule=datamodule)
    ckpt = (
        engine.trainer.checkpoint_callback.best_model_path
        or engine.trainer.checkpoint_callback.last_model_path
    )
    assert ckpt, f"{name}: fit saved no checkpoint"

    tested = engine.test(model, datamodule=datamodule, ckpt_path=ckpt)
    assert np.isfinite(tested[0]["image_AUROC"]), f"{name}: test gave no image AUROC"
    engine.train(model, datamodule=datamodule, ckpt_path=ckpt)
    validated = engine.validate(model, datamodule=datamodule, ckpt_path=ckpt)
    assert validated is not None
    predictions = engine.predict(model, datamodule=datamodule, ckpt_path=ckpt, return_predictions=True)
    assert predictions, f"{name}: predict returned nothing"
    scores = torch.cat([batch.pred_score.reshape(-1) for batch in predictions])
    assert scores.numel() == 4 and bool(torch.isfinite(scores).all())

    image = next((mvtec_root / CATEGORY / "test" / "broken").glob("*.png"))
    exports = tmp_path / "exports"

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # TorchInferencer unpickles: our own file, just written
    torch_path = engine.export(model, ExportType.TORCH, export_root=exports, ckpt_path=ckpt)
    torch_prediction = TorchInferencer(path=torch_path, device="cpu").predict(image)
    assert torch.isfinite(torch.as_tensor(torch_prediction.pred_score).detach()).all()

    onnx_path = engine.export(
        model, ExportType.ONNX, export_root=exports, ckpt_path=ckpt, input_size=(SIZE, SIZE)
    )
    compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    onnx_scores = compiled(np.zeros((1, 3, SIZE, SIZE), np.float32))[compiled.output("pred_score")]
    assert np.isfinite(onnx_scores).all()

    xml = engine.export(
        model, ExportType.OPENVINO, export_root=exports, ckpt_path=ckpt, input_size=(SIZE, SIZE)
    )
    ov_prediction = f32_openvino_inferencer(xml).predict(image)
    assert np.isfinite(ov_prediction.pred_score).all()
    # the OpenVINO export scores the image as the torch export does
    np.testing.assert_allclose(
        np.asarray(ov_prediction.pred_score).reshape(-1),
        torch.as_tensor(torch_prediction.pred_score).detach().reshape(-1).numpy(),
        atol=1e-3,
    )
