"""Few-shot benchmark: D24FAD (leave-one-task-out) vs anomalib's ReverseDistillation trained k-shot.

The paper's protocol (D24FAD, ICLR 2026, Sec. 4) on ``kdbench``:

* suites: ``categories`` (every task folder directly under the root: brick, grass, gravel, brain_mri,
  head_ct) and ``fmnist`` (the ten Fashion-MNIST classes under ``<root>/fmnist`` as tasks);
* for every target task of a suite and every K: D24FAD is trained episodically on the *other* tasks
  of the suite (the target is never seen), then tested on the target with K supports drawn from its
  ``train/good``, once per support seed; ReverseDistillation is trained on the same K target normals
  (one-class, k-shot) per seed, with the same image size and step budget;
* image AUROC, mean +- std over the support seeds, per task, printed as a table.

The default run is a small budget (64 px, 10 training steps, K in {2, 4, 8}, support seeds 0-2, the
``categories`` suite: 5 targets x 3 K x 2 models = 30 rows); on an idle 2-core CPU it took 18 min 38 s
(peak RSS 4.5 GB). Narrow it with ``--targets``/``--shots``. ``results.json`` is rewritten after every
row, and each run's folder (its checkpoint) is deleted once scored (``--keep-checkpoints`` keeps them).
``--full`` selects the paper's settings (128 px, 70 epochs, batch 16, both suites, 5 seeds), which needs a
GPU.

Pretrained teacher weights are never downloaded: pass ``--weights-path`` (torchvision's
``wide_resnet50_2-95faca4d.pth`` or timm's ``wide_resnet50_2.tv_in1k`` file) or set
``$ANOMALIB_KD_WEIGHTS``; without them both models run with random teachers (``--no-pretrained``),
which says little about the methods.

Example::

    python examples/benchmarks/d24fad_fewshot.py --shots 2 4 --seeds 0 1 --max-steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kdbench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kdbench root (default %(default)s)")
    parser.add_argument("--suites", nargs="+", default=["categories"], choices=["categories", "fmnist"])
    parser.add_argument("--targets", nargs="*", default=None, help="restrict the held-out tasks")
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=10, help="training steps per model (both methods)")
    parser.add_argument("--max-epochs", type=int, default=-1, help="epoch cap (-1: steps decide)")
    parser.add_argument("--models", nargs="+", default=["D24FAD", "ReverseDistillation"])
    parser.add_argument("--score-mode", default="max", choices=["max", "mean"])
    parser.add_argument("--weights-path", default=None, help="local WRN50-2 ImageNet weights file")
    parser.add_argument("--no-pretrained", action="store_true", help="random teachers (no weights file)")
    parser.add_argument("--full", action="store_true", help="paper settings: 128 px, 70 epochs, batch 16")
    parser.add_argument("--output", type=Path, default=Path("results/d24fad_fewshot"))
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows in <output>/results.json, run the rest"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every run's folder (a k-shot RD checkpoint is ~800 MB; the default grid: ~40 GB)",
    )
    args = parser.parse_args()
    if args.full:
        args.image_size, args.batch_size, args.max_steps, args.max_epochs = 128, 16, -1, 70
        args.suites, args.seeds = ["categories", "fmnist"], [0, 1, 2, 3, 4]
    return args


def suite_root(data: Path, suite: str) -> Path:
    return data if suite == "categories" else data / suite


def make_engine(args: argparse.Namespace, out: Path) -> Engine:
    return Engine(
        max_steps=args.max_steps,
        max_epochs=args.max_epochs if args.max_epochs > 0 else None,
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # K-shot training has one batch per epoch: validating every epoch would cost more than training.
        # Validation runs once, after training (``fit_then_test``), to set the post-processor's statistics.
        check_val_every_n_epoch=10**6,
        num_sanity_val_steps=0,
        accelerator="auto",
        devices=1,
    )


def image_auroc(results: list[dict]) -> float:
    return float(results[0]["image_AUROC"])


def discard_run(args: argparse.Namespace, out: Path) -> None:
    """Delete a scored run's folder (its checkpoint); the row in ``results.json`` is what is kept."""
    if not args.keep_checkpoints:
        shutil.rmtree(out, ignore_errors=True)


def fit_and_validate(engine: Engine, model: torch.nn.Module, datamodule: object) -> None:
    engine.fit(model, datamodule=datamodule)
    engine.validate(model, datamodule=datamodule, verbose=False)


