"""PDD: spec shapes at 256, multiples of 32, shared/separate students, losses, training, export, ckpt."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from anomalib.engine import Engine

from anomalib_kd.components.backbones import MissingWeightsError
from anomalib_kd.models.pdd import PDD, PDDLoss, PDDModel, diversity_loss

from ..conftest import TINY_TEXTURES, tiny_textures
from ..helpers import assert_varied_and_close, fit_recording_losses, train_export_and_check

# Same code paths as WRN50-2 + VMamba-Tiny, far cheaper: used where the real shapes are not the point.
FAST = {"backbone": "resnet18", "vmamba_depths": (1, 1, 1, 1), "vmamba_dims": (8, 16, 32, 64)}


def _fast_model(**kwargs: object) -> PDDModel:
    return PDDModel(**FAST, **kwargs)  # type: ignore[arg-type]


def test_shapes_and_parameters_at_256_match_the_spec() -> None:
    """Spec 1.2/1.3: WRN y0..y3, VMamba taps after merging, fused targets, 30.4 M trainable parameters."""
    torch.manual_seed(0)
    model = PDDModel().eval()  # WRN50-2 + VMamba-Tiny v0
    trainable = [sum(p.numel() for p in m.parameters()) for m in model.trainable_modules()]
    assert abs(sum(trainable) / 1e6 - 30.4) < 0.05
    adapters = [sum(p.numel() for p in a.parameters()) / 1e6 for a in model.adapters]
    assert np.allclose(adapters, [0.115, 0.460, 1.838, 5.380], atol=1e-3)
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        cnn, mamba = model.teacher_features(images)
        targets, manifold = model.fuse(cnn, mamba)
        prior1, prior2 = model.prior(manifold)
        s2, s1 = model.students(manifold, prior1, prior2)
        out = model.anomaly_map_generator([*s2, *s1], [*targets, *targets], images.shape[-2:])
    assert [tuple(f.shape[1:]) for f in cnn] == [(256, 64, 64), (512, 32, 32), (1024, 16, 16), (2048, 8, 8)]
    assert [tuple(f.shape[1:]) for f in mamba] == [(192, 32, 32), (384, 16, 16), (768, 8, 8), (768, 8, 8)]
    levels = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    assert [tuple(f.shape[1:]) for f in targets] == levels
    assert tuple(manifold.shape[1:]) == (2048, 8, 8)
    assert (tuple(prior1.shape[1:]), tuple(prior2.shape[1:])) == ((1024, 16, 16), (512, 32, 32))
    assert [tuple(f.shape[1:]) for f in s2] == levels
    assert [tuple(f.shape[1:]) for f in s1] == levels
    assert tuple(out.shape) == (1, 1, 256, 256)


@pytest.mark.parametrize("size", [256, 320])
def test_any_multiple_of_32_gives_full_size_maps(size: int) -> None:
    model = _fast_model().eval()
    sizes: list[int] = []
    hook = model.students.register_forward_hook(lambda _m, _i, out: sizes.extend(f.shape[-1] for f in out[0]))
    with torch.no_grad():
        out = model(torch.rand(1, 3, size, size))
    hook.remove()
    assert sizes == [size // 4, size // 8, size // 16]
    assert out.anomaly_map.shape == (1, 1, size, size)
    assert torch.allclose(out.pred_score.flatten(), out.anomaly_map.amax(dim=(-2, -1)).flatten())


def test_input_not_multiple_of_32_is_a_clear_error() -> None:
    model = _fast_model().eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 256, 250))


def test_score_is_both_students_against_fused_targets() -> None:
    """The map is G(sum over S2 and S1 of Up(1 - cos)): a perfect S1 still leaves S2's contribution."""
    torch.manual_seed(0)
    model = _fast_model().eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = model.features(images)
        full = model(images).anomaly_map
        gen = model.anomaly_map_generator
        only_s2 = gen(features["s2"], features["targets"], images.shape[-2:])
        only_s1 = gen(features["s1"], features["targets"], images.shape[-2:])
    assert torch.allclose(full, only_s2 + only_s1, atol=1e-5)
    assert only_s2.abs().sum() > 0
    assert only_s1.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_students_share_weights_per_option(shared: bool) -> None:
    torch.manual_seed(0)
    model = _fast_model(shared_students=shared).eval()
    with torch.no_grad():
        features = model.features(torch.rand(2, 3, 64, 64))
    coarse_equal = torch.equal(features["s2"][2], features["s1"][2])
    n_params = sum(p.numel() for p in model.students.parameters())
    single = sum(p.numel() for p in model.students.decoder.parameters())
    if shared:
        assert model.students.prior_decoder is None
        assert coarse_equal  # one decoder: stage-1 outputs are identical (spec 1.3.4)
        assert n_params == single
    else:
        assert model.students.prior_decoder is not None
        assert not coarse_equal
        assert n_params == 2 * single
        assert (
            model.students.decoder.layer1[0].conv1.weight
            is not model.students.prior_decoder.layer1[0].conv1.weight
        )
    # Priors change only S2's finer levels.
    assert not torch.allclose(features["s2"][0], features["s1"][0])


