"""Benchmark: chunked selective scan vs a per-step loop, SS2D export size, VMamba-Tiny eager/OpenVINO speed.

Run: ``python examples/benchmarks/selective_scan.py [--threads N] [--skip-vmamba-openvino]``.

Prints, for VMamba-Tiny stage-1 scan sizes (batch 1, d_inner 192 x 4 directions = 768 channels, N 16,
grouped B/C) and L in {1024, 4096}: forward and forward+backward wall time of
:func:`anomalib_kd.components.ssm.selective_scan` and of a per-step loop (best of 2 calls), their relative
error against an f64 per-step reference (max |y - ref| / max |ref|), and the peak resident-memory increase
of the first call in a fresh subprocess (``VmHWM`` minus the RSS before it). Then the ONNX node count of one
exported stage-1 SS2D (64x64 tokens) and VMamba-Tiny's forward time on one 256x256 image, eager and in
OpenVINO (f32). Timings depend on machine load; the load average is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.ssm import SS2D, VMambaTiny, selective_scan

GROUPS, D_INNER, N_STATE = 4, 192, 16


def make_inputs(seq_len: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Stage-1-like scan inputs (VMamba init: A = -(1..16), D = 1, dt bias from logUniform[1e-3, 1e-1])."""
    g = torch.Generator().manual_seed(seed)
    d = GROUPS * D_INNER
    u = torch.randn(1, d, seq_len, generator=g)
    delta = torch.randn(1, d, seq_len, generator=g) * 0.5
    A = -torch.arange(1, N_STATE + 1, dtype=torch.float32).repeat(d, 1)  # noqa: N806
    B = torch.randn(1, GROUPS, N_STATE, seq_len, generator=g)  # noqa: N806
    C = torch.randn(1, GROUPS, N_STATE, seq_len, generator=g)  # noqa: N806
    D = torch.ones(d)  # noqa: N806
    dt = 1e-3 * 100.0 ** torch.rand(d, generator=g)  # logUniform[1e-3, 1e-1]
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    return tuple(t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias))


def loop_scan(u, delta, A, B, C, D, delta_bias):  # noqa: N803
    """The per-step recurrence (what the official code falls back to without a CUDA kernel).

    The per-step inputs are unbound once, so the backward stays O(L) (indexing ``x[..., t]`` in the loop,
    as the official fallback does, makes every step's backward allocate a full-length gradient).
    """
    delta = F.softplus(delta + delta_bias[:, None])
    rep = u.shape[1] // B.shape[1]
    steps = zip(
        delta.unbind(-1),
        (delta * u).unbind(-1),
        B.repeat_interleave(rep, 1).unbind(-1),
        C.repeat_interleave(rep, 1).unbind(-1),
        strict=True,
    )
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for delta_t, x_t, b_t, c_t in steps:
        h = torch.exp(delta_t[..., None] * A) * h + x_t[..., None] * b_t
        ys.append((h * c_t).sum(-1))
    return torch.stack(ys, -1) + u * D[:, None]


def chunked_scan(u, delta, A, B, C, D, delta_bias):  # noqa: N803
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True)


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child(method: str, seq_len: int, backward: bool, threads: int, queue: mp.Queue) -> None:
    """One measurement in a fresh process, so that the memory peak is this call's own."""
    torch.set_num_threads(threads)
    fn = chunked_scan if method == "chunked" else loop_scan
    args = make_inputs(seq_len)
    if backward:
        args = tuple(a.clone().requires_grad_() for a in args)
    # Reset the peak-RSS mark (ru_maxrss would even include the parent's peak: it survives exec).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss0 = _status_bytes("VmRSS")
    times = []
    for _ in range(2):  # the first call gives the clean memory peak, the best of both the time
        t0 = time.perf_counter()
        if backward:
            y = fn(*args)
            y.sum().backward()
        else:
            with torch.no_grad():
                y = fn(*args)
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            peak = _status_bytes("VmHWM") - rss0
    elapsed = min(times)
    queue.put((elapsed, max(peak, 0), y.detach().numpy()))


