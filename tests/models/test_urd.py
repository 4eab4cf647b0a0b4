"""URD: shapes at the paper's 256x256, GII switches, training, export parity, checkpoints, weights errors."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning
import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD, Visa
from anomalib.engine import Engine

from anomalib_kd import URD
from anomalib_kd.components.backbones import MissingWeightsError
from anomalib_kd.components.synthesis import ForegroundMasker
from anomalib_kd.models.urd.loss import (
    StudentDenoisingLoss,
    TeacherSensitivityLoss,
    global_cosine_distance,
    mask_pyramid,
)
from anomalib_kd.models.urd.torch_model import URDModel

from ..conftest import TINY_TEXTURES, tiny_textures
from ..helpers import console_script, fit_recording_losses, run_cli, train_export_and_check

FAST_BACKBONE = "resnet18"  # same code path as WRN50-2, ~10x cheaper: used where shapes are not the point


@pytest.fixture(scope="module")
def wrn50_model() -> URDModel:
    torch.manual_seed(0)
    return URDModel(backbone="wide_resnet50_2.tv_in1k")


def test_shapes_at_256_match_the_spec(wrn50_model: URDModel) -> None:
    """Spec part 2.2: teacher [256x64, 512x32, 1024x16], bottleneck 2048x8x8, student like the teacher."""
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        teacher = wrn50_model.teacher_features(images)
        bottleneck = wrn50_model.student.bottleneck(teacher)
        student = wrn50_model.student(teacher)
    expected = [(1, 256, 64, 64), (1, 512, 32, 32), (1, 1024, 16, 16)]
    assert [tuple(f.shape) for f in teacher] == expected
    assert tuple(bottleneck.shape) == (1, 2048, 8, 8)
    assert [tuple(f.shape) for f in student] == expected
    # Official student: 140.0 M parameters (bottleneck + decoder + skip/GII modules).
    n_student = sum(p.numel() for p in wrn50_model.student.parameters())
    assert abs(n_student / 1e6 - 140.0) < 0.1


def test_eval_forward_returns_map_and_score(wrn50_model: URDModel) -> None:
    wrn50_model.eval()
    with torch.no_grad():
        out = wrn50_model(torch.rand(2, 3, 256, 256))
    assert out.anomaly_map.shape == (2, 1, 256, 256)
    assert torch.allclose(out.pred_score.flatten(), out.anomaly_map.amax(dim=(-2, -1)).flatten())


def test_expert_and_teacher_start_identical_and_only_teacher_trains() -> None:
    model = URDModel(backbone=FAST_BACKBONE)
    expert, teacher = model.expert.state_dict(), model.teacher.state_dict()
    assert expert.keys() == teacher.keys()
    assert all(torch.equal(expert[k], teacher[k]) for k in expert)
    assert not any(p.requires_grad for p in model.expert.parameters())
    assert all(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize(("injection", "similarity_attention"), [(True, True), (True, False), (False, False)])
def test_gii_switches(injection: bool, similarity_attention: bool) -> None:
    """GII on: similarity-attention convs get gradient; off (official scripts): they do not exist."""
    torch.manual_seed(0)
    model = URDModel(backbone=FAST_BACKBONE, injection=injection, similarity_attention=similarity_attention)
    teacher = model.teacher_features(torch.rand(2, 3, 64, 64))
    student = model.student([f.detach() for f in teacher])
    sum(s.mean() for s in student).backward()
    injections = model.student.injections
    if not injection:
        assert injections is None
        return
    for gii in injections:
        assert (gii.similarity_attention is not None) == similarity_attention
        assert gii.fuse_skip[0].weight.grad is not None
        if similarity_attention:
            assert gii.similarity_attention[0].weight.grad.abs().sum() > 0


def test_gii_changes_the_output() -> None:
    """Same weights, GII toggled: similarity attention on vs off, and injection on vs off, change the
    student's features and the anomaly map (a GII that did nothing would leave them equal)."""
    torch.manual_seed(0)
    with_gii = URDModel(backbone=FAST_BACKBONE, similarity_attention=True).eval()
    without_attention = copy.deepcopy(with_gii)
    for gii in without_attention.student.injections:
        gii.similarity_attention = None  # the official scripts' wo-GII path, all other weights shared
    without_injection = copy.deepcopy(with_gii)
    without_injection.student.injections = None  # plain RD4AD decoder, same bottleneck/decoder weights
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = with_gii.teacher_features(images)
        reference = with_gii.student(features)
        for variant in (without_attention, without_injection):
            student = variant.student(features)
            # D3 comes before any injection: identical weights give identical values ...
            torch.testing.assert_close(student[2], reference[2], rtol=0, atol=0)
            # ... and GII enters at D2 and D1.
            for level in (0, 1):
                assert (student[level] - reference[level]).abs().max() > 1e-3 * reference[level].abs().max()
            assert not torch.allclose(variant(images).anomaly_map, with_gii(images).anomaly_map, atol=1e-5)