def _official_order(
    decoder: torch.nn.Module, manifold: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Spec 1.3.4, written independently: the prior student S2 through all three stages, then the plain
    student S1 through all three, stage 1 called once per student."""
    a2 = decoder.layer1(manifold)
    b2 = decoder.layer2(a2 + p1)
    c2 = decoder.layer3(b2 + p2)
    a1 = decoder.layer1(manifold)
    b1 = decoder.layer2(a1)
    c1 = decoder.layer3(b1)
    return [c2, b2, a2], [c1, b1, a1]


def _old_order(
    decoder: torch.nn.Module, manifold: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This package's earlier order: S1 first, S2 reusing S1's stage-1 output (one stage-1 call)."""
    a1 = decoder.layer1(manifold)
    b1 = decoder.layer2(a1)
    c1 = decoder.layer3(b1)
    b2 = decoder.layer2(a1 + p1)
    c2 = decoder.layer3(b2 + p2)
    return [c2, b2, a1], [c1, b1, a1]


def _running_stats_after_two_steps(
    model: PDDModel, images: torch.Tensor, students: Callable | None = None
) -> list[torch.Tensor]:
    """Two Adam steps of the PDD loss on a fixed batch; the BatchNorm running statistics of the students."""
    model.train()
    optimizer = torch.optim.Adam([p for m in model.trainable_modules() for p in m.parameters()], lr=2e-3)
    for _ in range(2):
        cnn, mamba = model.teacher_features(images)
        targets, manifold = model.fuse(cnn, mamba)
        prior1, prior2 = model.prior(manifold)
        if students is None:
            s2, s1 = model.students(manifold, prior1, prior2)
        else:
            s2, s1 = students(model.students.decoder, manifold, prior1, prior2)
        loss = PDDLoss()(targets, s2, s1)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [
        buffer.clone() for name, buffer in model.students.named_buffers() if name.endswith(("mean", "var"))
    ]


def test_shared_decoder_runs_in_the_official_order() -> None:
    """BatchNorm running statistics after two training steps equal the official order's (spec 1.3.4) and
    differ from the earlier order's; eval outputs equal too."""
    torch.manual_seed(0)
    model = _fast_model()
    reference, old = copy.deepcopy(model), copy.deepcopy(model)
    images = torch.rand(2, 3, 64, 64)
    ours = _running_stats_after_two_steps(model, images)
    official = _running_stats_after_two_steps(reference, images, _official_order)
    earlier = _running_stats_after_two_steps(old, images, _old_order)
    assert len(ours) == len(official) > 0
    for mine, theirs in zip(ours, official, strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert max((mine - then).abs().max().item() for mine, then in zip(ours, earlier, strict=True)) > 1e-4
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model(images).anomaly_map, reference(images).anomaly_map, atol=1e-5)


def _pair_with_cosine(cosine: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (1, 2, 1, 1) 'feature maps' whose flattened cosine is ``cosine``."""
    angle = math.acos(cosine)
    first = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    second = torch.tensor([math.cos(angle), math.sin(angle)]).view(1, 2, 1, 1)
    return first, second


@pytest.mark.parametrize(
    ("cosines", "expected"),
    [
        ((0.9, 0.5, 0.5), 0.15),  # shallow level too similar: 0.9 - 0.75
        ((0.5, 0.5, 0.5), 0.0),  # shallow below tau_low, deep above tau_high: no penalty
        ((0.5, 0.1, 0.5), 0.2),  # deep level too different: 0.30 - 0.1
        ((0.8, 0.0, 0.2), 0.05 + 0.3 + 0.1),
        ((0.76, 0.29, 1.0), 0.01 + 0.01),
    ],
)
def test_diversity_loss_thresholds(cosines: tuple[float, ...], expected: float) -> None:
    pairs = [_pair_with_cosine(c) for c in cosines]
    loss = diversity_loss([p[1] for p in pairs], [p[0] for p in pairs], tau_low=0.75, tau_high=0.30)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_diversity_loss_gradient_signs() -> None:
    """Descending L_div lowers the shallow cosine (diverge) and raises the deep ones (agree)."""
    pairs = [_pair_with_cosine(c) for c in (0.95, 0.1, 0.1)]
    prior = [p[1].clone().requires_grad_(True) for p in pairs]
    plain = [p[0] for p in pairs]
    diversity_loss(prior, plain).backward()
    with torch.no_grad():
        stepped = [s - 0.1 * s.grad for s in prior]
    before = [
        torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).item()
        for a, b in zip(prior, plain, strict=True)
    ]
    after = [
        torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).item()
        for a, b in zip(stepped, plain, strict=True)
    ]
    assert after[0] < before[0]
    assert after[1] > before[1]
    assert after[2] > before[2]


def test_prp_cosine_sign_paper_and_official() -> None:
    """S2 == targets: the paper's beta(1 - cos) vanishes; the official +cos gives beta per level."""
    torch.manual_seed(0)
    targets = [torch.rand(2, 4, 8, 8) + 0.1 for _ in range(3)]
    plain = [torch.rand(2, 4, 8, 8) for _ in range(3)]
    paper = PDDLoss(prp_cosine="paper")(targets, targets, plain)
    official = PDDLoss(prp_cosine="official")(targets, targets, plain)
    assert paper["prp"].item() == pytest.approx(0.0, abs=1e-6)
    assert official["prp"].item() == pytest.approx(3 * 0.05, abs=1e-5)
    assert paper["kr"].item() == pytest.approx(
        0.02 * sum(torch.mean((t - p) ** 2).item() for t, p in zip(targets, plain, strict=True)), rel=1e-5
    )
    with pytest.raises(ValueError, match="prp_cosine"):
        PDDLoss(prp_cosine="other")


def test_teachers_frozen_in_eval_and_trainable_parts_get_gradients() -> None:
    torch.manual_seed(0)
    model = _fast_model().train()
    assert not model.cnn_teacher.training
    assert not model.mamba_teacher.training
    assert model.students.training
    features = model.features(torch.rand(2, 3, 64, 64))
    loss = PDDLoss()(features["targets"], features["s2"], features["s1"])["loss"]
    loss.backward()
    assert not any(p.requires_grad for p in model.cnn_teacher.parameters())
    assert not any(p.requires_grad for p in model.mamba_teacher.parameters())
    assert all(a.main[0].weight.grad is not None for a in model.adapters)  # targets are not detached
    assert model.prior.head2.weight.grad.abs().sum() > 0


def test_missing_vmamba_weights_error_is_clear(tmp_path: Path) -> None:
    model = _fast_model()
    with pytest.raises(MissingWeightsError, match=r"vssmtiny_dp01_ckpt_epoch_292\.pth") as error:
        model.load_pretrained()
    assert "ANOMALIB_KD_WEIGHTS" in str(error.value)
    with pytest.raises(MissingWeightsError, match="not found"):
        model.load_pretrained(vmamba_weights_path=tmp_path / "nope.pth")


def test_teachers_load_from_local_files(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = _fast_model()
    vmamba_state = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.mamba_teacher.state_dict().items()
    }
    torch.save({"model": vmamba_state}, tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth")
    model.load_pretrained(tmp_path / "resnet18.pth", tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth")
    assert torch.equal(model.cnn_teacher.feature_extractor.conv1.weight, source.conv1.weight)
    assert torch.equal(model.mamba_teacher.patch_embed[0].weight, vmamba_state["patch_embed.0.weight"])
    assert bool(model.pretrained_loaded)


def _tiny_pdd(**kwargs: object) -> PDD:
    """Stand-in teachers, trained and evaluated at 64 px (the data's size; default pre-processor: 256)."""
    return PDD(pre_trained=False, pre_processor=PDD.configure_pre_processor((64, 64)), **FAST, **kwargs)  # type: ignore[arg-type]


def test_loss_decreases_on_tiny_data(tiny_textures_root: Path) -> None:
    lightning.seed_everything(0)
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    model = _tiny_pdd(lr_t_max=None)
    losses, trainer = fit_recording_losses(model, datamodule.train_dataloader(), max_steps=8)
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    # Cosine schedule over max_steps, stepped per step, floor 0.1 * lr.
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.T_max == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-4, rel=1e-6)
    assert trainer.optimizers[0].param_groups[0]["betas"] == (0.5, 0.999)


def test_default_schedule_is_the_official_periodic_cosine() -> None:
    """Default lr_t_max=40 epochs (official script): per epoch, floor 0.1 lr at 40, back at lr at 80."""
    model = _tiny_pdd()
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch"
    scheduler = config["lr_scheduler"]["scheduler"]
    optimizer = config["optimizer"]
    rates = []
    for _ in range(81):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(2e-3)
    assert rates[40] == pytest.approx(2e-4)
    assert rates[80] == pytest.approx(2e-3)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_textures_root: Path) -> tuple[Engine, PDD]:
    """One short Engine fit (train + validation: the post-processor gets its thresholds)."""
    lightning.seed_everything(0)
    root = tmp_path_factory.mktemp("pdd_run")
    model = _tiny_pdd(shared_students=False)
    engine = Engine(default_root_dir=root, enable_progress_bar=False, max_epochs=1)
    engine.fit(model, datamodule=tiny_textures(tiny_textures_root))
    return engine, model


def test_checkpoint_round_trip(trained_run: tuple[Engine, PDD]) -> None:
    engine, model = trained_run
    ckpt = engine.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file()
    restored = PDD.load_from_checkpoint(ckpt)
    assert restored.hparams.backbone == "resnet18"
    assert restored.hparams.shared_students is False
    state, restored_state = model.state_dict(), restored.state_dict()
    assert state.keys() == restored_state.keys()
    differing = [k for k in state if not torch.equal(state[k].cpu(), restored_state[k])]
    assert not differing, differing[:10]
    assert torch.isfinite(restored.post_processor.image_threshold)
    images = torch.rand(1, 3, 64, 64)
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.allclose(model(images).pred_score, restored(images).pred_score)


def test_openvino_export_matches_eager(trained_run: tuple[Engine, PDD], tmp_path: Path) -> None:
    """Export (VMamba through the pure-PyTorch scan) and OpenVINO f32 parity within 1e-3 on the raw,
    un-clamped outputs: the trained model without anomalib's post-processor (whose [0, 1] clamp lets
    noise images sit at 0 or 1 on both sides).

    The graph takes 256x256 images; its pre-processor resizes them to the 64 px the model was trained at.
    """
    import openvino as ov

    _, trained = trained_run
    model = copy.deepcopy(trained).eval()
    model.post_processor = None
    xml = model.to_openvino(export_root=tmp_path, input_size=(256, 256))
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        eager = model(images)
    outputs = {port.get_any_name(): value for port, value in compiled(images.numpy()).items()}
    assert set(outputs) == {"pred_score", "anomaly_map"}  # nothing post-processed in the graph
    assert_varied_and_close(outputs["pred_score"], eager.pred_score.numpy(), "pred_score")
    assert_varied_and_close(outputs["anomaly_map"], eager.anomaly_map.numpy(), "anomaly_map")


@pytest.mark.heavy
def test_full_size_openvino_export_matches_eager(tmp_path: Path) -> None:
    """WRN50-2 + VMamba-Tiny (random weights) exported at 256: a few minutes on CPU."""
    import openvino as ov

    torch.manual_seed(0)
    model = PDD(pre_trained=False).eval()
    xml = model.to_openvino(export_root=tmp_path, input_size=(256, 256))
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        eager = model(images)
    outputs = {port.get_any_name(): value for port, value in compiled(images.numpy()).items()}
    assert np.abs(outputs["anomaly_map"] - eager.anomaly_map.numpy()).max() < 1e-3


@pytest.mark.heavy  # ~2 minutes on a 2-core CPU: `.ci/run` runs it with `-m heavy`
def test_stock_cli_train_export_and_openvino_inferencer(tiny_textures_root: Path, tmp_path: Path) -> None:
    """`anomalib train` + `anomalib export` (stock command), then OpenVINOInferencer parity (f32)."""
    data_args = [
        "--data", "anomalib_kd.data.Textures", f"--data.root={tiny_textures_root}",
        *[f"--data.{k}={v}" for k, v in TINY_TEXTURES.items() if k != "defect_types"],
        "--data.defect_types=[scratch, blob]", "--trainer.max_epochs=1",
    ]  # fmt: skip
    model_args = [
        "--model.pre_trained=false", f"--model.backbone={FAST['backbone']}",
        "--model.vmamba_depths=[1, 1, 1, 1]", "--model.vmamba_dims=[8, 16, 32, 64]",
    ]  # fmt: skip
    image_path = next(tiny_textures_root.rglob("test/scratch/*.png"))
    ckpt = train_export_and_check(PDD, model_args, data_args, tmp_path, (64, 64), image_path)
    assert ckpt.is_file()  # train_export_and_check asserts the parity itself


def test_nan_loss_stops_with_a_clear_error(tiny_textures_root: Path) -> None:
    datamodule = tiny_textures(tiny_textures_root)
    datamodule.setup()
    model = _tiny_pdd()
    with torch.no_grad():
        next(model.model.students.parameters()).fill_(float("nan"))
    trainer = lightning.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(FloatingPointError, match="PDD loss became nan"):
        trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
