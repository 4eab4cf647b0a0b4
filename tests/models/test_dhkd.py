"""DHKD: stage shapes and parameter counts at 256x256, teacher weight layouts, losses, training, checkpoint
round trip of the statistics buffers, OpenVINO export parity. Random weights only; nothing is downloaded.

The Mamba decoder makes DHKD slow on CPU, so everything except the 256x256 shape test runs the reduced
``image_size=64`` student (same code path; the global bottleneck kernel is 4 instead of 16).
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from torch.utils.data import ConcatDataset, DataLoader

from anomalib_kd.components.backbones import MissingWeightsError
from anomalib_kd.data import Textures
from anomalib_kd.models.dhkd import DHKD, DHKDLoss, DHKDModel
from anomalib_kd.models.dhkd import teacher as teacher_module
from anomalib_kd.models.dhkd.blocks import SCMM
from anomalib_kd.models.dhkd.teacher import build_teacher

from ..conftest import TINY_TEXTURES, tiny_textures
from ..helpers import train_export_and_check

SMALL = 64

# Spec part 1.4 / 1.3 (official code, counted with the inferred same-resolution PatchExpand), in millions.
SPEC_PARAMS = {
    "encoder": 4.55,
    "fccm": 5.31,
    "structural": 5.61 + 0.30,
    "logical": 8.28 + 3.10,
    "student": 27.14,
    "teacher": 8.03,
}
PAPER_TOTAL = 33.0  # the paper's reported model size (M); see test_stage_shapes_and_parameter_counts_at_256


def _count(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_stage_shapes_and_parameter_counts_at_256() -> None:
    """Every stage of spec 1.4.5 at 256x256 (forward hooks on one eval pass) and the spec's counts."""
    torch.manual_seed(0)
    model = DHKDModel().eval()
    student = model.student
    logical = student.logical
    probes = {
        "teacher": model.teacher,
        "encoder": student.encoder,
        "fccm_conv": student.fccm[0],
        "fccm": student.fccm,
        "lnet_conv1": student.structural.conv1,
        "lnet_ccm": student.structural.ccm,
        "lnet": student.structural,
        "gnet_bottleneck": logical.bottleneck,
        "gnet_widen": logical.widen,
        **{f"hstm{i + 1}": block for i, block in enumerate(logical.hstm)},
        "gnet_256": logical.head[0],
        "gnet_512": logical.head[3],
        "gnet_384": logical.head[4],
        "gnet": logical,
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in probes.items():
        module.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    with torch.no_grad():
        out = model(torch.rand(1, 3, 256, 256))
    expected = {
        "teacher": (1, 384, 64, 64),
        "encoder": (1, 384, 64, 64),
        "fccm_conv": (1, 384, 32, 32),
        "fccm": (1, 384, 16, 16),
        "lnet_conv1": (1, 384, 32, 32),
        "lnet_ccm": (1, 384, 64, 64),
        "lnet": (1, 384, 64, 64),
        "gnet_bottleneck": (1, 64, 1, 1),
        "gnet_widen": (1, 128, 1, 1),
        "hstm1": (1, 128, 4, 4),
        "hstm2": (1, 128, 8, 8),
        "hstm3": (1, 128, 32, 32),
        "hstm4": (1, 128, 64, 64),
        "gnet_256": (1, 256, 64, 64),
        "gnet_512": (1, 512, 64, 64),
        "gnet_384": (1, 384, 64, 64),
        "gnet": (1, 384, 64, 64),
    }
    assert shapes == expected
    assert out.anomaly_map.shape == (1, 1, 256, 256)
    assert out.pred_score.shape == (1, 1)

    counts = {
        "encoder": _count(student.encoder),
        "fccm": _count(student.fccm),
        "structural": _count(student.structural),
        "logical": _count(logical),
        "student": _count(student),
        "teacher": _count(model.teacher),
    }
    total = counts["student"] + counts["teacher"]
    print(
        "DHKD parameters (M): "
        + ", ".join(f"{k} {v:.2f} (spec {SPEC_PARAMS[k]:.2f})" for k, v in counts.items())
        + f"; student + teacher {total:.2f} vs paper {PAPER_TOTAL:.0f}"
    )
    for name, value in counts.items():
        assert abs(value - SPEC_PARAMS[name]) < 0.015, (name, value)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_scmm_modulates_its_input() -> None:
    """SCMM output is ReLU(fuse) * x: zero where the input is zero, whatever the fuse conv gives."""
    torch.manual_seed(0)
    scmm = SCMM(8)
    x = torch.randn(2, 8, 8, 8)
    x[:, :, :4] = 0
    out = scmm(x)
    assert out.shape == x.shape
    assert torch.all(out[:, :, :4] == 0)
    assert out[:, :, 4:].abs().sum() > 0


def test_loss_weights_are_one_one_two() -> None:
    teacher = torch.zeros(1, 2, 2, 2)
    f_s, f_g, f_l = (
        torch.full_like(teacher, 3.0),
        torch.full_like(teacher, 1.0),
        torch.full_like(teacher, 2.0),
    )
    losses = DHKDLoss()(teacher, f_s, f_g, f_l)
    assert losses["loss_local"] == 4.0  # (0 - 2)^2
    assert losses["loss_global"] == 1.0  # (0 - 1)^2
    assert losses["loss_distill"] == 4.0  # (1 - 3)^2
    assert losses["loss"] == 4.0 + 1.0 + 2 * 4.0
    assert DHKDLoss((1.0, 0.0, 0.0))(teacher, f_s, f_g, f_l)["loss"] == 4.0


def _pdn_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_teacher().state_dict()


def test_teacher_weight_layouts_load(tmp_path: Path) -> None:
    """anomalib layout, EfficientAD nn.Sequential layout and a nested anomalib EfficientAd checkpoint."""
    state = _pdn_state(1)
    sequential = {
        f"{index}.{kind}": state[f"conv{i + 1}.{kind}"]
        for i, index in enumerate((0, 3, 6, 8, 10, 12))
        for kind in ("weight", "bias")
    }
    lightning_ckpt = {
        "epoch": 3,
        "state_dict": {
            **{f"model.teacher.{k}": v for k, v in state.items()},
            "model.student.conv1.weight": state["conv1.weight"],
        },
    }
    files = {
        "pretrained_teacher_medium.pth": state,
        "teacher_medium_final_state.pth": sequential,
        "efficient_ad.ckpt": lightning_ckpt,
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        model = DHKDModel(image_size=SMALL)
        assert model.load_teacher(str(tmp_path / name)) == tmp_path / name
        assert bool(model.pretrained_loaded)
        loaded = model.teacher.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state), name

    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match=r"conv1\.\.conv6"):
        DHKDModel(image_size=SMALL).load_teacher(str(tmp_path / "wrong.pth"))