def measure(method: str, seq_len: int, backward: bool, threads: int) -> tuple[float, int, torch.Tensor]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, seq_len, backward, threads, queue))
    proc.start()
    elapsed, peak, y = queue.get()
    proc.join()
    return elapsed, peak, torch.from_numpy(y)


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def onnx_export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, verbose=False)
    return time.perf_counter() - t0


class _Features(torch.nn.Module):
    def __init__(self, model: VMambaTiny) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--skip-vmamba-openvino", action="store_true", help="skip the ~2-3 min VMamba export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()}")
    print(f"scan: batch 1, d = {GROUPS} x {D_INNER}, N = {N_STATE}, grouped B/C, softplus(delta + bias), D\n")

    print(f"{'L':>5} {'method':>8} {'fwd s':>7} {'fwd+bwd s':>9} {'rel err':>9} ", end="")
    print(f"{'peak fwd MB':>11} {'peak f+b MB':>11}")
    for seq_len in args.lengths:
        with torch.no_grad():
            ref = loop_scan(*make_inputs(seq_len, torch.float64))
        for method in ("loop", "chunked"):
            t_fwd, mem_fwd, y = measure(method, seq_len, False, args.threads)
            t_bwd, mem_bwd, _ = measure(method, seq_len, True, args.threads)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            print(
                f"{seq_len:>5} {method:>8} {t_fwd:>7.3f} {t_bwd:>9.3f} {err:>9.2e} "
                f"{mem_fwd / 2**20:>11.1f} {mem_bwd / 2**20:>11.1f}",
                flush=True,
            )

    import onnx
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ss2d = SS2D(d_model=96).eval()
        x = torch.randn(1, 64, 64, 96)
        path = Path(tmp) / "ss2d.onnx"
        export_s = onnx_export(ss2d, x, path)
        nodes = onnx.load(str(path)).graph.node
        compiled = core.compile_model(ov.convert_model(str(path)), "CPU", config)
        with torch.no_grad():
            expected = ss2d(x)
            eager_s = timed(lambda: ss2d(x))
        out = torch.from_numpy(compiled(x.numpy())[0])
        ov_s = timed(lambda: compiled(x.numpy()))
        print(
            f"\nSS2D stage 1 (d_model 96, 64x64 tokens): {len(nodes)} ONNX nodes "
            f"(export {export_s:.0f} s; {dict(Counter(n.op_type for n in nodes).most_common(6))})"
        )
        print(
            f"  eager {eager_s:.3f} s, OpenVINO f32 {ov_s:.3f} s, max |OV - eager| "
            f"{(out - expected).abs().max().item():.2e}"
        )

        model = VMambaTiny().eval()
        image = torch.randn(1, 3, 256, 256)
        with torch.no_grad():
            eager_s = timed(lambda: model(image))
            expected = model(image)
        print(f"\nVMambaTiny 256x256: eager forward {eager_s:.3f} s")
        if not args.skip_vmamba_openvino:
            path = Path(tmp) / "vmamba_tiny.onnx"
            export_s = onnx_export(_Features(model).eval(), image, path)
            n_nodes = len(onnx.load(str(path)).graph.node)
            compiled = core.compile_model(ov.convert_model(str(path)), "CPU", config)
            outs = compiled(image.numpy())
            err = max((torch.from_numpy(outs[i]) - e).abs().max().item() for i, e in enumerate(expected))
            ov_s = timed(lambda: compiled(image.numpy()))
            print(
                f"VMambaTiny 256x256: OpenVINO f32 forward {ov_s:.3f} s ({n_nodes} ONNX nodes, export "
                f"{export_s:.0f} s, max |OV - eager| {err:.2e})"
            )


if __name__ == "__main__":
    main()
