"""D24FAD: shapes, learn-to-weight, training, supports, Engine train/test, export parity, checkpoints."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalib_kd.data.fewshot import FewShotTasks
from anomalib_kd.models.d24fad import D24FAD, D24FADLoss, D24FADModel, LearnToWeight

from ..helpers import LINE_INSPECTION, load_script, make_tasks

SMALL = "resnet18"  # small teacher/decoder pair for fast tests (the default is WRN50-2)


def small_model(size: int = 32, **kwargs: object) -> D24FAD:
    return D24FAD(
        backbone=SMALL,
        pre_trained=False,
        pre_processor=D24FAD.configure_pre_processor((size, size)),
        **kwargs,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tasks(tmp_path_factory.mktemp("fewshot"), n_test=3)


@pytest.fixture(scope="module")
def trained(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Engine.train (fit + test) of a small D24FAD, leave-one-out with target 'alpha', K=2."""
    from anomalib.engine import Engine

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("results")
    datamodule = FewShotTasks(root=root, target="alpha", k_shot=2, train_batch_size=4, eval_batch_size=6)
    model = small_model()
    engine = Engine(
        max_steps=3,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
    )
    engine.train(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)
    return {"engine": engine, "model": model, "datamodule": datamodule, "results": results, "out": out}


def target_images(root: Path, task: str = "alpha") -> torch.Tensor:
    from anomalib.data.utils.image import read_image

    return torch.stack([read_image(p, as_tensor=True) for p in sorted((root / task / "test").rglob("*.png"))])


def test_shapes_at_128_with_wrn50() -> None:
    model = D24FADModel()  # WRN50-2 teacher, RD4AD wide decoder, random init (no download)
    query, support = torch.rand(1, 3, 128, 128), torch.rand(1, 2, 3, 128, 128)
    outputs = model.training_features(query, support)
    expected = [(1, 256, 32, 32), (1, 512, 16, 16), (1, 1024, 8, 8)]
    assert [tuple(f.shape) for f in outputs["teacher"]] == expected
    assert [tuple(f.shape) for f in outputs["student"]] == expected
    assert [tuple(f.shape) for f in outputs["weighted"]] == expected
    assert [tuple(w.shape) for w in outputs["weights"]] == [(1, 2)] * 3
    assert model.teacher_features(query)[-1].shape == (1, 2048, 4, 4)  # layer4 feeds the decoder
    model.eval()
    model.set_supports(torch.rand(1, 3, 128, 128))
    assert [tuple(f.shape) for f in model.support_features] == [(1, *s[1:]) for s in expected]
    prediction = model(query)
    assert prediction.anomaly_map.shape == (1, 1, 128, 128)
    assert prediction.pred_score.numel() == 1
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"student", "learn_to_weight"}  # frozen teacher


