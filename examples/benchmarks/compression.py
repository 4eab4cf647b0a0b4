"""Compressed OpenVINO models side by side: latency, throughput, GFLOP/s and AUROC drop per compression.

For each model (URD, DHKD, PDD, D24FAD and anomalib's ReverseDistillation and EfficientAd) this trains one
kdbench category with the benchmark suite's CPU budget (``examples/benchmarks/configs/<model>.yaml``:
size, epochs, batch), exports it with anomalib's exporter (``to_openvino``) as f32, FP16 weights and
INT8_PTQ (calibration: the datamodule's validation images), and measures each variant:

- ``f32``: the f32 IR, ``INFERENCE_PRECISION_HINT=f32``;
- ``bf16``: the same IR with ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO's CPU default where supported);
- ``fp16``: the FP16-weight IR (``compression_type=FP16``), f32 hint (weights decompressed at load);
- ``int8``: the INT8_PTQ IR, f32 hint for what stays float (this package's models keep their map head,
  post-processing and scan float, see ``anomalib_kd.components.export``; anomalib's models get NNCF's
  default recipe).

Latency (batch 1, median) and throughput (async, all cores) come from OpenVINO's ``benchmark_app``
(shipped in the openvino wheel): ``-hint latency`` and ``-hint throughput``. Image and pixel AUROC on
the category's test set are computed from the IR's outputs (OpenVINO, same precision hint); the drop is
against the model's own f32 IR. GFLOP/s = FLOPs of one eager forward (torch's FlopCounterMode) times
throughput. Not a test: it trains six models (tens of minutes on 2 cores at the default budget).

    python examples/benchmarks/compression.py --category brick --out runs/compression
    python examples/benchmarks/compression.py --models URD,DHKD --image-size 64 --max-epochs 1 --time 5
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

logger = logging.getLogger("compression")

MODELS = ("URD", "DHKD", "PDD", "D24FAD", "ReverseDistillation", "EfficientAd")
CONFIGS = {
    "URD": "urd",
    "DHKD": "dhkd",
    "PDD": "pdd",
    "D24FAD": "d24fad",
    "ReverseDistillation": "reverse_distillation",
    "EfficientAd": "efficientad",
}
VARIANTS = ("f32", "bf16", "fp16", "int8")
DEFAULT_DATA = Path("/work/shared/data/kdbench")


def build(name: str, data: Path, category: str, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Budgeted model + datamodule from the suite's config (grid values: the first), and the image size."""
    from harness import models as harness

    from anomalib_kd.data import KDBench
    from anomalib_kd.data.fewshot import FewShotTasks

    config = yaml.safe_load((Path(__file__).parent / "configs" / f"{CONFIGS[name]}.yaml").read_text())
    model_args = dict(config["benchmark"]["model"]["init_args"])
    data_args = {k: v for k, v in config["benchmark"]["data"]["init_args"].items() if not isinstance(v, dict)}
    if args.image_size:
        model_args["image_size"] = args.image_size
    if args.max_epochs:
        model_args["max_epochs"] = args.max_epochs
    if args.limit_train_batches:
        model_args["limit_train_batches"] = args.limit_train_batches
    model = getattr(harness, f"Budgeted{name}")(**model_args)
    if name == "D24FAD":
        tasks = [t for t in data_args.pop("tasks", []) if (data / t).is_dir()] or None
        datamodule = FewShotTasks(root=data, target=category, tasks=tasks, **data_args)
    else:
        datamodule = KDBench(root=data, category=category, **data_args)
    return model, datamodule, int(model_args["image_size"])


