"""Compressed OpenVINO models side by side: latency, throughput, GFLOP/s and AUROC drop per compression.

For each model (URD, DHKD, PDD, D24FAD and anomalib's ReverseDistillation and EfficientAd) this trains one
kdbench category with the benchmark suite's CPU budget (``examples/benchmarks/configs/<model>.yaml``:
size, epochs, batch), exports it with anomalib's exporter (``to_openvino``) and measures each variant:

- ``f32``: the f32 IR, ``INFERENCE_PRECISION_HINT=f32``;
- ``bf16``: the same IR with ``INFERENCE_PRECISION_HINT=bf16`` (OpenVINO's CPU default where supported);
- ``fp16``: the FP16-weight IR (``compression_type=FP16``), f32 hint (weights decompressed at load);
- ``int8``: the INT8_PTQ IR (calibration: see ``calibration_datamodule``), f32 hint for what stays
  float (this package's models keep their map head, post-processing and scan float, see
  ``anomalib_kd.components.export``; anomalib's models get the same kind of float scope here, or NNCF's
  default with ``--stock-anomalib-int8``);
- ``int8_acq``: INT8_ACQ (``nncf.quantize_with_accuracy_control``) with image AUROC as the metric and
  ``--max-drop``: ops whose quantisation costs the most AUROC go back to float until the drop is met;
- ``f32_fused`` / ``int8_fused`` (PDD and DHKD, the models with a selective scan): the same two exports
  with the scan as the fused operator (``anomalib_kd.components.ssm.fused.export_openvino``), timed with
  the extension loaded (``benchmark_app -extensions``). Their speed-up is against ``f32_fused`` (the same
  scan in both); AUROC drops, like every variant's, against the portable f32 IR.

Two stages, so the long part can run on a busy machine and the timing on an idle one:

- ``--stage prepare``: train (weights kept in ``<out>/<model>/model.pt``), export the IRs, image / pixel AUROC
  and image scores on the test set (``prepare.json``); AUROC does not depend on load;
- ``--stage measure``: ``benchmark_app`` (shipped in the openvino wheel) latency at batch 1 (``-hint
  latency``, median) and throughput (``-hint throughput``, async, all cores) of the prepared IRs
  (``measure.json``), then the table (``compression.md`` / ``.csv``).

The default runs both. Work whose outputs exist is skipped (``--redo <variants>`` / ``--remeasure`` force
it). Drops and the Spearman rank agreement of the image scores are against the model's own f32 IR.
GFLOP/s = FLOPs of one eager forward (torch's FlopCounterMode) times throughput. Not a test: it trains six
models (tens of minutes on 2 cores at the default budget).

    python examples/benchmarks/compression.py --stage prepare --category brick --out runs/compression
    python examples/benchmarks/compression.py --stage measure --out runs/compression   # on an idle machine
    python examples/benchmarks/compression.py --models URD,DHKD --image-size 64 --max-epochs 1 --time 5
    # D24FAD on a one-class Fashion-MNIST task (its other classes are the training tasks; no pixel masks)
    python examples/benchmarks/compression.py --models D24FAD --data <kdbench>/fmnist --category trouser
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
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
VARIANTS = ("f32", "bf16", "fp16", "int8", "int8_acq", "f32_fused", "int8_fused")
PRECISION = {v: "bf16" if v == "bf16" else "f32" for v in VARIANTS}
SCAN_MODELS = ("PDD", "DHKD")  # the fused variants apply to these


# anomalib's stock INT8_PTQ quantises the map head and post-processing too: ReverseDistillation then gives
# one score to every image (0.62 -> 0.50 image AUROC in the reduced run). The benchmark gives anomalib's
# models the same kind of float scope as this package's (``--stock-anomalib-int8``: anomalib's behaviour).
ANOMALIB_FLOAT_MODULES = {
    "ReverseDistillation": ("post_processor", "model", "model.anomaly_map_generator*"),
    "EfficientAd": ("post_processor", "model"),  # the map combination with its quantile normalisation
}


def with_float_recipe(base: type, float_modules: tuple[str, ...]) -> type:
    """``base`` (an anomalib model) exported through :class:`OpenVINOQuantizationMixin`: ``float_modules``
    stay float under INT8."""
    from anomalib_kd.components.export import OpenVINOQuantizationMixin, QuantizationRecipe

    recipe = QuantizationRecipe(
        float_modules, reason="benchmark recipe: map head and post-processing stay float"
    )
    namespace = {"quantization_recipe": recipe, "__module__": __name__, "__doc__": base.__doc__}
    return type(base.__name__, (OpenVINOQuantizationMixin, base), namespace)


def build(name: str, data: Path, category: str, args: argparse.Namespace) -> tuple[Any, Any, int]:
    """Budgeted model + datamodule from the suite's config (grid values: the first), and the image size."""
    from harness import models as harness
    from harness.kdbench import KDBench

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
    model_class = getattr(harness, f"Budgeted{name}")
    if name in ANOMALIB_FLOAT_MODULES and not args.stock_anomalib_int8:
        model_class = with_float_recipe(model_class, ANOMALIB_FLOAT_MODULES[name])
    model = model_class(**model_args)
    if name == "D24FAD":
        tasks = [t for t in data_args.pop("tasks", []) if (data / t).is_dir()] or None
        datamodule = FewShotTasks(root=data, target=category, tasks=tasks, **data_args)
    else:
        datamodule = KDBench(root=data, category=category, **data_args)
    return model, datamodule, int(model_args["image_size"])