def test_missing_teacher_file_names_it_and_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(teacher_module, "anomalib_teacher_dir", lambda: tmp_path / "no_cache")
    model = DHKDModel(image_size=SMALL)
    with pytest.raises(MissingWeightsError) as error:
        model.load_teacher("/nonexistent/pretrained_teacher_medium.pth")
    message = str(error.value)
    for needle in (
        "/nonexistent/pretrained_teacher_medium.pth",
        "weights_path",
        "distill_pdn",
        "pre_trained",
    ):
        assert needle in message
    with pytest.raises(MissingWeightsError) as error:
        model.load_teacher(None)
    message = str(error.value)
    for needle in ("pretrained_teacher_medium.pth", "ANOMALIB_KD_WEIGHTS", "distill_pdn", "pre_trained"):
        assert needle in message
    # The environment directory is searched.
    torch.save(_pdn_state(2), tmp_path / "teacher_medium.pth")
    monkeypatch.setenv("ANOMALIB_KD_WEIGHTS", str(tmp_path))
    assert model.load_teacher(None) == tmp_path / "teacher_medium.pth"


def test_loss_decreases_on_tiny_data(tiny_textures_root: Path) -> None:
    """Adam steps with the model's own settings (lr 1e-4) on tiny data: the loss falls at every step."""
    lightning.seed_everything(0)
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    images = next(iter(datamodule.train_dataloader())).image[:2]
    module = DHKD(pre_trained=False, image_size=SMALL)
    module.model.set_teacher_stats(*module.teacher_channel_mean_std([type("B", (), {"image": images})()]))
    module.model.train()
    optimizer = torch.optim.Adam(
        module.model.student.parameters(), lr=module.lr, weight_decay=module.weight_decay
    )
    losses = []
    for _ in range(5):
        loss = module.loss(*module.model(images))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 5e-3, losses


