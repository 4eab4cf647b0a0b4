"""How far a DDP run lands from a one-process run with the same seed, data and global batch.

Trains one model twice with the stock ``anomalib train`` on ``anomalib_kd.data.Textures`` (generated, no
download): once with ``--trainer.strategy ddp --trainer.devices 2`` and ``train_batch_size B``, once in one
process with ``2 B``, the same seed and number of steps. Then scores the test images with both checkpoints
(eager, no post-processing) and prints each run's image AUROC, the rank correlation of the two runs'
scores and their largest score difference relative to the score range. For scale, a third run repeats the
one-process run with the next seed: the DDP run should differ from the one-process run about as much as a
reseeded one-process run does.

The runs are not expected to be equal: the global batch of a step holds different images (Lightning's
distributed sampler vs its shuffled sampler), BatchNorm normalises each process's half, and each process
draws its own random stream. Not a test: a measurement for the README's multi-GPU notes.

    python examples/benchmarks/ddp_vs_single.py --model URD --steps 16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

MODEL_ARGS = {
    "URD": ["--model.backbone", "resnet18", "--model.pre_trained", "false", "--model.iterations", "null"],
    "D24FAD": ["--model.backbone", "resnet18", "--model.pre_trained", "false", "--model.k_shot", "2"],
    "PDD": ["--model.pre_trained", "false", "--model.backbone", "resnet18"],
}


def train(model: str, devices: int, batch: int, args: argparse.Namespace, root: Path, out: Path) -> Path:
    """One ``anomalib train`` run; returns its checkpoint."""
    command = [
        str(Path(sys.executable).parent / "anomalib"), "train", "--model", f"anomalib_kd.{model}",
        *MODEL_ARGS[model], "--data", "anomalib_kd.data.Textures", "--data.root", str(root),
        "--data.category", args.category, "--data.image_size", str(args.image_size),
        "--data.train_batch_size", str(batch), "--data.num_workers", "0",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
        "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.max_steps", str(args.steps),
        "--seed_everything", str(args.seed), "--default_root_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // devices))}
    subprocess.run(command, check=True, env=env, capture_output=not args.verbose)
    return next(out.rglob("weights/lightning/model.ckpt"))


@torch.no_grad()
def scores(model_name: str, checkpoint: Path, images: list[Path]) -> np.ndarray:
    """Raw image scores of the checkpoint's model (eval forward, no post-processing)."""
    import anomalib_kd
    from anomalib_kd.data.image import read_image

    model = getattr(anomalib_kd, model_name).load_from_checkpoint(checkpoint, map_location="cpu").eval()
    out = []
    for path in images:
        image = read_image(path)[None]  # (1, 3, H, W) in [0, 1]
        out.append(float(model.model(model.pre_processor.transform(image)).pred_score.reshape(-1)[0]))
    return np.asarray(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODEL_ARGS), default="URD")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per-process batch of the DDP run")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    from scipy.stats import spearmanr
    from torchmetrics.functional.classification import binary_auroc

    def roc_auc_score(labels: np.ndarray, values: np.ndarray) -> float:
        return float(binary_auroc(torch.from_numpy(values), torch.from_numpy(labels).long()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        ddp = train(args.model, 2, args.batch, args, root, Path(tmp) / "ddp")
        single = train(args.model, 1, 2 * args.batch, args, root, Path(tmp) / "single")
        args.seed += 1
        reseeded = train(args.model, 1, 2 * args.batch, args, root, Path(tmp) / "reseeded")
        args.seed -= 1
        test = root / args.category / "test"
        images = sorted(test.rglob("*.png"))
        labels = np.asarray([p.parent.name != "good" for p in images])
        ddp_scores, single_scores = scores(args.model, ddp, images), scores(args.model, single, images)
        reseeded_scores = scores(args.model, reseeded, images)
    spread = float(np.ptp(single_scores)) or 1.0
    print(f"{args.model}: {args.steps} steps, global batch {2 * args.batch}, {len(images)} test images")
    print(f"  image AUROC  DDP (2 x {args.batch}): {roc_auc_score(labels, ddp_scores):.4f}")
    print(f"  image AUROC  one process ({2 * args.batch}): {roc_auc_score(labels, single_scores):.4f}")
    print(f"  image AUROC  one process, seed {args.seed + 1}: {roc_auc_score(labels, reseeded_scores):.4f}")
    for name, other in (("DDP", ddp_scores), (f"one process, seed {args.seed + 1}", reseeded_scores)):
        rho = spearmanr(other, single_scores).statistic
        gap = np.abs(other - single_scores).max() / spread
        print(f"  {name} vs one process: Spearman rho {rho:.4f}, max |score difference| / range {gap:.4f}")


if __name__ == "__main__":
    main()
