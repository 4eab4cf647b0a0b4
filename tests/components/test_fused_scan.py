"""Fused selective scan (C++ OpenVINO extension) vs the f64 per-step reference, export, and fallback.

The extension is compiled once per test session into a temporary cache (about 15-20 s of g++ here).
Without a C++ compiler the tests that need the library are skipped, saying so; the fallback tests run
everywhere.
"""

from __future__ import annotations

import csv
import importlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalib_kd.components.ssm import SS2D, selective_scan
from anomalib_kd.components.ssm.fused import (
    add_extension,
    export_openvino,
    extension_path,
    fused_selective_scan,
    kernel_library,
    onnx_translation_table,
    read_model,
    use_fused_scan,
)

from ..helpers import LINE_INSPECTION, load_script, make_tasks
from .test_selective_scan import make_inputs, reference_scan, rel_err

build = importlib.import_module("anomalib_kd.components.ssm.fused.build")
ops = importlib.import_module("anomalib_kd.components.ssm.fused.ops")
ov = pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
INPUT_NAMES = ["u", "delta", "A", "B", "C", "D", "delta_bias"]
NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the extension once per session into a fresh temporary cache (never the user's)."""
    if NO_COMPILER:
        pytest.skip(
            "no C++ compiler (g++ or $CXX): the fused scan cannot be built; the fallback tests cover this"
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALIB_KD_CACHE_DIR", str(tmp_path_factory.mktemp("akd_cache")))
        mp.delenv("ANOMALIB_KD_FUSED_SCAN", raising=False)
        build.reset()
        start = time.perf_counter()
        path = extension_path()
        elapsed = time.perf_counter() - start
        # A compiler is here, so a failed build is a bug, not a reason to skip.
        assert path is not None, f"fused scan build failed: {build.unavailable_reason()}"
        print(f"\nfused scan extension built in {elapsed:.1f} s: {path}")
    return path


@pytest.fixture
def with_library(library: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's library as this test's extension (other tests may have reset the build state)."""
    monkeypatch.setattr(build, "_state", {"path": library, "reason": ""})
    return library


def scan_onnx(shapes: list[tuple[int, ...]], softplus: bool, cross_width: int = 0) -> bytes:
    """A one-node ONNX model: the custom-domain ``anomalib_kd::SelectiveScan`` the fused export writes."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
        for n, s in zip(INPUT_NAMES, shapes, strict=True)
    ]
    node = helper.make_node(
        "SelectiveScan", INPUT_NAMES, ["y"], domain="anomalib_kd", delta_softplus=int(softplus),
        **({"cross_width": cross_width} if cross_width else {}),
    )  # fmt: skip
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shapes[0]))
    graph = helper.make_graph([node], "scan", inputs, [output])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("anomalib_kd", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def run_openvino_op(
    library: Path,
    tmp_path: Path,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,  # noqa: N803
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    D: torch.Tensor | None = None,  # noqa: N803
    delta_bias: torch.Tensor | None = None,
    softplus: bool = False,
    cross_width: int = 0,
) -> torch.Tensor:
    """The OpenVINO op (through the ONNX frontend conversion) on one input set; absent D/bias as zeros."""
    zeros = torch.zeros(u.shape[1])
    args = [u, delta, A, B, C, zeros if D is None else D, zeros if delta_bias is None else delta_bias]
    path = tmp_path / "scan.onnx"
    path.write_bytes(scan_onnx([tuple(a.shape) for a in args], softplus, cross_width))
    model = ov.convert_model(str(path), extension=str(library))
    assert [op.get_type_name() for op in model.get_ordered_ops()].count("SelectiveScan") == 1
    core = ov.Core()
    add_extension(core)
    compiled = core.compile_model(model, "CPU", F32)
    return torch.from_numpy(compiled([a.float().numpy() for a in args])[0])


@pytest.mark.parametrize(
    ("batch", "d", "n", "seq_len", "groups"),
    [
        (1, 4, 3, 1, 1),  # a single step
        (2, 8, 4, 37, 2),  # odd length
        (1, 6, 5, 64, None),  # ungrouped (batch, N, L) B/C
        (2, 12, 16, 300, 4),  # VMamba-like grouping (N = 16: the unrolled kernel)
        (1, 40, 16, 131, 2),  # 20 channels a group: a partial channel block at each group's end
        (1, 16, 16, 1024, 4),
    ],
)
def test_openvino_op_matches_reference(with_library, tmp_path, batch, d, n, seq_len, groups):
    u, delta, A, B, C, D, delta_bias = make_inputs(batch, d, n, seq_len, groups)  # noqa: N806
    ref = reference_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
    y = run_openvino_op(with_library, tmp_path, u, delta, A, B, C, D, delta_bias, softplus=True)
    assert y.shape == u.shape
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize(
    ("use_d", "use_bias", "softplus"),
    [(False, False, False), (True, False, False), (False, True, True), (True, True, False)],
)
def test_openvino_op_optional_terms(with_library, tmp_path, use_d, use_bias, softplus):
    u, delta, A, B, C, D, delta_bias = make_inputs(2, 8, 16, 77, 2)  # noqa: N806
    delta = delta.abs() * 0.3  # delta >= 0 without softplus, as the recurrence assumes
    D = D if use_d else None  # noqa: N806
    delta_bias = delta_bias.abs() if use_bias else None
    ref = reference_scan(u, delta, A, B, C, D, delta_bias, softplus)
    y = run_openvino_op(with_library, tmp_path, u, delta, A, B, C, D, delta_bias, softplus)
    assert rel_err(y, ref) <= 1e-5
    # The eager operator (the same kernel through ctypes) takes the optional arguments as None.
    assert rel_err(fused_selective_scan(u, delta, A, B, C, D, delta_bias, softplus), ref) <= 1e-5


def _to_scan_order(t: torch.Tensor, direction: int, height: int, width: int) -> torch.Tensor:
    """Last axis (a row-major h x w image) into direction ``direction``'s scan order, by image ops."""
    if direction % 2:
        t = t.reshape(*t.shape[:-1], height, width).transpose(-1, -2).reshape(t.shape)
    return t.flip(-1) if direction >= 2 else t


def _from_scan_order(t: torch.Tensor, direction: int, height: int, width: int) -> torch.Tensor:
    t = t.flip(-1) if direction >= 2 else t
    if direction % 2:
        t = t.reshape(*t.shape[:-1], width, height).transpose(-1, -2).reshape(t.shape)
    return t


def cross_reference(u, delta, A, B, C, D, delta_bias, height, width):  # noqa: N803
    """SS2D's four directions, each unfolded with flips/transposes and scanned by the f64 reference."""
    groups = B.shape[1]
    per_dir_groups, per_group = groups // 4, u.shape[1] // groups
    chans = per_dir_groups * per_group
    out = []
    for k in range(4):
        c, g = slice(k * chans, (k + 1) * chans), slice(k * per_dir_groups, (k + 1) * per_dir_groups)
        seq = [_to_scan_order(t, k, height, width) for t in (u[:, c], delta[:, c], B[:, g], C[:, g])]
        y = reference_scan(seq[0], seq[1], A[c], seq[2], seq[3], D[c], delta_bias[c], delta_softplus=True)
        out.append(_from_scan_order(y, k, height, width))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    ("batch", "d", "n", "height", "width", "groups"),
    [
        (1, 4, 3, 1, 1, 4),  # a single pixel
        (1, 8, 4, 3, 5, 4),  # non-square map
        (2, 24, 16, 7, 7, 4),  # 6 channels a direction: partial SIMD block
        (1, 64, 16, 16, 12, 8),  # two groups per direction
        (1, 32, 16, 33, 65, 4),  # L = 2145: many chunks, odd sides
    ],
)
def test_cross_scan_mode_matches_reference(with_library, tmp_path, batch, d, n, height, width, groups):
    """cross_width: the op scans the 4 SS2D directions itself; OpenVINO op, eager kernel and the
    no-kernel fallback all equal the flip/transpose + f64 reference."""
    args = make_inputs(batch, d, n, height * width, groups, seed=7)
    ref = cross_reference(*args, height, width)
    y = run_openvino_op(with_library, tmp_path, *args, softplus=True, cross_width=width)
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(fused_selective_scan(*args, delta_softplus=True, cross_width=width), ref) <= 1e-5
    fallback = ops._cross_scan_torch(*args, delta_softplus=True, cross_width=width)
    assert rel_err(fallback, ref) <= 1e-5


