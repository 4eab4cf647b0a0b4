"""Latency of anomalib-kd models beside anomalib's own, eager PyTorch and OpenVINO (f32), in one run.

Each model is built with random weights (no downloads) in its own process, exported through
anomalib's own ``to_openvino`` (the same path as ``anomalib export``) and timed at batch 1 after a
warm-up; medians over ``--repeats`` runs. Throughput at ``--batch`` and the process's peak memory are
printed too.

    python examples/benchmarks/speed.py                       # URD (WRN50) vs ReverseDistillation
    python examples/benchmarks/speed.py --models dhkd efficientad      # DHKD beside EfficientAd (medium)
    python examples/benchmarks/speed.py --models pdd rd                # PDD beside ReverseDistillation
    python examples/benchmarks/speed.py --models urd urd_r18 rd d24fad --repeats 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


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


# name -> (factory, input size)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "urd": (_urd("wide_resnet50_2.tv_in1k"), 256),
    "urd_r18": (_urd("resnet18"), 256),
    "rd": (_rd, 256),
    "dhkd": (_dhkd, 256),
    "efficientad": (_efficientad, 256),
    "pdd": (_pdd, 256),
    "d24fad": (_d24fad, 128),
}


def _median_seconds(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int, batch: int) -> dict[str, float | str]:
    """Eager and OpenVINO f32 latency (batch 1) and throughput (``batch``) of one model."""
    import openvino as ov

    factory, size = MODELS[name]
    model = factory().eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    one, many = torch.rand(1, 3, size, size), torch.rand(batch, 3, size, size)
    with torch.no_grad():
        eager = _median_seconds(lambda: model(one), repeats)
        eager_batch = _median_seconds(lambda: model(many), max(1, repeats // 2))
    with tempfile.TemporaryDirectory() as root:
        xml = model.to_openvino(export_root=Path(root), input_size=(size, size))
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        one_np, many_np = one.numpy(), many.numpy()
        openvino = _median_seconds(lambda: compiled(one_np), repeats)
        openvino_batch = _median_seconds(lambda: compiled(many_np), max(1, repeats // 2))
    return {
        "model": name,
        "size": f"{size}x{size}",
        "params_M": round(params, 1),
        "eager_ms": round(1000 * eager, 1),
        "openvino_ms": round(1000 * openvino, 1),
        f"eager_img_s_b{batch}": round(batch / eager_batch, 2),
        f"openvino_img_s_b{batch}": round(batch / openvino_batch, 2),
        # Peak resident memory of this process (each model runs in its own process): build, eager runs,
        # export and OpenVINO runs together.
        "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["urd", "rd"], choices=sorted(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    # One fresh process per model, so each peak-memory figure is that model's own.
    context = multiprocessing.get_context("spawn")
    rows = []
    for name in args.models:
        with context.Pool(1) as pool:
            rows.append(pool.apply(measure, (name, args.repeats, args.batch)))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