def gflops(model: torch.nn.Module, size: int) -> float:
    """GFLOPs of one eager forward of a 1 x 3 x size x size image (torch's counter: matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def benchmark_app(xml: Path, hint: str, precision: str, seconds: int, size: int) -> dict[str, float]:
    """OpenVINO's benchmark_app at batch 1 per request: median latency (ms) and throughput (FPS)."""
    command = [
        str(Path(sys.executable).parent / "benchmark_app"),
        "-m", str(xml), "-d", "CPU", "-hint", hint, "-t", str(seconds), "-infer_precision", precision,
        "-shape", f"[1,3,{size},{size}]",
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        msg = f"benchmark_app failed ({xml}, {hint}, {precision}):\n{out.stdout[-1500:]}{out.stderr[-999:]}"
        raise RuntimeError(msg)
    median = re.search(r"Median:\s+([\d.]+)\s*ms", out.stdout)
    fps = re.search(r"Throughput:\s+([\d.]+)\s*FPS", out.stdout)
    return {"median_ms": float(median.group(1)) if median else float("nan"), "fps": float(fps.group(1))}


def aurocs(xml: Path, precision: str, datamodule: Any, size: int) -> tuple[float, float]:
    """Image and pixel AUROC of the IR on the test set (images brought to the IR's size first)."""
    import openvino as ov
    from sklearn.metrics import roc_auc_score

    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    names = {port.get_any_name(): port for port in compiled.outputs}
    scores, labels, maps, masks = [], [], [], []
    for batch in datamodule.test_dataloader():
        images = torch.nn.functional.interpolate(
            batch.image.float(), size=(size, size), mode="bilinear", antialias=True
        )
        result = compiled(images.numpy())
        scores.append(result[names["pred_score"]].reshape(-1))
        labels.append(batch.gt_label.numpy().reshape(-1))
        if "anomaly_map" in names and batch.gt_mask is not None:
            masks.append(
                torch.nn.functional.interpolate(batch.gt_mask[:, None].float(), size=(size, size)).numpy()
                > 0.5
            )
            maps.append(result[names["anomaly_map"]].reshape(masks[-1].shape))
    image = roc_auc_score(np.concatenate(labels), np.concatenate(scores))
    pixel = float("nan")
    if masks:
        gt = np.concatenate(masks).reshape(-1)
        if 0 < gt.sum() < gt.size:
            pixel = roc_auc_score(gt, np.concatenate(maps).reshape(-1))
    return float(image), float(pixel)


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train, export the three IRs and measure the four variants of one model."""
    from anomalib.deploy import CompressionType
    from anomalib.engine import Engine

    torch.manual_seed(0)
    model, datamodule, size = build(name, args.data, args.category, args)
    root = args.out / name
    start = time.perf_counter()
    engine = Engine(
        default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1
    )
    engine.fit(model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    datamodule.setup()
    model.eval()
    flops = gflops(model, size)
    irs = {}
    for variant, compression in (
        ("f32", None),
        ("fp16", CompressionType.FP16),
        ("int8", CompressionType.INT8_PTQ),
    ):
        start = time.perf_counter()
        irs[variant] = model.to_openvino(
            root / variant, input_size=(size, size), compression_type=compression, datamodule=datamodule
        )
        logger.info("%s %s exported in %.0f s", name, variant, time.perf_counter() - start)
    irs["bf16"] = irs["f32"]
    rows = []
    for variant in VARIANTS:
        precision = "bf16" if variant == "bf16" else "f32"
        image_auroc, pixel_auroc = aurocs(irs[variant], precision, datamodule, size)
        latency = benchmark_app(irs[variant], "latency", precision, args.time, size)
        throughput = benchmark_app(irs[variant], "throughput", precision, args.time, size)
        rows.append({
            "model": name, "variant": variant, "image_size": size, "train_s": round(train_s),
            "latency_ms": latency["median_ms"], "throughput_fps": throughput["fps"],
            "gflop_per_image": round(flops, 3), "gflop_s": round(flops * throughput["fps"], 1),
            "image_auroc": round(image_auroc, 4), "pixel_auroc": round(pixel_auroc, 4),
        })  # fmt: skip
        logger.info("%s", rows[-1])
    reference = rows[0]
    for row in rows:
        row["speedup_vs_f32"] = round(row["throughput_fps"] / reference["throughput_fps"], 2)
        row["image_auroc_drop"] = round(reference["image_auroc"] - row["image_auroc"], 4)
        row["pixel_auroc_drop"] = round(reference["pixel_auroc"] - row["pixel_auroc"], 4)
    return rows


COLUMNS = (
    "model", "variant", "image_size", "latency_ms", "throughput_fps", "speedup_vs_f32", "gflop_s",
    "image_auroc", "image_auroc_drop", "pixel_auroc", "pixel_auroc_drop",
)  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--image-size", type=int, default=None, help="override the configs' image size")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="cap batches per epoch")
    parser.add_argument("--time", type=int, default=10, help="seconds per benchmark_app run")
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data: no kdbench folder given and /work/shared/data/kdbench does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {MODELS}")
        rows += run_model(name, args)
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / "compression.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (args.out / "compression.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
