"""Speed of anomalib-kd models beside anomalib's own, eager PyTorch and OpenVINO (f32), in one run.

Each model is built with random weights (no downloads) in its own process, exported through
anomalib's own ``to_openvino`` (the same path as ``anomalib export``) and compiled for the CPU with
``INFERENCE_PRECISION_HINT=f32``. Per model it measures:

- latency per image at batch 1 (median of ``--repeats`` runs after one warm-up), eager and OpenVINO;
- throughput in images/s at ``--batch`` (median of ``max(1, repeats // 2)`` runs after one warm-up);
- parameter count (all parameters of the module, including frozen teachers/experts);
- FLOPs per image, from ``torch.utils.flop_counter.FlopCounterMode`` on one eager forward at batch 1.
  It counts only convolutions and matrix products (2 FLOPs per multiply-accumulate), so elementwise
  work is not in it: in particular the selective scan's (DHKD, PDD) recurrence, pre-/post-processing
  and Patchcore's nearest-neighbour ``min`` are missing; the numbers are lower bounds;
- achieved GFLOP/s = GFLOPs per image / latency at batch 1, eager and OpenVINO;
- the process's peak resident memory (building, eager runs, export and OpenVINO runs together).

``pdd_fused`` and ``dhkd_fused`` are PDD and DHKD with the fused selective scan
(:mod:`anomalib_kd.components.ssm.fused`): eager runs inside ``use_fused_scan()`` and the OpenVINO IR is
exported with ``export_openvino(..., fused=True)`` and compiled with the extension (built on first use;
without a compiler the row notes the fallback and measures the portable IR). The plain ``pdd``/``dhkd``
rows are the portable export (pure operations, any OpenVINO runtime).

Input is 256x256, except D24FAD at 128x128 (its paper size) with K=8 random supports stored in the
model as buffers, so the exported model has a single image input.

Patchcore (anomalib's, default ``wide_resnet50_2`` backbone, random weights) needs a memory bank. Its
inference cost grows with the bank's size, not its content, so by default the bank holds
``--patchcore-bank`` rows (24576 ~ the 10 % coreset of MVTec AD's ~240 training images x 32x32 patches)
drawn with replacement from the embeddings that Patchcore's own train-mode forward gives for
``--patchcore-images`` random images (coreset subsampling is skipped: at that size it alone would take
minutes and does not change inference cost). ``--patchcore-bank 0`` instead runs Patchcore's normal fit
path (train-mode forwards, then ``fit()``'s 10 % coreset) on those images: a small, optimistic bank.

Results go to a CSV (``--output``, one row per model, plus the date, CPU, core count, torch/OpenVINO
versions and git commit) and a Markdown table on stdout. A model that fails gets a row with its error;
the others still run.

    python examples/benchmarks/speed.py                                # all default models
    python examples/benchmarks/speed.py --models dhkd efficientad      # DHKD beside EfficientAd (medium)
    python examples/benchmarks/speed.py --models urd urd_r18 rd --repeats 5 --batch 4
    python examples/benchmarks/speed.py --models rd pdd_fused efficientad dhkd_fused --profile

``--profile`` then runs ``ov_profile.py`` (same folder) on the same models: OpenVINO's per-node
performance counters, interleaved across models, summed per model part (teacher, VMamba, students,
head) and op class (conv, linear, scan, layout, ...), with each part's GFLOP/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

# Patchcore memory-bank options, set in each worker process from the command line.
PATCHCORE = {"bank": 24576, "images": 4}
ROW_PREFIX = "SPEED-ROW "  # how a --worker process hands its row to the parent


def _urd(backbone: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from anomalib_kd import URD

        return URD(backbone=backbone, pre_trained=False)

    return build


def _rd() -> torch.nn.Module:
    from anomalib.models import ReverseDistillation

    return ReverseDistillation(pre_trained=False)


def _dhkd() -> torch.nn.Module:
    from anomalib_kd import DHKD

    return DHKD(pre_trained=False)


def _pdd() -> torch.nn.Module:
    from anomalib_kd import PDD

    return PDD(pre_trained=False)


def _efficientad() -> torch.nn.Module:
    from anomalib.models import EfficientAd

    return EfficientAd(model_size="medium")  # teacher weights are only fetched at train start


def _d24fad() -> torch.nn.Module:
    from anomalib_kd import D24FAD

    model = D24FAD(pre_trained=False)
    model.model.set_supports(torch.rand(8, 3, 128, 128))  # K=8 baked-in supports
    return model


def _patchcore() -> torch.nn.Module:
    from anomalib.models import Patchcore

    model = Patchcore(pre_trained=False)
    images = torch.rand(PATCHCORE["images"], 3, 256, 256)
    # Patchcore's own training step: a train-mode forward stores the patch embeddings.
    model.model.train()
    with torch.no_grad():
        for image in images.split(1):
            model.model(image)
    if PATCHCORE["bank"] <= 0:
        model.fit()  # the normal fit path: coreset subsampling of the stored embeddings
    else:
        embeddings = torch.vstack(model.model.embedding_store)
        model.model.embedding_store.clear()
        generator = torch.Generator().manual_seed(0)
        rows = torch.randint(embeddings.shape[0], (PATCHCORE["bank"],), generator=generator)
        model.model.memory_bank = embeddings[rows].clone()
    return model


# name -> (factory, input size)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "urd": (_urd("wide_resnet50_2.tv_in1k"), 256),
    "urd_r18": (_urd("resnet18"), 256),
    "rd": (_rd, 256),
    "dhkd": (_dhkd, 256),
    "dhkd_fused": (_dhkd, 256),
    "efficientad": (_efficientad, 256),
    "pdd": (_pdd, 256),
    "pdd_fused": (_pdd, 256),
    "d24fad": (_d24fad, 128),
    "patchcore": (_patchcore, 256),
}
DEFAULT_MODELS = ["urd", "dhkd", "dhkd_fused", "pdd", "pdd_fused", "d24fad", "rd", "efficientad", "patchcore"]
FUSED_SUFFIX = "_fused"  # rows that run the selective scan through the fused operator


def _median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _error(stage: str, exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:]
    where = f" ({Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{stage}: {type(exc).__name__}: {exc}{where}".replace("\n", " ")


def run_in_fresh_process(name: str, repeats: int, batch: int, patchcore: dict[str, int]) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (each peak-memory figure is that model's own).

    A plain subprocess running this script with ``--worker``: a worker killed by the OOM killer gives an
    error row. (``measure`` in a multiprocessing child, via ``Process`` or ``concurrent.futures``, made
    OpenVINO 4-6x slower here, measured; a fresh interpreter runs it at full speed.)
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--repeats", str(repeats),
               "--batch", str(batch), "--patchcore-bank", str(patchcore["bank"]),
               "--patchcore-images", str(patchcore["images"])]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if not lines:
        sys.stderr.write(result.stderr[-5000:])
        return {
            "model": name,
            "image_size": MODELS[name][1],
            "error": f"worker exit code {result.returncode}",
        }
    return json.loads(lines[-1][len(ROW_PREFIX) :])


def measure(name: str, repeats: int, batch: int) -> dict[str, Any]:
    """Size, FLOPs, eager and OpenVINO f32 latency (batch 1) and throughput (``batch``) of one model.

    Runs in its own process. A failing stage (FLOP count, eager, OpenVINO) leaves its columns empty and
    adds to ``error``; the other stages still run.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from anomalib_kd.components.ssm.fused import use_fused_scan

    factory, size = MODELS[name]
    row: dict[str, Any] = {"model": name, "image_size": size}
    errors: list[str] = []
    fused = name.endswith(FUSED_SUFFIX)
    if fused:
        with use_fused_scan() as active:
            row["notes"] = "fused scan" if active else "fused scan unavailable: portable scan measured"
    torch.manual_seed(0)
    model = factory().eval()
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if name == "patchcore":
        row["notes"] = f"memory bank {model.model.memory_bank.shape[0]} x {model.model.memory_bank.shape[1]}"
    one, many = torch.rand(1, 3, size, size), torch.rand(batch, 3, size, size)
    gflops = None
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(one)
        gflops = counter.get_total_flops() / 1e9
        row["gflops"] = round(gflops, 2)
    except Exception as exc:
        errors.append(_error("flops", exc))
    try:
        with torch.no_grad(), use_fused_scan(fused):
            row |= _timings("eager", lambda: model(one), lambda: model(many), gflops, batch, repeats)
    except Exception as exc:
        errors.append(_error("eager", exc))
    try:
        with tempfile.TemporaryDirectory() as root:
            compiled = _export_openvino(model, Path(root) / "dynamic", size, fused)
            one_np, many_np = one.numpy(), many.numpy()
            exported_batch = compiled.input(0).get_partial_shape()[0]
            if exported_batch.is_static:
                # The exporter specialised the batch axis (anomalib's Patchcore comes out with batch 2):
                # export again with a static batch of 1; batch throughput is then `batch` calls of one.
                compiled = _export_openvino(model, Path(root) / "static", size, fused, dynamic_axes={})
                row["notes"] = "; ".join(
                    filter(None, [row.get("notes"), f"OpenVINO b{batch}: {batch} x b1 (export batch static)"])
                )

                def run_many() -> object:
                    return [compiled(one_np[None, 0]) for _ in range(batch)]
            else:

                def run_many() -> object:
                    return compiled(many_np)

            row |= _timings("ov", lambda: compiled(one_np), run_many, gflops, batch, repeats)
    except Exception as exc:
        errors.append(_error("openvino", exc))
    # ru_maxrss is in KiB on Linux; each model has its own process, so this is that model's peak.
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    row["error"] = "; ".join(errors)
    return row


