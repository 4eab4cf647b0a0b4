"""Where OpenVINO's CPU time goes: per-op-class and per-model-part accounting of exported IRs, side by side.

Each model is exported as ``speed.py`` builds it (random weights, 256 px, batch 1; ``*_fused`` rows with
the fused selective scan), compiled with ``INFERENCE_PRECISION_HINT=f32``, ``INFERENCE_NUM_THREADS`` =
``--threads`` and ``PERF_COUNT`` on, and the models' inferences are interleaved (one of each per round,
``--repeats`` rounds, medians), so a loaded machine slows them alike and the ratios stay comparable.

Every executed node of OpenVINO's runtime graph (its ``get_profiling_info()``) is charged to

- a model part: the ``model.<part>`` prefix of the weights the node (or the original layers fused into
  it) consumes; a node without weights inherits the part of its inputs, and one mixing parts (the
  anomaly-map head comparing teacher and student features) is ``head``;
- an op class: ``conv`` (dense convolutions, transposed convolutions), ``dwconv`` (grouped/depthwise),
  ``linear`` (fully connected / MatMul / Einsum), ``scan`` (the fused selective scan), ``norm``
  (MVN/RMS/reductions), ``layout`` (Transpose, Reorder, Reshape, Slice, Concat, Split, Gather, Broadcast:
  data movement only), ``eltwise`` (everything else: activations, adds, multiplies, interpolation).

It also counts each model's convolution and matrix-product GFLOPs (torch's ``FlopCounterMode``, as in
``speed.py``) and the GFLOP/s OpenVINO reaches on its ``conv`` + ``linear`` nodes.

    python examples/benchmarks/ov_profile.py                          # rd pdd_fused efficientad dhkd_fused
    python examples/benchmarks/ov_profile.py --models pdd pdd_fused --repeats 9 --ir-dir /tmp/irs

``--ir-dir`` keeps the exported IRs (PDD's fused export takes about two minutes) and reuses them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # the sibling benchmark's model factories

LAYOUT = {"Transpose", "Reorder", "Reshape", "Slice", "StridedSlice", "Concat", "Split", "VariadicSplit",
          "Gather", "Broadcast", "Squeeze", "Unsqueeze", "ShapeOf", "Tile", "Roll"}  # fmt: skip
NORM = {"MVN", "RMS", "ReduceMean", "ReduceL2", "ReduceSum", "ReduceMax", "NormalizeL2", "Softmax"}
LINEAR = {"FullyConnected", "MatMul", "Einsum"}
CONV = {"Convolution", "ConvolutionBackpropData", "Deconvolution"}
CLASSES = ["conv", "dwconv", "linear", "scan", "norm", "layout", "eltwise"]


def op_class(runtime_type: str, original_types: set[str]) -> str:
    """The op class of one runtime node, from its runtime type and the types of the layers fused into it."""
    if runtime_type == "Reference" and "SelectiveScan" in original_types:
        return "scan"
    if "GroupConvolution" in original_types:
        return "dwconv"
    if runtime_type in CONV or original_types & CONV:
        return "conv"
    if runtime_type in LINEAR or original_types & LINEAR:
        return "linear"
    if runtime_type in NORM:
        return "norm"
    if runtime_type in LAYOUT:
        return "layout"
    return "eltwise"


def _weight_part(name: str) -> str | None:
    """``model.<part>[.<sub>]`` of a weight's name (student sub-modules kept apart), else ``None``."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "model":
        return None
    if parts[1] in {"student", "students", "ae"} and len(parts) > 3 and not parts[2].startswith("conv"):
        return ".".join(parts[1:3])
    return parts[1]


UNNAMED = "layers with folded (unnamed) weights"


def _is_weight(node: Any) -> bool:
    """A constant of at least 2 dimensions with more than 64 elements (a weight, not a shape or scalar)."""
    shape = node.get_output_partial_shape(0)
    if shape.rank.is_dynamic or shape.rank.get_length() < 2 or not shape.is_static:
        return False
    size = 1
    for dim in shape.to_shape():
        size *= dim
    return size > 64