def test_mask_pyramid_is_cascaded_and_binary() -> None:
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 100:140, 60:90] = 1
    levels = mask_pyramid(mask, [(64, 64), (32, 32), (16, 16)])
    assert [tuple(m.shape[-2:]) for m in levels] == [(64, 64), (32, 32), (16, 16)]
    for level in levels:
        assert set(level.unique().tolist()) <= {0.0, 1.0}
        assert level.sum() > 0


def pixel_features(*pixels: tuple[float, float]) -> torch.Tensor:
    """A (1, 2, 2, 2) feature map from four 2-channel pixel vectors in row-major order."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 2, 2)


def test_global_cosine_distance_by_hand() -> None:
    """g(a, b) = mean over the batch of 1 - cos(vec a, vec b), each sample flattened over C, H, W."""
    a = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[1.0, 1.0]], [[0.0, 0.0]]]])  # (2, 2, 1, 2)
    b = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]], [[[1.0, 0.0]], [[0.0, 0.0]]]])
    # sample 0: orthogonal -> 1; sample 1: 45 degrees -> 1 - 1/sqrt(2)
    expected = (1 + (1 - 1 / math.sqrt(2))) / 2
    assert global_cosine_distance(a, b).item() == pytest.approx(expected, abs=1e-6)


def test_teacher_loss_by_hand() -> None:
    """L_T on two identical 2x2 levels: pixel term + masked L1 against E(x) + global term against E(x~)."""
    east, north, diagonal, west = (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (-1.0, 0.0)
    teacher_normal = pixel_features(east, north, diagonal, west)
    teacher_anomalous = pixel_features(north, east, north, east)
    expert_normal = pixel_features(east, east, east, east)
    expert_anomalous = pixel_features(north, north, north, east)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # 1 - cos(T(x), E(x)) per pixel: 0, 1, 1 - 1/sqrt(2), 2
    normal_term = (0 + 1 + (1 - 1 / math.sqrt(2)) + 2) / 4
    # 1 - cos(T(x~), E(x)) per pixel: 1, 0, 1, 0; minus the mask 1, 0, 0, 0 -> |.| = 0, 0, 1, 0
    masked_term = 1 / 4
    # vec T(x~) = [0,1,0,1 | 1,0,1,0], vec E(x~) = [0,0,0,1 | 1,1,1,0]: cos = 3 / (2 * 2)
    global_term = 1 - 3 / 4
    level = normal_term + masked_term + global_term
    loss = TeacherSensitivityLoss()(
        [teacher_normal] * 2, [teacher_anomalous] * 2, [expert_normal] * 2, [expert_anomalous] * 2, mask
    )
    assert loss.item() == pytest.approx(2 * level, abs=1e-6)  # summed over levels, not averaged


def test_student_loss_by_hand() -> None:
    """L_S = sum over levels of g(S(x), T(x)) + g(S(x~), T(x)) + g(S(x), E(x)) + g(S(x~), E(x))."""

    def batch(*vectors: tuple[float, float]) -> torch.Tensor:
        return torch.tensor(vectors, dtype=torch.float32).view(len(vectors), 2, 1, 1)

    teacher_normal = batch((1, 0), (1, 0))
    expert_normal = batch((0, 1), (1, 0))
    student_normal = batch((1, 0), (-1, 0))
    student_anomalous = batch((1, 1), (0, 1))
    # sample 0: g(S(x),T)=0, g(S(x~),T)=1-1/sqrt2, g(S(x),E)=1, g(S(x~),E)=1-1/sqrt2
    # sample 1: 2, 1, 2, 1
    per_sample = [0 + 2 * (1 - 1 / math.sqrt(2)) + 1, 2 + 1 + 2 + 1]
    level = sum(per_sample) / 2  # each g is a batch mean
    loss = StudentDenoisingLoss()(
        [student_normal] * 3, [student_anomalous] * 3, [teacher_normal] * 3, [expert_normal] * 3
    )
    assert loss.item() == pytest.approx(3 * level, abs=1e-6)


def test_frozen_expert_stays_frozen_while_training(tiny_textures_root: Path) -> None:
    """A training iteration: the expert's weights and BatchNorm running statistics are unchanged
    (it runs in eval mode under no_grad), while the teacher's do change."""
    lightning.seed_everything(0)
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    # iterations "auto" (5000, capped by max_steps); GrabCut foreground masks exercised in a real step
    model = URD(backbone=FAST_BACKBONE, pre_trained=False, foreground_mask="grabcut")
    expert = {k: v.clone() for k, v in model.model.expert.state_dict().items()}
    teacher = {k: v.clone() for k, v in model.model.teacher.state_dict().items()}
    assert any("running_mean" in k for k in expert)
    synthesized = []
    synthesize = model.synthesizer.forward

    def recording_synthesis(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        augmented, masks = synthesize(images)
        synthesized.append((images, masks))
        return augmented, masks

    model.synthesizer.forward = recording_synthesis
    fit_recording_losses(model, datamodule.train_dataloader(), max_steps=2)
    assert synthesized
    for images, masks in synthesized:  # the training step's anomalies stay on the GrabCut foreground
        assert not (masks * (1 - ForegroundMasker("grabcut")(images))).any()
    assert model.iteration_budget == 5000  # "auto" resolved when training started
    assert model.synthesizer.foreground == "grabcut"  # an explicit choice is kept
    after = model.model.expert.state_dict()
    changed = [k for k in expert if not torch.equal(expert[k], after[k].cpu())]
    assert not changed, changed[:5]
    teacher_after = model.model.teacher.state_dict()
    assert not torch.equal(
        teacher["feature_extractor.bn1.running_mean"], teacher_after["feature_extractor.bn1.running_mean"]
    )
    assert not torch.equal(
        teacher["feature_extractor.conv1.weight"], teacher_after["feature_extractor.conv1.weight"]
    )


def attach_data(model: URD, datamodule: object) -> None:
    """Give ``model`` a stand-in trainer that only knows its datamodule (what the settings look at)."""
    model._trainer = SimpleNamespace(datamodule=datamodule)


@pytest.mark.parametrize(
    ("datamodule", "foreground", "iterations"),
    [
        (MVTecAD(category="bottle"), "grabcut", 5000),
        (MVTecAD(category="cable"), "grabcut", 10_000),
        (MVTecAD(category="capsule"), "otsu_inverted", 5000),
        (MVTecAD(category="screw"), "otsu_inverted", 5000),
        (MVTecAD(category="transistor"), None, 10_000),
        (MVTecAD(category="carpet"), None, 5000),
        (Visa(category="pcb1"), "grabcut", 10_000),
        (None, None, 5000),
    ],
)
def test_auto_settings_follow_the_official_code(
    datamodule: object, foreground: str | None, iterations: int, tiny_textures_root: Path
) -> None:
    """Spec 2.4/2.5: GrabCut / inverted-Otsu masks per object category, 10000 iterations where official."""
    model = URD(backbone=FAST_BACKBONE, pre_trained=False)
    attach_data(model, datamodule if datamodule is not None else tiny_textures(tiny_textures_root))
    model.resolve_official_settings()
    assert model.synthesizer.foreground == foreground
    assert model.iteration_budget == iterations


def test_explicit_settings_override_auto() -> None:
    model = URD(backbone=FAST_BACKBONE, pre_trained=False, foreground_mask=None, iterations=7)
    attach_data(model, MVTecAD(category="capsule"))
    model.resolve_official_settings()
    assert model.synthesizer.foreground is None
    assert model.iteration_budget == 7
    own = URD(backbone=FAST_BACKBONE, pre_trained=False, foreground_mask="grabcut")
    attach_data(own, None)
    own.resolve_official_settings()
    assert own.synthesizer.foreground == "grabcut"  # a user's own object data
    with pytest.raises(ValueError, match="foreground_mask='otsu'"):
        URD(backbone=FAST_BACKBONE, pre_trained=False, foreground_mask="otsu")
    with pytest.raises(ValueError, match="iterations='many'"):
        URD(backbone=FAST_BACKBONE, pre_trained=False, iterations="many")


def test_loss_decreases_on_tiny_data(tiny_textures_root: Path) -> None:
    lightning.seed_everything(0)
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    model = URD(backbone=FAST_BACKBONE, pre_trained=False, iterations=8)
    losses, _ = fit_recording_losses(model, datamodule.train_dataloader(), max_steps=2 * 8)
    assert len(losses) == 8  # two optimizer steps per iteration: max_steps = 2 * iterations
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])