def test_cross_scan_mode_bad_arguments(with_library, tmp_path):
    u, delta, A, B, C, D, bias = make_inputs(1, 8, 4, 12, 4)  # noqa: N806
    with pytest.raises(ValueError, match="divisor"):
        fused_selective_scan(u, delta, A, B, C, D, bias, True, cross_width=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        fused_selective_scan(u, delta, A, B[:, :2], C[:, :2], D, bias, True, cross_width=4)
    with pytest.raises(RuntimeError, match="cross_width"):  # the OpenVINO op checks too
        run_openvino_op(with_library, tmp_path, u, delta, A, B, C, D, bias, softplus=True, cross_width=5)


def test_openvino_op_long_sequence(with_library, tmp_path):
    """L = 4096 with strong decays and softplus over a wide input range (negative and large deltas)."""
    u, delta, A, B, C, D, delta_bias = make_inputs(1, 8, 16, 4096, 2, seed=3)  # noqa: N806
    A = A * 4  # noqa: N806
    delta = delta * 8  # softplus inputs from about -25 to 20: both branches of the vector softplus
    ref = reference_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
    y = run_openvino_op(with_library, tmp_path, u, delta, A, B, C, D, delta_bias, softplus=True)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-5


def test_eager_backend_fused(with_library):
    args = make_inputs(2, 24, 16, 200, 4, seed=5)
    ref = reference_scan(*args, delta_softplus=True)
    y = selective_scan(*args, delta_softplus=True, backend="fused")
    assert rel_err(y, ref) <= 1e-5
    with use_fused_scan() as active:  # backend="auto" inside the context, no autograd: the kernel
        assert active
        y_auto = selective_scan(*args, delta_softplus=True)
    torch.testing.assert_close(y_auto, y, rtol=0, atol=0)


def test_autograd_keeps_chunked_scan(with_library):
    """Inside use_fused_scan, inputs that need gradients still run the differentiable chunked scan."""
    leaves = [t.clone().requires_grad_() for t in make_inputs(1, 8, 4, 30, 2)]
    with use_fused_scan():
        y = selective_scan(*leaves, delta_softplus=True)
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)