def _l2w_by_hand(
    query: np.ndarray, supports: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Paper Eq. 4 (official form) written out with loops, for one query (C, H, W) and K supports.

    key_k = phi(s_k) (1x1 conv: W s + b at every position); logit_k = <vec(q), vec(key_k)> / sqrt(C);
    w = softmax_k(logit); weighted = sum_k w_k s_k (un-projected supports).
    """
    channels, height, width = query.shape
    logits = []
    for support in supports:
        total = 0.0
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    key = sum(weight[c, d] * support[d, y, x] for d in range(channels)) + bias[c]
                    total += query[c, y, x] * key
        logits.append(total / np.sqrt(channels))
    exp = np.exp(np.array(logits) - max(logits))
    weights = exp / exp.sum()
    weighted = sum(w * s for w, s in zip(weights, supports, strict=True))
    return weights, weighted


def test_learn_to_weight_formula_on_hand_made_inputs() -> None:
    """Weights and weighted supports equal the spec's formula computed by hand (per-query and shared)."""
    rng = np.random.default_rng(3)
    channels, k_shot = 3, 4
    l2w = LearnToWeight([channels])
    weight = rng.normal(size=(channels, channels)).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    with torch.no_grad():
        l2w.projections[0].weight.copy_(torch.from_numpy(weight).reshape(channels, channels, 1, 1))
        l2w.projections[0].bias.copy_(torch.from_numpy(bias))
    queries = rng.normal(size=(2, channels, 2, 3)).astype(np.float32) * 0.7
    supports = rng.normal(size=(2, k_shot, channels, 2, 3)).astype(np.float32) * 0.7

    with torch.no_grad():
        weighted, weights = l2w([torch.from_numpy(queries)], [torch.from_numpy(supports)])
    for b in range(2):
        expected_weights, expected_weighted = _l2w_by_hand(queries[b], supports[b], weight, bias)
        assert expected_weights.max() < 0.99  # not one-hot: the logit scale matters in this case
        np.testing.assert_allclose(weights[0][b].numpy(), expected_weights, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(weighted[0][b].numpy(), expected_weighted, rtol=1e-4, atol=1e-5)

    # inference layout: one support set (K, C, H, W) shared by every query
    with torch.no_grad():
        shared_weighted, shared_weights = l2w([torch.from_numpy(queries)], [torch.from_numpy(supports[0])])
    for b in range(2):
        expected_weights, expected_weighted = _l2w_by_hand(queries[b], supports[0], weight, bias)
        np.testing.assert_allclose(shared_weights[0][b].numpy(), expected_weights, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(shared_weighted[0][b].numpy(), expected_weighted, rtol=1e-4, atol=1e-5)

    uniform = LearnToWeight([channels], learned=False)
    uniform_weighted, uniform_weights = uniform([torch.from_numpy(queries)], [torch.from_numpy(supports)])
    torch.testing.assert_close(uniform_weights[0], torch.full((2, k_shot), 1 / k_shot))
    torch.testing.assert_close(uniform_weighted[0], torch.from_numpy(supports).mean(dim=1))


def test_lanczos_resize_matches_pil_and_is_the_default() -> None:
    """The default pre-processor resizes as the official code (PIL Lanczos), within PIL's 8-bit rounding."""
    from PIL import Image

    from anomalib_kd.models.d24fad.pre_processing import LanczosResize

    rng = np.random.default_rng(0)
    model = D24FAD(backbone=SMALL, pre_trained=False)
    assert isinstance(model.pre_processor.transform, LanczosResize)
    assert model.input_size == (128, 128)
    assert isinstance(model.model.normalize, torch.nn.Identity)  # official: raw [0, 1] inputs
    for height, width, out_h, out_w in ((90, 70, 32, 24), (40, 50, 128, 128)):
        image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        image[10:25, 5:30] = 255  # an edge: Lanczos overshoots, PIL clips each pass
        expected = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.LANCZOS)) / 255.0
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        resized = LanczosResize((out_h, out_w))(tensor)[0].permute(1, 2, 0).numpy()
        difference = np.abs(resized - expected)
        assert difference.max() < 1.5 / 255
        assert difference.mean() < 0.5 / 255
    mask = torch.zeros(1, 1, 40, 40)
    from torchvision import tv_tensors

    mask[..., :20, :] = 1
    resized_mask = LanczosResize(16)(tv_tensors.Mask(mask))
    assert set(resized_mask.unique().tolist()) == {0.0, 1.0}  # masks: nearest, still binary


def test_maps_are_smoothed_per_image() -> None:
    """An image's map does not depend on its batch neighbours (the official 3-D blur mixed them)."""
    torch.manual_seed(0)
    model = small_model().eval()
    model.set_supports(torch.rand(2, 3, 32, 32))
    images = torch.rand(3, 3, 32, 32)
    images[1] = 1.0  # a very different neighbour
    with torch.no_grad():
        together = model.model(images).anomaly_map
        alone = model.model(images[:1]).anomaly_map
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_loss_decreases_on_tiny_data(root: Path) -> None:
    torch.manual_seed(0)
    datamodule = FewShotTasks(root=root, target="gamma", k_shot=2, train_batch_size=4)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))  # alpha (32 px) and beta (48 px) episodes
    model = small_model(lr=1e-3)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.model.training_features(batch.image, batch.support)
    batch.image = model._transform(batch.image)
    batch.support = model._transform(batch.support.flatten(0, 1)).reshape(4, 2, 3, 32, 32)
    optimizer = model.configure_optimizers()
    model.model.train()
    losses = []
    for _ in range(4):
        outputs = model.model.training_features(batch.image, batch.support)
        loss, tsd, ssd = model.loss(outputs["teacher"], outputs["student"], outputs["weighted"])
        torch.testing.assert_close(loss, 0.1 * tsd + ssd)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # gradients reach the L2W projections through the weights
    assert model.model.learn_to_weight.projections[0].weight.grad is not None