def calibration_datamodule(data: Path, category: str) -> Any:
    """The images INT8 ranges (and INT8_ACQ's metric) are fitted on: never the test images.

    kdbench's datamodule, like anomalib's MVTecAD, validates on the test set by default, and anomalib's
    exporter calibrates on the validation loader. Here the validation split is a quarter of the training
    normals, half of them given anomalib's synthetic (Perlin) anomalies so that calibration also sees
    anomalous activations (ranges fitted on normals alone clipped them: docs/fidelity.md). D24FAD's IR holds
    its supports and takes query images of the category, so it is calibrated on the same images. A
    category without pixel masks (``--data <kdbench>/fmnist --category trouser``: one-class tasks) is read
    with anomalib's ``Folder`` (normals ``train/good``, test ``test/good`` and the other ``test/*`` folders).
    """
    from anomalib.data import Folder
    from harness.kdbench import KDBench

    split = {"val_split_mode": "synthetic", "val_split_ratio": 0.25, "seed": 0}
    loaders = {"train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0}
    folder = data / category
    if (folder / "ground_truth").is_dir():
        datamodule = KDBench(root=data, category=category, **split, **loaders)
    else:
        tests = (folder / "test").iterdir()
        abnormal = sorted(f"test/{p.name}" for p in tests if p.is_dir() and p.name != "good")
        datamodule = Folder(
            name=category, root=folder, normal_dir="train/good", normal_test_dir="test/good",
            abnormal_dir=abnormal, **split, **loaders,
        )  # fmt: skip
    # anomalib picks the images to make anomalous with numpy's global RNG and draws the anomalies with
    # torch's: seeded here (and restored after) so that every run calibrates on the same images.
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        np.random.seed(0)
        try:
            datamodule.setup()
        finally:
            np.random.set_state(numpy_state)
    if {str(path) for path in datamodule.val_data.samples.image_path} & {
        str(path) for path in datamodule.test_data.samples.image_path
    }:
        msg = "calibration images overlap the test images"
        raise RuntimeError(msg)
    return datamodule


def gflops(model: torch.nn.Module, size: int) -> float:
    """GFLOPs of one eager forward of a 1 x 3 x size x size image (torch's counter: matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def benchmark_app(xml: Path, hint: str, precision: str, seconds: int, size: int) -> dict[str, float]:
    """OpenVINO's benchmark_app at batch 1 per request: median latency (ms) and throughput (FPS)."""
    from anomalib_kd.components.ssm.fused import extension_path, is_fused_ir

    command = [
        str(Path(sys.executable).parent / "benchmark_app"),
        "-m", str(xml), "-d", "CPU", "-hint", hint, "-t", str(seconds), "-infer_precision", precision,
        "-shape", f"[1,3,{size},{size}]",
    ]  # fmt: skip
    if is_fused_ir(xml):
        command += ["-extensions", str(extension_path())]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        msg = f"benchmark_app failed ({xml}, {hint}, {precision}):\n{out.stdout[-1500:]}{out.stderr[-999:]}"
        raise RuntimeError(msg)
    median = re.search(r"Median:\s+([\d.]+)\s*ms", out.stdout)
    fps = re.search(r"Throughput:\s+([\d.]+)\s*FPS", out.stdout)
    return {"median_ms": float(median.group(1)) if median else float("nan"), "fps": float(fps.group(1))}


def aurocs(xml: Path, precision: str, datamodule: Any, size: int) -> tuple[float, float, list[float]]:
    """Image and pixel AUROC of the IR on the test set (images brought to the IR's size first), and the
    image scores (test-loader order) for the rank agreement with the f32 IR."""
    import openvino as ov
    from sklearn.metrics import roc_auc_score

    from anomalib_kd.components.ssm.fused import read_model

    core = ov.Core()
    compiled = core.compile_model(read_model(xml, core), "CPU", {"INFERENCE_PRECISION_HINT": precision})
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
    return float(image), float(pixel), [float(v) for v in np.concatenate(scores)]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two score lists (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a killed run never leaves a half-written record)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def trained_model(name: str, args: argparse.Namespace) -> tuple[Any, Any, int, dict[str, Any]]:
    """The budgeted model trained once: loaded from ``<out>/<model>/model.pt`` when it exists.

    The record (``prepare.json``) keeps the training time and settings; a checkpoint trained with other
    settings (image size, epochs) is an error rather than silently reused.
    """
    from anomalib.engine import Engine

    torch.manual_seed(0)
    model, datamodule, size = build(name, args.data, args.category, args)
    root = args.out / name
    root.mkdir(parents=True, exist_ok=True)
    record = _load_json(root / "prepare.json")
    settings = {
        "category": args.category, "image_size": size, "max_epochs": args.max_epochs,
        "limit_train_batches": args.limit_train_batches,
    }  # fmt: skip
    checkpoint = root / "model.pt"
    if checkpoint.is_file():
        if record.get("settings") != settings:
            msg = f"{checkpoint} was trained with {record.get('settings')}, not {settings}: use another --out"
            raise RuntimeError(msg)
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        datamodule.setup()
        logger.info("%s: trained model loaded from %s", name, checkpoint)
    else:
        start = time.perf_counter()
        engine = Engine(
            default_root_dir=root, logger=False, enable_progress_bar=False, accelerator="cpu", devices=1
        )
        engine.fit(model, datamodule=datamodule)
        record = {"settings": settings, "train_s": round(time.perf_counter() - start), "variants": {}}
        torch.save(model.state_dict(), checkpoint)
        _save_json(root / "prepare.json", record)
        datamodule.setup()
    model.eval()
    return model, datamodule, size, record


def auroc_metric() -> Any:
    """Image AUROC on the IR's scores: the accuracy-control metric (label F1, anomalib's default, moves in
    steps of one image on a small validation set and depends on the fitted threshold)."""
    from anomalib.metrics import AUROC

    return AUROC(fields=["pred_score", "gt_label"])


def prepare_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or load), export the IRs of ``args.variants`` and compute their AUROCs; skip what exists.

    ``--redo`` names variants whose IR and AUROCs are made again (e.g. after changing a model's recipe).
    """
    from anomalib.deploy import CompressionType

    root = args.out / name
    record = _load_json(root / "prepare.json")
    wanted = [v for v in args.variants if v in VARIANTS and (name in SCAN_MODELS or "fused" not in v)]
    redo = set(args.redo)
    done = record.get("variants", {})
    if "model" not in redo and all(
        v in done and v not in redo and Path(done[v]["xml"]).is_file() and "scores" in done[v] for v in wanted
    ):
        logger.info("%s: prepared already (%s)", name, root / "prepare.json")
        return record
    model, datamodule, size, record = trained_model(name, args)
    record.setdefault("variants", {})
    if "gflop_per_image" not in record:
        record["gflop_per_image"] = round(gflops(model, size), 3)
    from anomalib_kd.components.ssm.fused import export_openvino, is_fused_ir

    # a fused variant is its base variant's compression with the fused scan
    compressions = {
        "f32": None, "fp16": CompressionType.FP16, "int8": CompressionType.INT8_PTQ,
        "int8_acq": CompressionType.INT8_ACQ,
    }  # fmt: skip
    calibration = None
    for variant in wanted:
        entry = record["variants"].get(variant, {})
        if entry and variant not in redo and Path(entry["xml"]).is_file():
            if "scores" not in entry:  # a record from before scores were kept: AUROCs again, no export
                _, _, entry["scores"] = aurocs(Path(entry["xml"]), PRECISION[variant], datamodule, size)
                _save_json(root / "prepare.json", record)
            continue
        if variant == "bf16":  # the f32 IR with a bf16 precision hint
            xml, export_s = Path(record["variants"]["f32"]["xml"]), 0.0
        else:
            start = time.perf_counter()
            extra = {"metric": auroc_metric(), "max_drop": args.max_drop} if variant == "int8_acq" else {}
            if variant.startswith("int8"):
                if calibration is None:  # once per model: int8 and int8_acq calibrate on the same images
                    calibration = calibration_datamodule(args.data, args.category)
                extra["datamodule"] = calibration
            try:
                fused = variant.endswith("_fused")
                xml = export_openvino(
                    model, root / variant, (size, size), fused=fused,
                    compression_type=compressions[variant.removesuffix("_fused")], **extra,
                )  # fmt: skip
                if fused and not is_fused_ir(xml):
                    msg = "the fused-scan extension is unavailable: the IR has the portable scan"
                    raise RuntimeError(msg)
            except Exception as error:  # one failing variant must not lose the model's other results
                logger.exception("%s %s: export failed", name, variant)
                record["variants"][variant] = {"xml": "", "error": f"{type(error).__name__}: {error}"[:500]}
                _save_json(root / "prepare.json", record)
                continue
            export_s = time.perf_counter() - start
            logger.info("%s %s exported in %.0f s", name, variant, export_s)
        image_auroc, pixel_auroc, scores = aurocs(xml, PRECISION[variant], datamodule, size)
        record["variants"][variant] = {
            "xml": str(xml), "export_s": round(export_s), "image_auroc": round(image_auroc, 4),
            "pixel_auroc": round(pixel_auroc, 4),
            "recipe": _recipe_text(model) if variant.startswith("int8") else "", "scores": scores,
        }  # fmt: skip
        logger.info("%s %s: image AUROC %.4f, pixel AUROC %.4f", name, variant, image_auroc, pixel_auroc)
        _save_json(root / "prepare.json", record)
    return record


def _recipe_text(model: Any) -> str:
    """The model's INT8 recipe in one line (anomalib's own models: NNCF's defaults)."""
    recipe = getattr(model, "quantization_recipe", None)
    return repr(recipe) if recipe is not None else "anomalib default (no float scope)"


def measure_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """benchmark_app latency / throughput of the prepared IRs (results kept in ``measure.json``)."""
    root = args.out / name
    record = _load_json(root / "prepare.json")
    if not record.get("variants"):
        logger.warning("%s: not prepared (no %s); run --stage prepare first", name, root / "prepare.json")
        return []
    size = record["settings"]["image_size"]
    measured = _load_json(root / "measure.json")
    for variant in args.variants:
        entry = record["variants"].get(variant)
        if not entry or not entry.get("xml"):
            continue
        if variant in measured and variant not in args.redo and not args.remeasure:
            continue
        xml = Path(entry["xml"])
        latency = benchmark_app(xml, "latency", PRECISION[variant], args.time, size)
        throughput = benchmark_app(xml, "throughput", PRECISION[variant], args.time, size)
        measured[variant] = {
            "latency_ms": latency["median_ms"], "throughput_fps": throughput["fps"],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg_1min": round(os.getloadavg()[0], 2),
        }  # fmt: skip
        logger.info("%s %s: %s", name, variant, measured[variant])
        _save_json(root / "measure.json", measured)
    return rows_for(name, args)


def rows_for(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Table rows of one model from its records (timing columns empty where not measured)."""
    root = args.out / name
    record, measured = _load_json(root / "prepare.json"), _load_json(root / "measure.json")
    variants = record.get("variants", {})
    reference = variants.get("f32", {})
    rows = []
    for variant in VARIANTS:
        entry = variants.get(variant)
        if not entry or variant not in args.variants:
            continue
        timing = measured.get(variant, {})
        reference_time = measured.get("f32_fused" if variant.endswith("_fused") else "f32", {})
        row: dict[str, Any] = {
            "model": name, "variant": variant, "image_size": record["settings"]["image_size"],
            "train_s": record.get("train_s"), "gflop_per_image": record.get("gflop_per_image"),
            "latency_ms": timing.get("latency_ms", ""), "throughput_fps": timing.get("throughput_fps", ""),
            "image_auroc": entry.get("image_auroc", entry.get("error", "")),
            "pixel_auroc": entry.get("pixel_auroc", ""),
        }  # fmt: skip
        if timing and reference_time:
            row["speedup_vs_f32"] = round(timing["throughput_fps"] / reference_time["throughput_fps"], 2)
            row["gflop_s"] = round(record["gflop_per_image"] * timing["throughput_fps"], 1)
        if "scores" in entry and "scores" in reference:
            row["spearman_vs_f32"] = round(spearman(reference["scores"], entry["scores"]), 4)
        for kind in ("image", "pixel"):
            if f"{kind}_auroc" in entry and f"{kind}_auroc" in reference:
                row[f"{kind}_auroc_drop"] = round(reference[f"{kind}_auroc"] - entry[f"{kind}_auroc"], 4)
        rows.append(row)
    return rows


COLUMNS = (
    "model", "variant", "image_size", "latency_ms", "throughput_fps", "speedup_vs_f32", "gflop_s",
    "image_auroc", "image_auroc_drop", "pixel_auroc", "pixel_auroc_drop", "spearman_vs_f32",
)  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    """``compression.csv`` and ``compression.md`` under ``out``."""
    if not rows:
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with (out / "compression.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "compression.md").write_text(markdown(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None,
        help="kdbench root (default: $ANOMALIB_KD_KDBENCH, else ../shared/data/kdbench when it exists)",
    )  # fmt: skip
    parser.add_argument("--category", default="brick")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument(
        "--stage", choices=("prepare", "measure", "all"), default="all",
        help="prepare: train, export, AUROC (load-independent); measure: benchmark_app + table; all: both",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS} (fused ones: PDD, DHKD only)"
    )
    parser.add_argument(
        "--redo", default="", help="variants to export/measure again although done ('model': retrain too)"
    )
    parser.add_argument("--remeasure", action="store_true", help="measure again every variant")
    parser.add_argument(
        "--stock-anomalib-int8", action="store_true",
        help="INT8 of ReverseDistillation / EfficientAd with anomalib's stock NNCF call (no float scope)",
    )  # fmt: skip
    parser.add_argument("--max-drop", type=float, default=0.01, help="INT8_ACQ: allowed image AUROC drop")
    parser.add_argument("--image-size", type=int, default=None, help="override the configs' image size")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="cap batches per epoch")
    parser.add_argument("--time", type=int, default=10, help="seconds per benchmark_app run")
    parser.add_argument("--out", type=Path, default=Path("runs/compression"))
    args = parser.parse_args(argv)
    from harness.kdbench import resolve_kdbench_root

    try:
        args.data = resolve_kdbench_root(args.data)
    except FileNotFoundError as error:
        parser.error(str(error))
    args.variants = [v for v in args.variants.split(",") if v]
    args.redo = [v for v in args.redo.split(",") if v]
    for variant in (*args.variants, *args.redo):
        if variant not in (*VARIANTS, "model"):
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if "bf16" in args.variants and "f32" not in args.variants:
        args.variants.insert(0, "f32")  # bf16 runs the f32 IR
    names = args.models.split(",")
    for name in names:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {MODELS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in {"prepare", "all"}:
        for name in names:
            try:
                prepare_model(name, args)
            except Exception:  # one model's failure must not lose the next models' runs
                logger.exception("%s: prepare failed", name)
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += measure_model(name, args) if args.stage in {"measure", "all"} else rows_for(name, args)
    write_table(rows, args.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