def test_nan_loss_stops_with_a_clear_error(tiny_textures_root: Path) -> None:
    module = DHKD(pre_trained=False, image_size=SMALL)
    with torch.no_grad():
        module.model.student.encoder[0].weight.fill_(float("nan"))
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    module.model.train()
    with pytest.raises(FloatingPointError, match="DHKD loss became nan"):
        module.training_step(batch)


def _textures(root: Path, **overrides: object) -> Textures:
    """The tiny Textures data at DHKD's batch size 1: 8 training images (1 held out), 6 test images."""
    return Textures(root=root, **{**TINY_TEXTURES, "train_batch_size": 1, **overrides})


def _fit(root: Path, data_root: Path, seed: int = 0, **trainer_args: object) -> tuple[Engine, DHKD, Textures]:
    lightning.seed_everything(seed)
    model = DHKD(pre_trained=False, image_size=SMALL)
    datamodule = _textures(data_root)
    engine = Engine(default_root_dir=root, enable_progress_bar=False, **trainer_args)
    engine.fit(model, datamodule=datamodule)
    return engine, model, datamodule


@pytest.fixture(scope="module")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_textures_root: Path
) -> tuple[Engine, DHKD, Textures]:
    """One short Engine fit: 2 steps of a 7-step epoch, so no validation runs (``max_steps`` < one epoch)."""
    return _fit(tmp_path_factory.mktemp("dhkd_run"), tiny_textures_root, max_steps=2)


def test_fit_sets_statistics_and_checkpoint_round_trip_keeps_them(
    trained_run: tuple[Engine, DHKD, Textures],
) -> None:
    engine, model, _ = trained_run
    assert engine.trainer.global_step == 2
    assert bool(model.model.teacher_stats_set)
    assert bool(model.model.quantiles_set)
    qa_l, qb_l, qa_g, qb_g = model.model.quantiles.tolist()
    assert qa_l < qb_l
    assert qa_g < qb_g
    assert not torch.allclose(model.model.teacher_std, torch.ones_like(model.model.teacher_std))
    # The paper's StepLR at 76 % of the steps (76 000 of 100 000), scaled to max_steps.
    assert engine.trainer.lr_scheduler_configs[0].scheduler.step_size == max(1, int(0.76 * 2))

    ckpt = engine.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file()
    restored = DHKD.load_from_checkpoint(ckpt)  # anomalib 2.7: weights_only=True
    assert restored.hparams.image_size == SMALL
    for name in ("teacher_mean", "teacher_std", "teacher_stats_set", "quantiles", "quantiles_set"):
        assert torch.equal(getattr(model.model, name).cpu(), getattr(restored.model, name)), name
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    # No validation ran, so the post-processor's thresholds are NaN on both sides.
    assert not [
        k
        for k in state
        if not torch.allclose(
            state[k].cpu().double(), restored_state[k].double(), rtol=0, atol=0, equal_nan=True
        )
    ]
    images = torch.rand(2, 3, SMALL, SMALL)
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(model(images).anomaly_map, restored(images).anomaly_map)