def test_loss_modes() -> None:
    a = [torch.rand(2, 4, 3, 3)]
    assert D24FADLoss(mode="pixel")(a, a, a)[0].item() == pytest.approx(0.0, abs=1e-6)
    b = [torch.rand(2, 4, 3, 3)]
    total, tsd, ssd = D24FADLoss(lambda_tsd=0.5, mode="global")(a, b, b)
    assert ssd.item() == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(0.5 * tsd.item())
    with pytest.raises(ValueError, match="loss_mode"):
        D24FADLoss(mode="patch")


def test_engine_train_test_uses_target_supports(trained: dict, root: Path) -> None:
    model, datamodule = trained["model"], trained["datamodule"]
    metrics = trained["results"][0]
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    # the supports in the model are the target's, pre-processed to the model's size
    expected = model._transform(datamodule.support_images("alpha"))
    torch.testing.assert_close(model.model.support_images, expected)
    assert model.model.k_shot == 2
    assert not model._user_supports


def test_supports_change_predictions_and_can_be_set_from_files(trained: dict, root: Path) -> None:
    model = trained["model"]
    model.eval()
    images = target_images(root)
    with torch.no_grad():
        before = model.model(images).anomaly_map.clone()
    saved = model.model.support_images.clone()
    try:
        model.set_supports(root / "beta" / "train" / "good")  # folder of another task (48 px, resized)
        assert model.model.support_images.shape == (6, 3, 32, 32)
        with torch.no_grad():
            after = model.model(images).anomaly_map
        assert not torch.allclose(before, after)
        model.set_supports([root / "alpha" / "train" / "good" / "000.png"])
        assert model.model.k_shot == 1
    finally:
        model.model.set_supports(saved)
        model._user_supports = False


def test_export_openvino_parity_with_baked_supports(trained: dict, root: Path) -> None:
    import openvino as ov
    from anomalib.deploy import ExportType

    model, engine = trained["model"], trained["engine"]
    export_root = trained["out"] / "export"
    xml = engine.export(model, ExportType.OPENVINO, export_root=export_root, input_size=(32, 32))
    assert Path(xml).is_file()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert len(compiled.inputs) == 1  # single input: supports are constants in the graph
    images = target_images(root)
    model.eval()
    with torch.no_grad():
        eager = model(images)  # AnomalibModule.forward: pre-processor -> model -> post-processor
    result = compiled(images.numpy())
    for name in ("pred_score", "anomaly_map"):
        exported = result[compiled.output(name)]
        reference = getattr(eager, name).numpy()
        assert float(reference.std()) > 0  # not a saturated, trivially equal output
        np.testing.assert_allclose(exported.reshape(reference.shape), reference, atol=1e-3)


def test_checkpoint_round_trip(trained: dict, root: Path) -> None:
    model, engine = trained["model"], trained["engine"]
    path = engine.trainer.checkpoint_callback.best_model_path
    assert path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # primitives only
    assert checkpoint["hyper_parameters"]["backbone"] == SMALL
    restored = D24FAD.load_from_checkpoint(path)
    restored.eval()
    model.eval()
    assert restored.model.k_shot == 2
    images = target_images(root)
    with torch.no_grad():  # the checkpoint's support features match its weights: no refresh needed
        torch.testing.assert_close(restored(images).anomaly_map, model(images).anomaly_map)
    assert restored.input_size == (32, 32)


def test_score_modes_and_errors(root: Path) -> None:
    model = small_model(score_mode="mean")
    model.eval()
    with pytest.raises(RuntimeError, match="no support images"):
        model.model(torch.rand(1, 3, 32, 32))
    model.set_supports(torch.rand(2, 3, 40, 40))
    with torch.no_grad():
        prediction = model.model(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(prediction.pred_score.flatten(), prediction.anomaly_map.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="score_mode"):
        small_model(score_mode="median")
    with pytest.raises(ValueError, match=r"\(K, 3, H, W\)"):
        model.model.set_supports(torch.rand(2, 1, 32, 32))
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        model.set_supports(root / "nowhere")
    (root / "empty").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="holds no image file"):
        model.set_supports(root / "empty")
    # a one-class (non-episodic) batch is refused with a clear message
    from anomalib.data import ImageBatch

    with pytest.raises(TypeError, match="episodes"):
        model.training_step(ImageBatch(image=torch.rand(2, 3, 32, 32)), 0)