def test_nan_loss_stops_with_a_clear_error(tiny_textures_root: Path) -> None:
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    model = URD(backbone=FAST_BACKBONE, pre_trained=False, iterations=1)
    with torch.no_grad():
        next(model.model.teacher.parameters()).fill_(float("nan"))
    trainer = lightning.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(FloatingPointError, match="teacher loss became nan"):
        trainer.fit(model, train_dataloaders=datamodule.train_dataloader())


def test_missing_weights_error_names_file_and_three_ways() -> None:
    model = URDModel(backbone=FAST_BACKBONE)
    with pytest.raises(MissingWeightsError) as error:
        model.load_pretrained()
    message = str(error.value)
    assert "resnet18" in message
    assert "ANOMALIB_KD_WEIGHTS" in message
    assert "weights_path" in message
    assert "timm" in message
    with pytest.raises(MissingWeightsError, match="not found"):
        model.load_pretrained("/nonexistent/resnet18.pth")


def test_weights_load_from_env_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision-layout file (with classifier keys) in $ANOMALIB_KD_WEIGHTS loads into both networks."""
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    monkeypatch.setenv("ANOMALIB_KD_WEIGHTS", str(tmp_path))
    model = URDModel(backbone=FAST_BACKBONE)
    assert model.load_pretrained() == tmp_path / "resnet18.pth"
    assert torch.equal(model.expert.feature_extractor.conv1.weight, source.conv1.weight)
    assert torch.equal(model.teacher.feature_extractor.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert bool(model.pretrained_loaded)


@pytest.fixture(scope="module")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_textures_root: Path
) -> tuple[Path, Engine, URD]:
    """One short Engine fit (train + validation: the post-processor gets its thresholds)."""
    lightning.seed_everything(0)
    root = tmp_path_factory.mktemp("urd_run")
    model = URD(backbone=FAST_BACKBONE, pre_trained=False, iterations=1)
    engine = Engine(default_root_dir=root, enable_progress_bar=False)
    engine.fit(model, datamodule=tiny_textures(tiny_textures_root))
    return root, engine, model


def test_checkpoint_round_trip(trained_run: tuple[Path, Engine, URD]) -> None:
    _, engine, model = trained_run
    ckpt = engine.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file()
    restored = URD.load_from_checkpoint(ckpt)  # anomalib 2.7: weights_only=True
    assert restored.hparams.backbone == FAST_BACKBONE
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    differing = [k for k in state if not torch.equal(state[k].cpu(), restored_state[k])]
    assert not differing, differing[:10]
    # Training ends after a validated epoch, so the thresholds baked into exports are fitted.
    assert torch.isfinite(restored.post_processor.image_threshold)
    assert torch.isfinite(restored.post_processor.pixel_max)
    images = torch.rand(1, 3, 256, 256)
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(model(images).pred_score, restored(images).pred_score)


def test_openvino_export_matches_eager(trained_run: tuple[Path, Engine, URD], tmp_path: Path) -> None:
    import openvino as ov

    _, _, model = trained_run
    model.eval()
    xml = model.to_openvino(export_root=tmp_path, input_size=(256, 256))
    onnx_files = list(tmp_path.rglob("*.onnx"))
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        eager = model(images)
    result = compiled(images.numpy())
    outputs = {port.get_any_name(): value for port, value in result.items()}
    assert np.abs(outputs["pred_score"].reshape(-1) - eager.pred_score.numpy().reshape(-1)).max() < 1e-3
    assert np.abs(outputs["anomaly_map"] - eager.anomaly_map.numpy()).max() < 1e-3
    assert not onnx_files or onnx_files[0].stat().st_size > 0


# --- The stock anomalib command (subprocess), as a user runs it -------------------------------------


@pytest.mark.slow
def test_stock_cli_train_export_and_openvino_inferencer(tiny_textures_root: Path, tmp_path: Path) -> None:
    data_args = [
        "--data", "anomalib_kd.data.Textures", f"--data.root={tiny_textures_root}",
        *[f"--data.{k}={v}" for k, v in TINY_TEXTURES.items() if k != "defect_types"],
        "--data.defect_types=[scratch, blob]",
    ]  # fmt: skip
    model_args = [f"--model.backbone={FAST_BACKBONE}", "--model.pre_trained=false", "--model.iterations=1"]
    image_path = next(tiny_textures_root.rglob("test/scratch/*.png"))
    # Eager reference: the same AnomalibModule.forward (resize to 256 -> URD -> post-processing) in PyTorch.
    ckpt = train_export_and_check(URD, model_args, data_args, tmp_path, (64, 64), image_path)
    assert ckpt.is_file()  # train_export_and_check asserts the parity itself


@pytest.mark.slow
@pytest.mark.heavy  # a whole `anomalib benchmark` job: `.ci/run` runs it after the README's test command
def test_stock_benchmark_runs_urd_and_writes_csv(tiny_textures_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "benchmark.yaml"
    init = "\n".join(f"      {k}: {v}" for k, v in TINY_TEXTURES.items() if k != "defect_types")
    config.write_text(
        f"""accelerator: cpu