def _export_openvino(
    model: torch.nn.Module, root: Path, size: int, fused: bool = False, **onnx_kwargs: Any
) -> Any:
    """Export with anomalib's own ``to_openvino`` (``fused``: with the fused scan) and compile in f32."""
    import openvino as ov

    from anomalib_kd.components.ssm.fused import export_openvino, read_model

    core = ov.Core()
    if fused:
        xml = export_openvino(model, root, (size, size), fused=True, onnx_kwargs=onnx_kwargs or None)
        return core.compile_model(read_model(xml, core), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    xml = model.to_openvino(export_root=root, input_size=(size, size), onnx_kwargs=onnx_kwargs or None)
    return core.compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _timings(
    prefix: str,
    run_one: Callable[[], object],
    run_batch: Callable[[], object],
    gflops: float | None,
    batch: int,
    repeats: int,
) -> dict[str, float]:
    """Batch-1 latency (ms), achieved GFLOP/s and batch throughput (images/s) of one runtime."""
    latency = _median_seconds(run_one, repeats)
    row = {f"{prefix}_ms_b1": round(1000 * latency, 1)}
    if gflops is not None:
        row[f"{prefix}_gflops_per_s"] = round(gflops / latency, 1)
    row[f"{prefix}_ips_b{batch}"] = round(batch / _median_seconds(run_batch, max(1, repeats // 2)), 2)
    return row


def run_info() -> dict[str, str | int]:
    """Columns shared by every row: when, where and with what the measurement ran.

    No ``import openvino`` here: with OpenVINO loaded in this parent process, the workers' OpenVINO ran
    4-6x slower (measured), so its version comes from the package metadata.
    """
    from importlib.metadata import version

    from anomalib_kd.tools.benchmark_report import cpu_model, git_commit

    return {
        "weights": "random",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch": torch.__version__,
        "openvino": version("openvino"),
        "commit": git_commit(Path(__file__).resolve().parent),
    }


def columns(batch: int) -> list[str]:
    """CSV columns, in order."""
    return [
        "model",
        "image_size",
        "params_m",
        "gflops",
        "eager_ms_b1",
        "ov_ms_b1",
        f"eager_ips_b{batch}",
        f"ov_ips_b{batch}",
        "eager_gflops_per_s",
        "ov_gflops_per_s",
        "peak_rss_gb",
        "weights",
        "date",
        "machine",
        "cores",
        "torch",
        "openvino",
        "commit",
        "notes",
        "error",
    ]


def write_csv(rows: list[dict[str, Any]], path: Path, batch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns(batch), restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict[str, Any]], batch: int) -> str:
    headers = {
        "model": "model",
        "image_size": "size",
        "params_m": "params (M)",
        "gflops": "GFLOPs",
        "eager_ms_b1": "eager ms (b1)",
        "ov_ms_b1": "OpenVINO ms (b1)",
        f"eager_ips_b{batch}": f"eager img/s (b{batch})",
        f"ov_ips_b{batch}": f"OpenVINO img/s (b{batch})",
        "eager_gflops_per_s": "eager GFLOP/s",
        "ov_gflops_per_s": "OpenVINO GFLOP/s",
        "peak_rss_gb": "peak RSS (GB)",
    }
    if any(row.get("error") for row in rows):
        headers["error"] = "error"
    lines = ["| " + " | ".join(headers.values()) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in headers) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the throughput runs")
    parser.add_argument("--output", type=Path, default=Path("results/speed/speed.csv"), help="CSV to write")
    parser.add_argument(
        "--patchcore-bank",
        type=int,
        default=PATCHCORE["bank"],
        help="Patchcore memory-bank rows (0: normal fit path with 10%% coreset on --patchcore-images)",
    )
    parser.add_argument(
        "--patchcore-images", type=int, default=PATCHCORE["images"], help="random images Patchcore embeds"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, per-part / per-op-class OpenVINO accounting of the same models (ov_profile.py)",
    )
    parser.add_argument(
        "--profile-ir-dir", type=Path, default=Path("results/speed/irs"), help="IRs of --profile (reused)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: measure one model
    args = parser.parse_args()
    patchcore = {"bank": args.patchcore_bank, "images": args.patchcore_images}
    if args.worker is not None:
        PATCHCORE.update(patchcore)
        try:
            row = measure(args.worker, args.repeats, args.batch)
        except Exception as exc:
            traceback.print_exc()
            row = {"model": args.worker, "image_size": MODELS[args.worker][1], "error": _error("build", exc)}
        print(ROW_PREFIX + json.dumps(row), flush=True)
        return
    info = run_info()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        row = run_in_fresh_process(name, args.repeats, args.batch, patchcore)
        rows.append({**row, **info})
        print(f"{name}: done" + (f" ({row['error']})" if row.get("error") else ""), flush=True)
        write_csv(rows, args.output, args.batch)  # after every model, so an interrupted run keeps its rows
    print(
        f"\n{info['date']}, {info['machine']} ({info['cores']} cores), torch {info['torch']}, "
        f"OpenVINO {info['openvino']}, commit {info['commit']}, random weights. "
        "GFLOPs count convolutions and matrix products only."
    )
    print(markdown(rows, args.batch))
    print(f"\nWrote {args.output}")
    if args.profile:  # its own process: OpenVINO stays out of this one (see run_info)
        script = Path(__file__).resolve().with_name("ov_profile.py")
        command = [sys.executable, str(script), "--models", *args.models, "--repeats", str(args.repeats),
                   "--ir-dir", str(args.profile_ir_dir)]  # fmt: skip
        subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
