"""Benchmark: the fused selective scan vs today's exported (portable) scan vs its arithmetic floor.

Run: ``python examples/benchmarks/fused_scan.py [--threads N] [--repeats R]``.

Size: one SS2D of VMamba-Tiny stage 1 at 256 px, i.e. 64x64 tokens (L = 4096), d_inner 192 x 4
directions = 768 channels, N = 16, grouped B/C (4 groups), softplus(delta + bias), D; batch 1, f32.

Rows (median of ``--repeats`` calls after one warm-up, all in this one process and run):

- ``portable scan (OpenVINO)``: :func:`~anomalib_kd.components.ssm.selective_scan` alone, exported to ONNX
  the default way (the chunked scan as pure operations) and compiled by OpenVINO;
- ``fused scan (OpenVINO)``: the same function exported with ``use_fused_scan`` (one
  ``anomalib_kd::SelectiveScan`` node) and compiled with the extension;
- ``fused scan (eager, ctypes)``: the same kernel called directly on torch tensors;
- ``arithmetic floor``: the state updates' arithmetic (``d x N x L`` updates, each a vector exp and three
  FMAs) run by the extension with no loads or stores, on the same threads: no scan can beat it here;
- ``SS2D portable / fused (OpenVINO)``: the whole module (projections, conv, cross-scan/merge, norm), so
  the scan's share of the module is visible. The fused SS2D runs the op's cross-scan mode
  (``cross_width``): its four directions in one call, no flips or transposes in the graph.

Per-op-class accounting of whole models: ``ov_profile.py`` in this folder.

The machine may be shared: compare ratios within one run. The load average and CPU are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from selective_scan import make_inputs  # the sibling benchmark's stage-1-like inputs (same folder)

from anomalib_kd.components.ssm import SS2D, selective_scan
from anomalib_kd.components.ssm.fused import (
    extension_path,
    kernel_library,
    onnx_translation_table,
    use_fused_scan,
)

GROUPS, D_INNER, N_STATE, SIDE = 4, 192, 16, 64


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class ScanOnly(torch.nn.Module):
    """:func:`selective_scan` with VMamba's options, as an exportable module (all tensors are inputs)."""

    def forward(self, u, delta, A, B, C, D, delta_bias):  # noqa: N803
        return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_onnx(module: torch.nn.Module, args: tuple, path: Path, fused: bool, threads: int):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    start = time.perf_counter()
    with torch.no_grad(), use_fused_scan(fused):
        kwargs = {"custom_translation_table": onnx_translation_table()} if fused else {}
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=18, verbose=False, **kwargs)
    export_s = time.perf_counter() - start
    core = ov.Core()
    if fused:
        core.add_extension(str(extension_path()))
        model = ov.convert_model(str(path), extension=str(extension_path()))
    else:
        model = ov.convert_model(str(path))
    n_ops = len(model.get_ordered_ops())
    return core.compile_model(model, "CPU", config), export_s, n_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-ss2d", action="store_true", help="only the scan rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    lib = kernel_library()
    if lib is None:
        raise SystemExit("the fused scan extension is unavailable here (see the warning above)")
    print(f"extension ready in {time.perf_counter() - start:.1f} s: {extension_path()}")
    seq_len = SIDE * SIDE
    d = GROUPS * D_INNER
    updates = d * N_STATE * seq_len
    print(
        f"{cpu_model()}, {os.cpu_count()} cores, threads {args.threads}, "
        f"SIMD width {lib.akd_simd_width()} f32, torch {torch.__version__}, load average {os.getloadavg()}"
    )
    print(
        f"scan: batch 1, d = {GROUPS} x {D_INNER}, N = {N_STATE}, L = {seq_len}: "
        f"{updates / 1e6:.1f} M state updates\n"
    )

    inputs = make_inputs(seq_len)
    arrays = [t.numpy() for t in inputs]
    with torch.no_grad():
        expected = ScanOnly()(*inputs)
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fused in (False, True):
            path = Path(tmp) / f"scan{fused}.onnx"
            compiled, export_s, n_ops = compile_onnx(ScanOnly(), inputs, path, fused, args.threads)
            err = (torch.from_numpy(compiled(arrays)[0]) - expected).abs().max().item()
            seconds = median_seconds(lambda c=compiled: c(arrays), args.repeats)
            name = "fused scan (OpenVINO)" if fused else "portable scan (OpenVINO)"
            rows.append(
                (name, seconds, f"{n_ops} OpenVINO ops, export {export_s:.0f} s, max |diff| {err:.1e}")
            )
        with torch.no_grad():
            seconds = median_seconds(
                lambda: selective_scan(*inputs, delta_softplus=True, backend="fused"), args.repeats
            )
        rows.append(("fused scan (eager, ctypes)", seconds, "same kernel, torch tensors"))
        seconds = median_seconds(lambda: lib.akd_arith_floor(updates), args.repeats)
        rows.append(("arithmetic floor", seconds, "exp + 3 FMA per update, no memory traffic, same threads"))

        if not args.skip_ss2d:
            torch.manual_seed(0)
            module = SS2D(d_model=96).eval()
            x = torch.randn(1, SIDE, SIDE, 96)
            with torch.no_grad():
                ref = module(x)
            for fused in (False, True):
                compiled, export_s, n_ops = compile_onnx(module, (x,), Path(tmp) / f"ss2d{fused}.onnx", fused,
                                                         args.threads)  # fmt: skip
                err = (torch.from_numpy(compiled(x.numpy())[0]) - ref).abs().max().item()
                seconds = median_seconds(lambda c=compiled: c(x.numpy()), args.repeats)
                name = f"SS2D {'fused' if fused else 'portable'} (OpenVINO)"
                rows.append(
                    (name, seconds, f"{n_ops} OpenVINO ops, export {export_s:.0f} s, max |diff| {err:.1e}")
                )

    floor = rows[3][1]
    print(f"| {'what':<28} | {'ms':>8} | {'x floor':>8} | notes |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|---|")
    for name, seconds, notes in rows:
        print(f"| {name:<28} | {1000 * seconds:>8.1f} | {seconds / floor:>8.2f} | {notes} |")
    print(
        f"\nportable / fused scan (OpenVINO): {rows[0][1] / rows[1][1]:.1f}x; "
        f"floor {updates / floor / 1e9:.2f} G state updates/s; load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