benchmark:
  seed: 42
  model:
    class_path: URD
    init_args:
      backbone: {FAST_BACKBONE}
      pre_trained: false
      iterations: 1
  data:
    class_path: Textures
    init_args:
      root: {tiny_textures_root}
      defect_types: [scratch, blob]
{init}
"""
    )
    run_cli([console_script(), "benchmark", "--config", str(config)], cwd=tmp_path)
    csvs = list((tmp_path / "runs").rglob("results.csv"))
    assert csvs, "anomalib benchmark wrote no results.csv"
    text = csvs[0].read_text()
    assert "URD" in text
    assert "image_AUROC" in text


@pytest.mark.slow
def test_registration_is_what_makes_bare_names_resolve(tmp_path: Path) -> None:
    """With the automatic registration off, anomalib can't find URD; the anomalib-kd command can."""
    probe = "from anomalib.models import get_model; print(type(get_model('urd', pre_trained=False)).__name__)"
    env = {**os.environ, "ANOMALIB_KD_NO_AUTOLOAD": "1"}
    off = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
    )
    assert off.returncode != 0
    on = run_cli([sys.executable, "-c", probe], cwd=tmp_path)
    assert on.stdout.strip().endswith("URD")
    wrapped = run_cli(
        [console_script("anomalib-kd"), "train", "--model=URD", "--print_config"], cwd=tmp_path, env=env
    )
    assert "class_path: anomalib_kd.URD" in wrapped.stdout