def test_max_steps_within_the_first_epoch_fits_quantiles_on_the_final_weights(
    trained_run: tuple[Engine, DHKD, Textures],
) -> None:
    """No validation ran (2 of 7 steps): the quantiles still come from the held-out images and the final
    weights, and they are in the saved checkpoint."""
    engine, model, _ = trained_run
    assert model.quantile_data is not None
    expected = model.map_norm_quantiles(
        DataLoader(model.quantile_data, collate_fn=model.quantile_data.collate_fn)
    )
    assert torch.allclose(model.model.quantiles.cpu(), torch.stack(expected).cpu())
    restored = DHKD.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path)
    assert torch.equal(restored.model.quantiles, model.model.quantiles.cpu())


def test_held_out_quantile_images_are_disjoint_from_training(
    trained_run: tuple[Engine, DHKD, Textures],
) -> None:
    """A seeded 10 % of the 8 training images (1) is held out; the other 7 are the training set."""
    _, model, datamodule = trained_run
    held = set(model.quantile_data.samples.image_path)
    train = set(datamodule.train_data.samples.image_path)
    assert len(held) == 1
    assert len(train) == 7
    assert not held & train
    assert all("/train/" in path for path in held)
    assert len(datamodule.train_dataloader()) == 7  # the trainer's loader no longer holds it
    # The teacher channel statistics come from the 7 training images only.
    train_only = model.teacher_channel_mean_std(
        DataLoader(datamodule.train_data, batch_size=4, collate_fn=datamodule.train_data.collate_fn)
    )
    everything = ConcatDataset([datamodule.train_data, model.quantile_data])
    with_held_out = model.teacher_channel_mean_std(
        DataLoader(everything, batch_size=4, collate_fn=datamodule.train_data.collate_fn)
    )
    stored = (model.model.teacher_mean.flatten().cpu(), model.model.teacher_std.flatten().cpu())
    assert all(
        torch.allclose(a.cpu(), b, rtol=1e-5, atol=1e-6) for a, b in zip(train_only, stored, strict=True)
    )
    assert not torch.allclose(with_held_out[0].cpu(), stored[0], rtol=1e-5, atol=1e-6)


def test_quantiles_never_see_test_images(tmp_path: Path, tiny_textures_root: Path) -> None:
    """Two fits with the same seed and training images (one epoch, so validation runs on the test images),
    the second with every test image replaced by noise: identical quantiles."""
    from PIL import Image

    noisy_root = tmp_path / "noisy"
    shutil.copytree(tiny_textures_root, noisy_root)
    rng = np.random.default_rng(0)
    test_images = sorted(p for p in noisy_root.rglob("*.png") if "/test/" in str(p))
    assert test_images
    for path in test_images:
        Image.fromarray(rng.integers(0, 256, (SMALL, SMALL, 3), dtype=np.uint8)).save(path)
    quantiles = []
    for name, root in (("clean", tiny_textures_root), ("noisy", noisy_root)):
        engine, model, _ = _fit(tmp_path / name, root, max_epochs=1, limit_train_batches=1)
        assert engine.trainer.global_step == 1
        quantiles.append(model.model.quantiles.cpu())
    assert bool(model.model.quantiles_set)
    assert torch.equal(quantiles[0], quantiles[1]), quantiles


def test_train_batch_size_other_than_one_is_refused(tmp_path: Path, tiny_textures_root: Path) -> None:
    model = DHKD(pre_trained=False, image_size=SMALL)
    engine = Engine(default_root_dir=tmp_path, enable_progress_bar=False, max_steps=1)
    with pytest.raises(ValueError, match="train_batch_size for DHKD should be 1"):
        engine.fit(model, datamodule=_textures(tiny_textures_root, train_batch_size=4))


