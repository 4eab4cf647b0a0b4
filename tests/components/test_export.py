"""INT8 (PTQ) OpenVINO export of each model keeps the f32 model's ranking of a tiny test set.

Each model is trained for one short epoch on one shared tiny dataset (64 px, random weights), exported
with ``to_openvino(compression_type=INT8_PTQ)`` (anomalib's exporter, calibration images from the
datamodule) and run through anomalib's ``OpenVINOInferencer`` (f32 hint). Its image scores are compared
with the eager f32 model's on the 12 test images.

Tolerance: Spearman rank correlation >= 0.8. A tiny, randomly initialised model separates images by
small feature differences, so 8-bit activations (one step = 1/256 of a tensor's range) can swap images
whose f32 scores are that close; 0.8 still needs the order to be kept almost everywhere (a random
order of 12 images reaches it with p < 0.001; a constant output has no correlation at all). NNCF's
default recipe (the whole graph quantised) gives the same score to every image for URD, PDD and D24FAD
on this data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import numpy as np
import pytest
import torch
from anomalib.deploy import CompressionType

from anomalib_kd.components.export import QuantizationRecipe, float_op_names, onnx_module_scopes

from ..helpers import f32_openvino_inferencer, make_tasks

SIZE = 64
MIN_SPEARMAN = 0.8


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny tasks (D24FAD trains on 'beta' episodes; every model is tested on 'alpha')."""
    return make_tasks(tmp_path_factory.mktemp("int8_tasks"), names=("alpha", "beta"), sizes=(SIZE,), n_test=6)


def _datamodule(root: Path, episodic: bool, train_batch_size: int = 4) -> object:
    from anomalib_kd.data.fewshot import FewShotTasks

    return FewShotTasks(
        root=root,
        target="alpha",
        k_shot=2 if episodic else 6,
        mode="episodic" if episodic else "one_class",
        train_batch_size=train_batch_size,
        eval_batch_size=4,
    )


def _model(name: str) -> object:
    from anomalib_kd import D24FAD, DHKD, PDD, URD

    resize = (SIZE, SIZE)
    if name == "urd":
        return URD(
            backbone="resnet18",
            pre_trained=False,
            iterations=2,
            pre_processor=URD.configure_pre_processor(resize),
        )
    if name == "dhkd":
        return DHKD(pre_trained=False, image_size=SIZE)
    if name == "pdd":
        return PDD(
            pre_trained=False,
            pre_processor=PDD.configure_pre_processor(resize),
            backbone="resnet18",
            vmamba_depths=(1, 1, 1, 1),
            vmamba_dims=(8, 16, 32, 64),
        )
    return D24FAD(
        backbone="resnet18", pre_trained=False, pre_processor=D24FAD.configure_pre_processor(resize)
    )


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def trained_tiny_model(name: str, tasks_root: Path, tmp_path: Path) -> tuple[Any, Any]:
    """``name`` trained for one short epoch on the tiny tasks, and its datamodule (calibration images)."""
    from anomalib.engine import Engine

    lightning.seed_everything(0)
    model = _model(name)
    # DHKD trains with batch size 1 (paper, official code; other sizes are refused)
    datamodule = _datamodule(
        tasks_root, episodic=name == "d24fad", train_batch_size=1 if name == "dhkd" else 4
    )
    engine = Engine(
        default_root_dir=tmp_path, enable_progress_bar=False, logger=False, max_epochs=1, devices=1
    )
    engine.fit(model, datamodule=datamodule)
    return model.eval(), datamodule


def tiny_test_images(tasks_root: Path) -> tuple[list[Path], torch.Tensor]:
    """The 12 test files of task 'alpha' and their images ``(12, 3, SIZE, SIZE)`` in [0, 1]."""
    from anomalib.data.utils import read_image

    files = sorted((tasks_root / "alpha" / "test").rglob("*.png"))
    return files, torch.stack([torch.from_numpy(read_image(f)).permute(2, 0, 1).float() for f in files])


