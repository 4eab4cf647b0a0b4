"""Helpers for tests that run the stock ``anomalib`` command as a user would (subprocess)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

LINE_INSPECTION = Path(__file__).resolve().parents[1] / "examples" / "line_inspection.py"


def load_script(path: Path) -> ModuleType:
    """A script outside the package (``examples/``) imported from its file, as module ``path.stem``.

    Registered in ``sys.modules`` before it runs: its dataclasses look their module up there.
    """
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def console_script(name: str = "anomalib") -> str:
    """The console script ``name`` of the environment running the tests."""
    return str(Path(sys.executable).parent / name)


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output tails when it exits non-zero."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


# Post-processing that keeps thresholding but not anomalib's min-max normalisation, which clamps to [0, 1]:
# the exported graph's scores and maps are then the model's raw, un-clamped outputs, so a parity check
# cannot pass by both sides sitting at 0 or 1. Persisted in the checkpoint, so `anomalib export` keeps it.
RAW_POST_PROCESSOR = (
    '{"class_path": "anomalib.post_processing.PostProcessor", "init_args": {"enable_normalization": false}}'
)


def assert_varied_and_close(exported: np.ndarray, eager: np.ndarray, name: str, atol: float = 1e-3) -> None:
    """``exported`` matches ``eager`` within ``atol``, and ``eager`` is un-clamped and varies (std > 0,
    not all 0 or 1), so the comparison means something."""
    exported, eager = np.asarray(exported, dtype=np.float64), np.asarray(eager, dtype=np.float64)
    assert np.isfinite(exported).all(), name
    assert eager.size < 2 or eager.std() > 1e-6, f"{name}: eager output is constant ({eager.reshape(-1)[:4]})"
    assert not np.isin(eager, (0.0, 1.0)).all(), f"{name}: eager output sits at 0/1 only (clamped)"
    assert np.abs(exported.reshape(eager.shape) - eager).max() < atol, name


def f32_openvino_inferencer(xml: str | Path) -> object:
    """anomalib's ``OpenVINOInferencer`` (CPU, f32 hint), built in a temporary working directory.

    It writes OpenVINO's compile cache to ``./openvino_cache``: run from a checkout, the tests left
    gigabytes of it there. The compiled model lives in memory, so the folder can go at once.
    """
    import contextlib
    import tempfile

    from anomalib.deploy import OpenVINOInferencer

    xml = Path(xml).resolve()
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        return OpenVINOInferencer(xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})


def assert_openvino_inferencer_matches_eager(model: torch.nn.Module, xml: Path, image_path: Path) -> None:
    """anomalib's OpenVINOInferencer (f32) on an image file gives the eager AnomalibModule's outputs.

    The model must have been trained with :data:`RAW_POST_PROCESSOR` (un-clamped outputs, checked here).
    """
    from anomalib.data.utils import read_image

    assert model.post_processor is not None
    assert not model.post_processor.enable_normalization, "train with RAW_POST_PROCESSOR"
    predicted = f32_openvino_inferencer(xml).predict(image_path)
    image = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        eager = model.eval()(image)
    assert_varied_and_close(
        predicted.anomaly_map.squeeze(), eager.anomaly_map.squeeze().numpy(), "anomaly_map"
    )
    score = float(predicted.pred_score.reshape(-1)[0])
    assert np.isfinite(score)
    assert abs(score - float(eager.pred_score.reshape(-1)[0])) < 1e-3


def train_export_and_check(
    model_class: type,
    model_args: list[str],
    data_args: list[str],
    workdir: Path,
    input_size: tuple[int, int],
    image_path: Path,
) -> Path:
    """``anomalib train`` then ``anomalib export --export_type openvino``, both the stock command, then
    OpenVINOInferencer parity with the checkpoint's eager model on un-clamped outputs (the model is trained
    with :data:`RAW_POST_PROCESSOR`). Returns the checkpoint."""
    class_path = f"{model_class.__module__.split('.models')[0]}.{model_class.__name__}"
    run_cli(
        [
            console_script(),
            "train",
            "--model",
            class_path,
            *model_args,
            f"--model.post_processor={RAW_POST_PROCESSOR}",
            *data_args,
            f"--default_root_dir={workdir}",
        ],
        cwd=workdir,
    )
    ckpt = next(workdir.rglob("weights/lightning/model.ckpt"))
    assert list((ckpt.parents[2] / "images").rglob("*.png")), "anomalib's visualizer wrote no images"
    run_cli(
        [console_script(), "export", "--model", class_path, "--export_type", "openvino",
         f"--ckpt_path={ckpt}", f"--input_size=[{input_size[0]},{input_size[1]}]",
         f"--default_root_dir={workdir / 'export'}"],
        cwd=workdir,
    )  # fmt: skip
    xml = next((workdir / "export").rglob("openvino/model.xml"))
    assert_openvino_inferencer_matches_eager(model_class.load_from_checkpoint(ckpt), xml, image_path)
    return ckpt


def make_tasks(
    root: Path,
    names: tuple[str, ...] = ("alpha", "beta", "gamma"),
    n_train: int = 6,
    sizes: tuple[int, ...] = (32, 48, 64),
    n_test: int = 2,
) -> Path:
    """Tiny MVTec-layout tasks: n_train normals, n_test good + n_test bad test images with masks."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(names):
        size = sizes[index % len(sizes)]
        base = root / name
        for sub, count in (("train/good", n_train), ("test/good", n_test), ("test/bad", n_test)):
            folder = base / sub
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = (rng.random((size, size, 3)) * 60 + 50 * index).astype(np.uint8)
                if sub == "test/bad":
                    image[4:14, 4:14] = 255
                    mask = np.zeros((size, size), np.uint8)
                    mask[4:14, 4:14] = 255
                    (base / "ground_truth/bad").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(base / "ground_truth/bad" / f"{i:03d}_mask.png")
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def fit_recording_losses(model: object, dataloader: object, max_steps: int) -> tuple[list[float], object]:
    """Fit ``model`` with a bare Lightning trainer for ``max_steps`` optimizer steps.

    Returns the per-batch losses and the trainer.
    """
    import lightning

    losses: list[float] = []
    step = model.training_step

    def recording_step(*args: object, **kwargs: object) -> dict:
        out = step(*args, **kwargs)
        losses.append(float(out["loss"]))
        return out

    model.training_step = recording_step
    trainer = lightning.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=dataloader)
    return losses, trainer