def test_quantile_source_options(tmp_path: Path, tiny_textures_root: Path) -> None:
    """'val' is refused when validation images are test images; a folder of normals is used as given."""
    engine = Engine(default_root_dir=tmp_path / "val", enable_progress_bar=False, max_steps=1)
    with pytest.raises(ValueError, match="its validation images are test images"):
        engine.fit(
            DHKD(pre_trained=False, image_size=SMALL, quantile_source="val"),
            datamodule=_textures(tiny_textures_root),
        )
    with pytest.raises(ValueError, match="not a folder"):
        DHKD(pre_trained=False, image_size=SMALL, quantile_source=str(tmp_path / "none")).setup("fit")
    with pytest.raises(ValueError, match="quantile_holdout"):
        DHKD(pre_trained=False, image_size=SMALL, quantile_holdout=0.0)
    folder = next(tiny_textures_root.rglob("train")).parent / "train"
    model = DHKD(pre_trained=False, image_size=SMALL, quantile_source=str(folder))
    datamodule = _textures(tiny_textures_root)
    Engine(default_root_dir=tmp_path / "dir", enable_progress_bar=False, max_steps=1).fit(
        model, datamodule=datamodule
    )
    assert len(datamodule.train_data) == 8  # nothing held out
    assert len(model.quantile_data) == 8
    expected = model.map_norm_quantiles(
        DataLoader(model.quantile_data, collate_fn=model.quantile_data.collate_fn)
    )
    assert torch.allclose(model.model.quantiles.cpu(), torch.stack(expected).cpu())


def test_openvino_export_matches_eager(tmp_path: Path) -> None:
    """Raw DHKD outputs (no post-processing, so nothing saturates) with statistics baked in, f32."""
    import openvino as ov

    torch.manual_seed(0)
    model = DHKD(pre_trained=False, image_size=SMALL, post_processor=False).eval()
    model.model.set_teacher_stats(torch.rand(384) * 0.1, 0.5 + torch.rand(384))
    calibration = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        map_l, map_g = model.model.raw_maps(calibration)
    model.model.set_quantiles(
        map_l.quantile(0.9), map_l.quantile(0.995), map_g.quantile(0.9), map_g.quantile(0.995)
    )
    xml = model.to_openvino(export_root=tmp_path, input_size=(SMALL, SMALL))
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(2, 3, SMALL, SMALL)
    with torch.no_grad():
        eager = model(images)
    outputs = {port.get_any_name(): value for port, value in compiled(images.numpy()).items()}
    assert eager.anomaly_map.std() > 1e-3  # a meaningful comparison
    assert np.abs(outputs["pred_score"].reshape(-1) - eager.pred_score.numpy().reshape(-1)).max() < 1e-3
    assert np.abs(outputs["anomaly_map"] - eager.anomaly_map.numpy()).max() < 1e-3
    # The quantiles are constants of the graph: changing the buffers afterwards changes eager only.
    model.model.set_quantiles(*torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with torch.no_grad():
        assert not torch.allclose(model(images).anomaly_map, eager.anomaly_map)


@pytest.mark.slow
@pytest.mark.heavy  # over a minute on 2 cores: `.ci/run` runs it after the README's test command
def test_stock_cli_train_export_and_openvino_inferencer(tiny_textures_root: Path, tmp_path: Path) -> None:
    """`anomalib train` + `anomalib export` (stock command), then OpenVINOInferencer parity (f32)."""
    data_args = [
        "--data", "anomalib_kd.data.Textures", f"--data.root={tiny_textures_root}",
        *[f"--data.{k}={v}" for k, v in TINY_TEXTURES.items() if k != "defect_types"],
        "--data.defect_types=[scratch, blob]", "--data.train_batch_size=1", "--trainer.max_epochs=1",
    ]  # fmt: skip
    model_args = ["--model.pre_trained=false", "--model.image_size=64"]
    image_path = next(tiny_textures_root.rglob("test/blob/*.png"))
    ckpt = train_export_and_check(DHKD, model_args, data_args, tmp_path, (64, 64), image_path)
    restored = DHKD.load_from_checkpoint(ckpt)
    assert bool(restored.model.teacher_stats_set)