def run_d24fad(args: argparse.Namespace, root: Path, target: str, k: int, pretrained: bool) -> list[float]:
    from anomalib_kd.data.fewshot import FewShotTasks
    from anomalib_kd.models.d24fad import D24FAD

    size = (args.image_size, args.image_size)
    model = D24FAD(
        pre_trained=pretrained,
        weights_path=args.weights_path,
        score_mode=args.score_mode,
        pre_processor=D24FAD.configure_pre_processor(size),
        visualizer=False,
    )
    datamodule = FewShotTasks(
        root=root, target=target, k_shot=k, support_seed=args.seeds[0], train_batch_size=args.batch_size,
        eval_batch_size=32,
    )  # fmt: skip
    out = args.output / "D24FAD" / root.name / target / f"k{k}"
    engine = make_engine(args, out)
    fit_and_validate(engine, model, datamodule)
    scores = []
    for seed in args.seeds:  # same trained model, the target's supports redrawn per seed
        datamodule.support_seed = seed
        scores.append(image_auroc(engine.test(model, datamodule=datamodule, verbose=False)))
    discard_run(args, out)
    return scores


def run_reverse_distillation(
    args: argparse.Namespace, root: Path, target: str, k: int, pretrained: bool
) -> list[float]:
    from anomalib.models import ReverseDistillation

    from anomalib_kd.components.backbones import load_pretrained_backbone
    from anomalib_kd.data.fewshot import FewShotTasks

    scores = []
    for seed in args.seeds:  # k-shot one-class training on the target's K normals of this seed
        model = ReverseDistillation(
            pre_trained=False,
            pre_processor=ReverseDistillation.configure_pre_processor((args.image_size,) * 2),
            visualizer=False,
        )
        if pretrained:
            load_pretrained_backbone(model.model.encoder, "wide_resnet50_2.tv_in1k", args.weights_path)
        datamodule = FewShotTasks(
            root=root, target=target, k_shot=k, mode="one_class", support_seed=seed,
            train_batch_size=args.batch_size, eval_batch_size=32,
        )  # fmt: skip
        out = args.output / "RD" / root.name / target / f"k{k}_s{seed}"
        engine = make_engine(args, out)
        fit_and_validate(engine, model, datamodule)
        scores.append(image_auroc(engine.test(model, datamodule=datamodule, verbose=False)))
        discard_run(args, out)
    return scores


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    from anomalib_kd.components.backbones import MissingWeightsError, resolve_weights_file
    from anomalib_kd.data.fewshot import discover_tasks

    pretrained = not args.no_pretrained
    if pretrained:
        try:
            print("teacher weights:", resolve_weights_file("wide_resnet50_2.tv_in1k", args.weights_path))
        except MissingWeightsError as error:
            raise SystemExit(f"{error}\nOr run with --no-pretrained (random teachers).") from error
    torch.manual_seed(0)
    runners = {"D24FAD": run_d24fad, "ReverseDistillation": run_reverse_distillation}
    args.output.mkdir(parents=True, exist_ok=True)
    results = args.output / "results.json"
    rows = json.loads(results.read_text())["rows"] if args.resume and results.is_file() else []
    done = {(r["suite"], r["task"], r["k"], r["model"]) for r in rows}
    started = time.time()
    for suite in args.suites:
        root = suite_root(args.data, suite)
        tasks = list(discover_tasks(root))
        for target in [t for t in tasks if not args.targets or t in args.targets]:
            for k in args.shots:
                for name in args.models:
                    if (suite, target, k, name) in done:
                        continue
                    tic = time.time()
                    scores = runners[name](args, root, target, k, pretrained)
                    gc.collect()  # free the finished run's model and trainer before the next one
                    rows.append({
                        "suite": suite, "task": target, "k": k, "model": name, "aurocs": scores,
                        "mean": float(np.mean(scores)), "std": float(np.std(scores)),
                        "seconds": time.time() - tic,
                    })  # fmt: skip
                    print(
                        f"{suite:10s} {target:12s} K={k} {name:20s} image AUROC "
                        f"{rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f} ({rows[-1]['seconds']:.0f}s)",
                        flush=True,
                    )
                    # After every row: an interrupted run keeps what it measured (--resume continues it).
                    payload = {
                        "args": vars(args) | {"data": str(args.data), "output": str(args.output)},
                        "rows": rows,
                    }
                    results.write_text(json.dumps(payload, indent=1))
    print_table(rows, args)
    print(f"total {time.time() - started:.0f}s; pretrained teachers: {pretrained}")


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    models = args.models
    header = "| suite | task | K | " + " | ".join(models) + " |"
    print("\nImage AUROC, mean +- std over support seeds", args.seeds)
    print(header)
    print("|" + "---|" * (3 + len(models)))
    keys = sorted({(r["suite"], r["task"], r["k"]) for r in rows}, key=lambda x: (x[0], x[1], x[2]))
    for suite, task, k in keys:
        cells = []
        key = (suite, task, k)
        for model in models:
            match = [r for r in rows if (r["suite"], r["task"], r["k"]) == key and r["model"] == model]
            cells.append(f"{match[0]['mean']:.3f} +- {match[0]['std']:.3f}" if match else "-")
        print(f"| {suite} | {task} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