def label_original(model: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Part label and op type of every node of the original (read) model, by friendly name."""
    label: dict[Any, str | None] = {}
    const: dict[Any, bool] = {}
    names: dict[str, str] = {}
    types: dict[str, str] = {}
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        inputs = [value.get_node() for value in node.input_values()]
        if kind == "Constant":
            const[node], label[node] = True, _weight_part(node.get_friendly_name())
        elif inputs and all(const[i] for i in inputs):  # weight preprocessing (Convert, fused BN scales)
            const[node] = True
            label[node] = next((label[i] for i in inputs if label[i]), None)
        else:
            const[node] = False
            weights = [label[i] for i in inputs if const[i] and label[i]]
            unnamed = any(const[i] and not label[i] and i.get_output_size() and _is_weight(i) for i in inputs)
            data = {label[i] for i in inputs if not const[i] and label[i] and label[i] != "input"}
            if weights:
                label[node] = weights[0]
            elif unnamed and (len(data) > 1 or data == {"head"}):
                # Weights folded at conversion (BatchNorm into conv) lose their names: such a layer fed
                # by mixed features starts a part of its own (PDD's student decoder), not the head.
                label[node] = UNNAMED
            elif len(data) == 1:
                label[node] = data.pop()
            elif data:
                label[node] = "head"
            else:
                label[node] = "input" if kind == "Parameter" or not inputs else "head"
        names[node.get_friendly_name()] = label[node] or "head"
        types[node.get_friendly_name()] = kind
    return names, types


def label_runtime(compiled: Any, model: Any) -> dict[str, tuple[str, str]]:
    """``{runtime node name: (part, op class)}`` for a compiled model (fused layers and reorders included)."""
    names, types = label_original(model)
    scan_names = [n for n, t in types.items() if t == "SelectiveScan"]
    result: dict[str, tuple[str, str]] = {}
    parts: dict[Any, str] = {}
    for node in compiled.get_runtime_model().get_ordered_ops():
        info = node.get_rt_info()
        raw = str(info["originalLayersNames"].astype(str))
        runtime_type = str(info["layerType"].astype(str))
        # The fused scan's friendly name holds commas (it names the extension file): match it whole.
        scans = [n for n in scan_names if n in raw]
        originals = scans or [n for n in raw.split(",") if n]
        found = [names[n] for n in originals if n in names and names[n] not in {"input", "head", UNNAMED}]
        found = found or [names[n] for n in originals if names.get(n) == UNNAMED]
        inputs = [parts[v.get_node()] for v in node.input_values() if v.get_node() in parts]
        if found:
            part = collections.Counter(found).most_common(1)[0][0]
        elif any(names.get(n) == "head" for n in originals):
            part = "head"
        else:
            known = {p for p in inputs if p != "input"}
            part = known.pop() if len(known) == 1 else ("head" if known else "input")
        parts[node] = part
        result[node.get_friendly_name()] = (
            part,
            op_class(runtime_type, {types.get(n, "") for n in originals}),
        )
    return result


def conv_gflops(module: torch.nn.Module, size: int) -> dict[str, Any]:
    """Convolution + matrix-product GFLOPs of one eager forward at batch 1 (as ``speed.py``), in total
    and per model part (the parts of :func:`_weight_part`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.rand(1, 3, size, size))
    # Module paths (root class name dropped) -> part; a part's FLOPs are those of its outermost modules
    # (a ModuleList is never called, so its children are).
    entries = []
    for key, counts in counter.get_flop_counts().items():
        path = key.split(".", 1)[1] if "." in key else ""
        part = _weight_part(path + ".weight")
        if part is not None and path.startswith(f"model.{part}"):
            entries.append((path, part, sum(counts.values()) / 1e9))
    parts: dict[str, float] = collections.defaultdict(float)
    for path, part, flops in entries:
        if not any(q != path and path.startswith(q + ".") and p == part for q, p, _ in entries):
            parts[part] += flops
    return {"gflops": counter.get_total_flops() / 1e9, "parts": dict(parts)}


def export_ir(name: str, ir_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The model's IR (exported once into ``ir_dir/<name>``) and its conv+matmul GFLOPs (total, per part).

    ``name`` may carry a tag after ``@`` (``pdd_fused@before``): another IR folder of the same model.
    """
    from anomalib_kd.components.ssm.fused import export_openvino, use_fused_scan

    base = name.split("@")[0]
    factory, size = speed.MODELS[base]
    root = ir_dir / name
    xml = root / "weights" / "openvino" / "model.xml"
    meta = root / "gflops.json"
    if xml.is_file() and meta.is_file() and "parts" in json.loads(meta.read_text()):
        return xml, json.loads(meta.read_text())
    torch.manual_seed(0)
    model = factory().eval()
    fused = base.endswith(speed.FUSED_SUFFIX)
    with use_fused_scan(fused):
        gflops = conv_gflops(model, size)
    if not xml.is_file():
        start = time.perf_counter()
        xml = export_openvino(model, root, (size, size), fused=fused)
        print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
    meta.write_text(json.dumps(gflops))
    return xml, gflops


def profile(names: list[str], ir_dir: Path, repeats: int, threads: int) -> dict[str, dict[str, Any]]:
    """Interleaved profiled inferences of every model; per model: medians of wall ms and of ms per node."""
    import openvino as ov

    from anomalib_kd.components.ssm.fused import read_model

    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        xml, gflops = export_ir(name, ir_dir)
        core = ov.Core()
        model = read_model(xml, core)
        config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
        compiled = core.compile_model(model, "CPU", config)
        size = speed.MODELS[name.split("@")[0]][1]
        request = compiled.create_infer_request()
        image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
        request.infer([image])  # warm-up
        runs[name] = {
            "request": request,
            "image": image,
            "labels": label_runtime(compiled, model),
            "gflops": gflops["gflops"],
            "part_gflops": gflops["parts"],
            "wall": [],
            "nodes": collections.defaultdict(list),
            "kinds": {},
        }
    for _ in range(repeats):
        for run in runs.values():
            start = time.perf_counter()
            run["request"].infer([run["image"]])
            run["wall"].append(1000 * (time.perf_counter() - start))
            for info in run["request"].get_profiling_info():
                run["nodes"][info.node_name].append(1000 * info.real_time.total_seconds())
                run["kinds"][info.node_name] = (info.node_type, info.exec_type)
    results = {}
    for name, run in runs.items():
        table: dict[tuple[str, str], float] = collections.defaultdict(float)
        kinds: dict[tuple[str, str, str], float] = collections.defaultdict(float)
        for node, times in run["nodes"].items():
            part, cls = run["labels"].get(node, ("?", "eltwise"))
            table[(part, cls)] += statistics.median(times)
            kinds[(cls, *run["kinds"][node])] += statistics.median(times)
        results[name] = {"wall_ms": statistics.median(run["wall"]), "gflops": run["gflops"], "table": table,
                         "kinds": kinds, "part_gflops": run["part_gflops"]}  # fmt: skip
    return results


def report(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one part x class table per model, then a summary row per model."""
    out = []
    summary = [
        "| model | wall ms | profiled ms | conv+linear ms | GFLOPs | GFLOP/s on conv+linear | scan ms "
        "| layout ms | norm ms | eltwise ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        table = res["table"]
        total = sum(table.values())
        parts = sorted({p for p, _ in table}, key=lambda p: -sum(v for (q, _), v in table.items() if q == p))
        out.append(f"\n### {name}: wall {res['wall_ms']:.1f} ms, profiled sum {total:.1f} ms\n")
        out.append("| part | " + " | ".join(CLASSES) + " | total ms | % | GFLOPs | GFLOP/s (conv+linear) |")
        out.append("|---|" + "---|" * (len(CLASSES) + 4))
        for part in parts:
            row = [table.get((part, c), 0.0) for c in CLASSES]
            if not sum(row):
                continue
            cells = " | ".join(f"{v:.1f}" if v else "" for v in row)
            flops = res["part_gflops"].get(part)
            dense_ms = row[0] + row[1] + row[2]
            rate = f"{flops / dense_ms * 1000:.1f}" if flops and dense_ms else ""
            flops_cell = f"{flops:.2f}" if flops else ""
            share = 100 * sum(row) / total
            out.append(f"| {part} | {cells} | {sum(row):.1f} | {share:.1f} | {flops_cell} | {rate} |")
        by_class = {c: sum(v for (_, k), v in table.items() if k == c) for c in CLASSES}
        cells = " | ".join(f"{by_class[c]:.1f}" for c in CLASSES)
        out.append(f"| **all** | {cells} | {total:.1f} | 100 |")
        out.append("| **%** | " + " | ".join(f"{100 * by_class[c] / total:.1f}" for c in CLASSES) + " | | |")
        top = sorted(res["kinds"].items(), key=lambda kv: -kv[1])[:8]
        out.append(
            "\nlargest (class, runtime node type, implementation): "
            + "; ".join(f"{c} {t} {e} {v:.1f} ms" for (c, t, e), v in top)
        )
        dense = by_class["conv"] + by_class["linear"] + by_class["dwconv"]
        summary.append(
            f"| {name} | {res['wall_ms']:.1f} | {total:.1f} | {dense:.1f} | {res['gflops']:.1f} | "
            f"{res['gflops'] / dense * 1000:.1f} | {by_class['scan']:.1f} | {by_class['layout']:.1f} | "
            f"{by_class['norm']:.1f} | {by_class['eltwise']:.1f} |"
        )
    return "\n".join([*out, "", *summary])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["rd", "pdd_fused", "efficientad", "dhkd_fused"],
        help=f"of {sorted(speed.MODELS)}; a tag after @ (pdd_fused@before) reads <ir-dir>/<name@tag> instead",
    )
    parser.add_argument("--repeats", type=int, default=7, help="interleaved profiled rounds (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="INFERENCE_NUM_THREADS")
    parser.add_argument(
        "--ir-dir", type=Path, default=Path("results/speed/irs"), help="exported IRs (reused)"
    )
    args = parser.parse_args()
    unknown = [m for m in args.models if m.split("@")[0] not in speed.MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}: choose from {sorted(speed.MODELS)}")
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = profile(args.models, args.ir_dir, args.repeats, args.threads)
    print(report(results))
    print(f"\nthreads {args.threads}, repeats {args.repeats}, load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