def assert_ranks_like_f32(name: str, model: Any, int8: np.ndarray, images: torch.Tensor) -> None:
    """INT8 scores vary, and rank the images like the eager f32 model (Spearman >= MIN_SPEARMAN)."""
    with torch.no_grad():
        f32 = model(images).pred_score.reshape(-1).numpy()
    assert np.isfinite(int8).all()
    assert np.ptp(f32) > 1e-3, "the f32 model itself gives one score: the comparison would be empty"
    assert np.ptp(int8) > 1e-3, f"{name} INT8 gives the same score to every image: {int8}"
    rho = _spearman(f32, int8)
    assert rho >= MIN_SPEARMAN, (
        f"{name} INT8 ranks the test images unlike f32 (Spearman {rho:.3f}): {f32} vs {int8}"
    )


@pytest.mark.parametrize(
    "name",
    [
        "urd",
        "d24fad",
        pytest.param("dhkd", marks=pytest.mark.heavy),  # minutes on 2 cores: `.ci/run` runs `-m heavy`
        pytest.param("pdd", marks=pytest.mark.heavy),
    ],
)
def test_int8_ptq_export_ranks_like_f32(name: str, tasks_root: Path, tmp_path: Path) -> None:
    model, datamodule = trained_tiny_model(name, tasks_root, tmp_path)
    xml = model.to_openvino(
        tmp_path / "int8",
        input_size=(SIZE, SIZE),
        compression_type=CompressionType.INT8_PTQ,
        datamodule=datamodule,
    )
    inferencer = f32_openvino_inferencer(xml)
    files, images = tiny_test_images(tasks_root)
    int8 = np.array([float(inferencer.predict(f).pred_score.reshape(-1)[0]) for f in files])
    assert_ranks_like_f32(name, model, int8, images)


def test_recipe_patterns_select_modules_by_path_and_class(tmp_path: Path) -> None:
    """Float ops are found by the module that ran them (path or class), own ops only for a bare path."""
    import openvino as ov

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.amax(x * x, dim=1)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.head = Head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # as the models' frozen teachers: must not blur the scopes
                y = self.body(x)
            return self.head(y - 1.0)

    path = tmp_path / "net.onnx"
    with torch.no_grad():
        torch.onnx.export(Net().eval(), (torch.rand(2, 4),), str(path), dynamo=True)
    scopes = onnx_module_scopes(path)
    model = ov.convert_model(str(path))
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ops()}

    head = {types[n] for n in float_op_names(model, scopes, ["head"])}
    assert "ReduceMax" in head
    assert "MatMul" not in head
    by_class = {types[n] for n in float_op_names(model, scopes, ["Head"])}
    assert by_class == head
    own = {types[n] for n in float_op_names(model, scopes, [""])}  # the top module's own ops: the subtract
    assert "MatMul" not in own
    assert "ReduceMax" not in own
    body = {types[n] for n in float_op_names(model, scopes, ["body"])}
    assert "MatMul" in body
    assert "ReduceMax" not in body


def test_recipe_options_reach_nncf() -> None:
    import nncf

    options = QuantizationRecipe(("post_processor",), model_type="transformer", preset="mixed").nncf_options()
    assert options == {"model_type": nncf.ModelType.TRANSFORMER, "preset": nncf.QuantizationPreset.MIXED}
    assert QuantizationRecipe().nncf_options() == {}
    tuned = QuantizationRecipe(fast_bias_correction=False, smooth_quant_alpha=0.5)
    options = tuned.nncf_options()
    assert options["fast_bias_correction"] is False
    assert options["advanced_parameters"].smooth_quant_alphas.matmul == 0.5
    # quantize_with_accuracy_control names the same argument differently
    assert set(tuned.nncf_options("advanced_quantization_parameters")) == {
        "fast_bias_correction",
        "advanced_quantization_parameters",
    }