def test_cli_arguments_parse(root: Path) -> None:
    from anomalib.data import AnomalibDataModule
    from anomalib.models import AnomalibModule
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibModule, "model")
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    config = parser.parse_args([
        "--model", "anomalib_kd.models.d24fad.D24FAD", "--model.backbone", SMALL,
        "--model.pre_trained", "false",
        "--model.score_mode", "mean", "--model.support_dir", str(root / "alpha" / "train" / "good"),
        "--data", "anomalib_kd.data.fewshot.FewShotTasks", "--data.root", str(root), "--data.target", "beta",
        "--data.k_shot", "2", "--data.tasks", '["alpha", "beta"]',
    ])  # fmt: skip
    objects = parser.instantiate_classes(config)
    assert isinstance(objects.model, D24FAD)
    assert objects.model.model.score_mode == "mean"
    assert objects.data.k_shot == 2
    assert objects.data.target == "beta"


def run(command: list[str], env: dict, cwd: Path) -> None:
    process = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]


@pytest.mark.slow
def test_stock_cli_train_and_export(root: Path, tmp_path: Path) -> None:
    """`anomalib train` then `anomalib export` (OpenVINO) through the stock CLI, then parity."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    anomalib = [sys.executable, "-c", "from anomalib.cli.cli import main; main()"]
    train = [
        *anomalib, "train", "--model", "anomalib_kd.models.d24fad.D24FAD", "--model.backbone", SMALL,
        "--model.pre_trained", "false", "--data", "anomalib_kd.data.fewshot.FewShotTasks",
        "--data.root", str(root), "--data.target", "alpha", "--data.k_shot", "2",
        "--data.train_batch_size", "4", "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path),
    ]  # fmt: skip
    run(train, env, tmp_path)
    checkpoints = list(tmp_path.rglob("model.ckpt"))
    assert checkpoints
    export = [
        *anomalib, "export", "--model", "anomalib_kd.models.d24fad.D24FAD", "--export_type", "openvino",
        "--ckpt_path", str(checkpoints[0]), "--input_size", "[128,128]",
        "--export_root", str(tmp_path / "exp"),
    ]  # fmt: skip
    run(export, env, tmp_path)
    xml = tmp_path / "exp" / "weights" / "openvino" / "model.xml"
    assert xml.is_file()

    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    model = D24FAD.load_from_checkpoint(str(checkpoints[0]))
    model.eval()
    images = torch.nn.functional.interpolate(target_images(root), size=(128, 128), mode="bilinear")
    with torch.no_grad():
        eager = model(images)
    exported = compiled(images.numpy())[compiled.output("anomaly_map")]
    np.testing.assert_allclose(
        exported.reshape(eager.anomaly_map.shape), eager.anomaly_map.numpy(), atol=1e-3
    )
    assert json.dumps(model.hparams["support_dir"]) == "null"


def test_one_class_datamodule_forms_in_category_episodes(root: Path, tmp_path: Path) -> None:
    """anomalib's MVTecAD: episodes drawn inside the training set, test supports from its normals."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    torch.manual_seed(0)
    datamodule = MVTecAD(root=root, category="alpha", train_batch_size=3, eval_batch_size=6, num_workers=0)
    model = small_model(k_shot=2)
    drawn: list[tuple[str, list[str]]] = []
    draw = model.episode_support_paths

    def recording(query: str, pool: list[str]) -> list[str]:
        supports = draw(query, pool)
        drawn.append((query, supports))
        return supports

    model.episode_support_paths = recording  # type: ignore[method-assign]
    engine = Engine(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    engine.fit(model, datamodule=datamodule)
    normals = sorted(str(p) for p in (root / "alpha" / "train" / "good").glob("*.png"))
    assert len(drawn) == 6  # 2 steps x 3 queries
    for query, supports in drawn:
        assert query in normals
        assert len(supports) == 2 and len(set(supports)) == 2
        assert query not in supports
        assert set(supports) <= set(normals)
        assert draw(query, normals) == supports  # fixed per query (seeded), as FewShotTasks
    other_seed = small_model(k_shot=2, support_seed=1)
    other_seed._trainer = model._trainer  # same category key
    assert any(other_seed.episode_support_paths(q, normals) != s for q, s in drawn)

    results = engine.test(model, datamodule=datamodule)
    assert "image_AUROC" in results[0]
    # test-time supports: K training normals drawn by the seed, never test images
    paths = model.test_support_paths(normals)
    assert len(paths) == 2 and set(paths) <= set(normals)
    expected = torch.cat([model._transform(read(p)[None]) for p in paths])
    torch.testing.assert_close(model.model.support_images, expected)

    with pytest.raises(ValueError, match="k_shot=6 is too large"):
        too_many = small_model(k_shot=6)
        too_many._trainer = model._trainer
        too_many.in_category_supports(next(iter(datamodule.train_dataloader())))


def read(path: str | Path) -> torch.Tensor:
    from anomalib_kd.models.d24fad.lightning_model import load_support_image

    return load_support_image(path)


@pytest.mark.heavy  # two exports, ~40 s on 2 cores: `.ci/run` runs it after the README's test command
def test_swapped_support_file_equals_reexport(trained: dict, root: Path, tmp_path: Path) -> None:
    """Swappable export + a new support-feature file scores as a re-export with those supports baked in."""
    import openvino as ov
    from anomalib.deploy import ExportType

    from anomalib_kd.models.d24fad.export import run_swappable
    from anomalib_kd.tools.d24fad_supports import main

    ckpt = trained["engine"].trainer.checkpoint_callback.best_model_path
    new_supports = root / "beta" / "train" / "good"
    xml = main(
        ["export", "--ckpt_path", ckpt, "--export_root", str(tmp_path / "swap"), "--input_size", "32", "32"]
    )
    swapped = main(
        [
            "features",
            "--ckpt_path",
            ckpt,
            "--support_dir",
            str(new_supports),
            "--output",
            str(tmp_path / "b.npz"),
        ]
    )

    reexported = D24FAD.load_from_checkpoint(ckpt).eval()
    reexported.set_supports(new_supports)
    baked_xml = reexported.to_openvino(tmp_path / "baked", input_size=(32, 32))
    assert baked_xml.is_file()
    compiled = ov.Core().compile_model(str(baked_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.nn.functional.interpolate(target_images(root), size=(32, 32), mode="bilinear").numpy()
    baked = compiled(images)
    swap = run_swappable(xml, swapped, images)
    for name in ("pred_score", "anomaly_map"):
        reference = baked[compiled.output(name)]
        assert float(reference.std()) > 0
        np.testing.assert_allclose(swap[name].reshape(reference.shape), reference, atol=1e-3)
    original = run_swappable(xml, xml.parent / "supports.npz", images)  # the checkpoint's own supports
    assert np.abs(original["anomaly_map"] - swap["anomaly_map"]).max() > 1e-3  # the swap changes scores
    assert ExportType.OPENVINO.value in str(xml)

    query = root / "alpha" / "test" / "bad" / "000.png"
    printed = main(["predict", "--model", str(xml), "--supports", str(swapped), "--json", str(query)])
    assert len(printed["pred_score"]) == 1 and np.isfinite(printed["pred_score"][0])

    # the line runner takes the same support file: its verdict equals run_swappable on its own input
    line = load_script(LINE_INSPECTION)
    folder = tmp_path / "station"
    folder.mkdir()
    shutil.copy(query, folder / "000.png")
    summary = line.run(xml, folder, tmp_path / "verdicts", supports=swapped)
    assert summary.inspected == 1
    score = float(next(csv.DictReader((tmp_path / "verdicts" / "verdicts.csv").open()))["score"])
    rgb = cv2.cvtColor(cv2.imread(str(query)), cv2.COLOR_BGR2RGB)
    expected = run_swappable(xml, swapped, line.to_input(rgb, (32, 32)))["pred_score"].reshape(-1)[0]
    assert score == pytest.approx(float(expected), abs=1e-4)
    with pytest.raises(ValueError, match="--supports"):
        line.run(xml, folder, tmp_path / "no_supports")