def test_ss2d_fused_eager_and_ir_match_portable(with_library, tmp_path):
    """One SS2D module: fused eager == portable eager, and its fused OpenVINO IR within 1e-3."""
    torch.manual_seed(0)
    module = SS2D(d_model=24, d_state=16).eval()
    x = torch.randn(1, 12, 10, 24)  # non-square: the cross-scan mode's column order matters
    with torch.no_grad():
        expected = module(x)
        with use_fused_scan():
            fused_eager = module(x)
    assert rel_err(fused_eager, expected.double()) <= 1e-5

    onnx_path = tmp_path / "ss2d.onnx"
    with use_fused_scan(), torch.no_grad():
        torch.onnx.export(module, (x,), str(onnx_path), dynamo=True, opset_version=18,
                          custom_translation_table=onnx_translation_table())  # fmt: skip
    nodes = onnx.load(str(onnx_path)).graph.node
    assert [n.op_type for n in nodes if n.domain == "anomalib_kd"] == ["SelectiveScan"]
    scan_node = next(n for n in nodes if n.domain == "anomalib_kd")
    assert {a.name: a.i for a in scan_node.attribute}["cross_width"] == 10  # the 4 directions in the op
    xml = tmp_path / "ss2d.xml"
    ov.save_model(ov.convert_model(str(onnx_path), extension=str(with_library)), xml, compress_to_fp16=False)
    compiled = ov.Core().compile_model(read_model(xml), "CPU", F32)
    out = torch.from_numpy(compiled(x.numpy())[0])
    assert (out - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()


def test_default_export_stays_portable():
    """Without use_fused_scan, the traced graph holds no fused operator (no extension needed to load it)."""
    torch.manual_seed(0)
    module = SS2D(d_model=8, d_state=4).eval()
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("anomalib_kd" in t for t in targets)


class _TinyScanModule(torch.nn.Module):
    """An anomalib-like module with ``to_onnx``/``to_openvino`` (the export mixin's signatures)."""

    def __init__(self) -> None:
        super().__init__()
        self.ss2d = SS2D(d_model=8, d_state=4).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ss2d(x)

    def to_onnx(self, root, name, input_size, **kwargs):
        path = Path(root) / f"{name}.onnx"
        torch.onnx.export(self, (torch.randn(1, *input_size, 8),), str(path), dynamo=True, **kwargs)
        return path

    def to_openvino(self, root, name, input_size, compression_type=None, datamodule=None, metric=None,
                    task=None, max_drop=0.01, ov_kwargs=None, onnx_kwargs=None):  # fmt: skip
        assert compression_type is None, "the tiny module is exported in f32 only"
        xml = Path(root) / "weights" / "openvino" / f"{name}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(self.to_onnx(root, name, input_size, **(onnx_kwargs or {}))), xml)
        return xml


def test_fused_ir_without_extension_names_the_file(with_library, tmp_path):
    torch.manual_seed(0)
    model = _TinyScanModule().eval()
    xml = export_openvino(model, tmp_path, (6, 6), fused=True)
    with pytest.raises(RuntimeError, match=r"add_extension\('.*libanomalib_kd_fused_scan\.so'\)"):
        ov.Core().read_model(str(xml))  # plain OpenVINO: its error carries the node name we set
    compiled = ov.Core().compile_model(read_model(xml), "CPU", F32)
    x = torch.randn(1, 6, 6, 8)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(compiled(x.numpy())[0]), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def broken_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No usable compiler and an empty cache: the build must fail."""
    monkeypatch.setenv("ANOMALIB_KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(build, "_state", {})


def test_fallback_is_logged_once_and_runs_pure_scan(broken_compiler, caplog):
    caplog.set_level(logging.WARNING, logger=build.__name__)
    args = make_inputs(1, 8, 4, 21, 2)
    expected = selective_scan(*args, delta_softplus=True, backend="torch")
    with use_fused_scan() as active:
        y = selective_scan(*args, delta_softplus=True)
    assert not active
    assert kernel_library() is None and extension_path() is None
    assert torch.equal(y, expected)
    # backend="fused" (the torch operator) falls back to the same pure scan.
    torch.testing.assert_close(selective_scan(*args, delta_softplus=True, backend="fused"), expected)
    warnings = [r for r in caplog.records if "Fused selective scan unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert "no-such-compiler" in warnings[0].getMessage()


def test_fallback_export_and_helpers(broken_compiler, tmp_path):
    """Without the extension: fused export writes the portable IR, and the helpers say why they fail."""
    torch.manual_seed(0)
    xml = export_openvino(_TinyScanModule().eval(), tmp_path / "export", (4, 4), fused=True)
    assert 'type="SelectiveScan"' not in xml.read_text()
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        add_extension(ov.Core())
    fused_xml = tmp_path / "fused.xml"
    fused_xml.write_text(
        '<net><layers><layer id="0" type="SelectiveScan" version="anomalib_kd"/></layers></net>'
    )
    with pytest.raises(RuntimeError, match="add_extension"):
        read_model(fused_xml)


def test_disabled_by_environment(monkeypatch, caplog):
    monkeypatch.setenv("ANOMALIB_KD_FUSED_SCAN", "0")
    monkeypatch.setattr(build, "_state", {})
    caplog.set_level(logging.WARNING, logger=build.__name__)
    assert extension_path() is None
    assert "ANOMALIB_KD_FUSED_SCAN=0" in caplog.text


def test_cache_is_reused(library, monkeypatch):
    """A second process-level decision finds the cached library instead of compiling again."""
    monkeypatch.setenv("ANOMALIB_KD_CACHE_DIR", str(library.parents[2]))
    monkeypatch.setattr(build, "_state", {})
    start = time.perf_counter()
    assert extension_path() == library
    assert "build_s" not in build._state
    assert time.perf_counter() - start < 5


@pytest.mark.heavy
@pytest.mark.parametrize("model_name", ["DHKD", "PDD"])
def test_fused_ir_of_models_matches_eager(with_library, tmp_path, model_name):
    """PDD and DHKD (random weights) exported with fused=True: scores and maps within 1e-3 of eager.

    Heavy: the exports alone take 1.5 min (DHKD at 64 px) to 5 min (PDD) on 2 busy cores.
    """
    import anomalib_kd

    torch.manual_seed(0)
    kwargs = {"image_size": 64} if model_name == "DHKD" else {}
    model = getattr(anomalib_kd, model_name)(pre_trained=False, **kwargs).eval()
    size = 64
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    xml = export_openvino(model, tmp_path, (size, size), fused=True)
    assert 'type="SelectiveScan"' in xml.read_text()
    outputs = ov.Core().compile_model(read_model(xml), "CPU", F32)(x.numpy())
    for i, name in enumerate(k for k, v in expected._asdict().items() if v is not None):
        ref = getattr(expected, name).float()
        out = torch.from_numpy(outputs[i]).float()
        assert (out - ref).abs().max().item() <= 1e-3 * max(ref.abs().max().item(), 1e-6), name


@pytest.mark.heavy
def test_int8_ptq_fused_export_ranks_like_f32(with_library, tmp_path):
    """PDD's INT8_PTQ export with the fused scan: the op stays (float), the rest is quantised, and the
    tiny model's scores rank like eager f32 (the INT8 tests' tolerance, tests/components/test_export.py);
    the line runner (examples/line_inspection.py) reads that IR and gives its scores.

    Heavy: a short PDD training and an NNCF pass, about a minute on 2 cores.
    """
    from anomalib.deploy import CompressionType

    from .test_export import SIZE, assert_ranks_like_f32, tiny_test_images, trained_tiny_model

    tasks_root = make_tasks(tmp_path / "tasks", names=("alpha", "beta"), sizes=(SIZE,), n_test=6)
    model, datamodule = trained_tiny_model("pdd", tasks_root, tmp_path)
    xml = export_openvino(
        model, tmp_path / "int8", (SIZE, SIZE), fused=True, compression_type=CompressionType.INT8_PTQ,
        datamodule=datamodule,
    )  # fmt: skip
    text = xml.read_text()
    assert 'type="SelectiveScan"' in text
    assert 'type="FakeQuantize"' in text, "nothing was quantised"
    compiled = ov.Core().compile_model(read_model(xml), "CPU", F32)
    files, images = tiny_test_images(tasks_root)
    int8 = np.array([float(compiled(image[None].numpy())["pred_score"].reshape(-1)[0]) for image in images])
    assert_ranks_like_f32("pdd (fused scan)", model, int8, images)

    # The line runner reads the fused IR (adds the extension) and scores the files like the compiled IR.
    folder = tmp_path / "line"
    folder.mkdir()
    for file in files:
        shutil.copy(file, folder / f"{file.parent.name}_{file.name}")
    summary = load_script(LINE_INSPECTION).run(xml, folder, tmp_path / "line_out")
    assert summary.inspected == len(files) and not summary.unreadable
    with (tmp_path / "line_out" / "verdicts.csv").open() as handle:
        by_name = {Path(row["source"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    line = np.array([by_name[f"{file.parent.name}_{file.name}"] for file in files])
    np.testing.assert_allclose(line, int8, rtol=1e-4, atol=1e-5)
