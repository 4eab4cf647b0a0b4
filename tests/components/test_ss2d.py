"""SS2D: cross-scan order, v0 parameter layout, equality with a naive per-direction version, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_kd.components.ssm import SS2D, VSSBlock, cross_merge, cross_scan


def ref_scan(u, delta, A, B, C, D, delta_bias):  # noqa: N803
    """Per-step f64 recurrence with softplus(delta + bias), ungrouped B/C (batch, N, L)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))  # noqa: N806
    delta = F.softplus(delta + delta_bias.double()[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = (
            torch.exp(delta[:, :, t, None] * A) * h
            + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        )
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + u * D.double()[:, None]


def naive_ss2d(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D v0 written from the spec with explicit position orders (no cross_scan/cross_merge/grouping)."""
    x = x.double()
    xi, z = F.linear(x, m.in_proj.weight.double()).chunk(2, dim=-1)
    z = F.silu(z)
    xi = xi.permute(0, 3, 1, 2)
    xi = F.silu(F.conv2d(xi, m.conv2d.weight.double(), m.conv2d.bias.double(), padding=1, groups=m.d_inner))
    batch, di, height, width = xi.shape
    flat = xi.reshape(batch, di, height * width)
    rows = torch.arange(height * width)
    cols = rows.view(height, width).t().reshape(-1)  # column-major visiting order
    y = torch.zeros_like(flat)
    r, n = m.dt_rank, m.d_state
    for k, order in enumerate([rows, cols, rows.flip(0), cols.flip(0)]):
        u = flat[:, :, order]
        dbl = torch.einsum("bdl,cd->bcl", u, m.x_proj_weight[k].double())
        dt, b_k, c_k = dbl[:, :r], dbl[:, r : r + n], dbl[:, r + n :]
        delta = torch.einsum("brl,dr->bdl", dt, m.dt_projs_weight[k].double())
        sl = slice(k * di, (k + 1) * di)
        a_k = -torch.exp(m.A_logs[sl].double())
        y_k = ref_scan(u, delta, a_k, b_k, c_k, m.Ds[sl], m.dt_projs_bias[k])
        y[:, :, order] += y_k  # back to row-major positions
    y = y.transpose(1, 2).reshape(batch, height, width, di)
    y = F.layer_norm(y, (di,), m.out_norm.weight.double(), m.out_norm.bias.double(), m.out_norm.eps) * z
    return F.linear(y, m.out_proj.weight.double())


def test_cross_scan_orders():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0, 1, 2], [3, 4, 5]]
    xs = cross_scan(x)
    assert xs.shape == (1, 4, 1, 6)
    assert xs[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert xs[0, 1, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert xs[0, 2, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert xs[0, 3, 0].tolist() == [5, 2, 4, 1, 3, 0]


def test_cross_merge_is_adjoint_of_cross_scan():
    x = torch.randn(2, 3, 4, 5)
    ys = torch.randn(2, 4, 3, 20)
    # <cross_scan(x), ys> == <x, cross_merge(ys)>, and merge(scan(x)) sums 4 copies of x.
    lhs = (cross_scan(x) * ys).sum()
    rhs = (x.reshape(2, 3, 20) * cross_merge(ys, 4, 5)).sum()
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(cross_merge(cross_scan(x), 4, 5), 4 * x.reshape(2, 3, 20))


def test_v0_parameter_layout():
    m = SS2D(d_model=96)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (384, 96),
        "conv2d.weight": (192, 1, 3, 3),
        "conv2d.bias": (192,),
        "x_proj_weight": (4, 6 + 32, 192),
        "dt_projs_weight": (4, 192, 6),
        "dt_projs_bias": (4, 192),
        "A_logs": (4 * 192, 16),
        "Ds": (4 * 192,),
        "out_norm.weight": (192,),
        "out_norm.bias": (192,),
        "out_proj.weight": (96, 192),
    }
    torch.testing.assert_close(m.A_logs[5], torch.log(torch.arange(1.0, 17.0)))
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7
    assert dt.max() <= 0.1 + 1e-6


def test_dhkd_options():
    m = SS2D(d_model=64, d_state=16, ssm_ratio=2.0)
    assert (m.d_inner, m.dt_rank) == (128, 4)
    m = SS2D(d_model=64, d_inner=96, dt_rank=8, d_state=8)
    assert tuple(m.x_proj_weight.shape) == (4, 8 + 16, 96)
    assert m(torch.randn(2, 4, 4, 64)).shape == (2, 4, 4, 64)


@pytest.mark.parametrize(("height", "width"), [(5, 7), (8, 8)])
def test_matches_naive_version(height, width):
    torch.manual_seed(0)
    m = SS2D(d_model=8, d_state=4).eval()
    with torch.no_grad():  # non-trivial values everywhere, strong enough to matter
        m.Ds.normal_()
        m.dt_projs_bias.normal_(std=0.5)
        m.A_logs.normal_(std=0.5)
    x = torch.randn(2, height, width, 8)
    with torch.no_grad():
        y = m(x)
        ref = naive_ss2d(m, x)
    assert y.shape == x.shape
    assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_row_chunk_path_matches_generic_path():
    """Inference on a square map takes the row-chunk layout; training and non-square maps the generic one."""
    torch.manual_seed(1)
    m = SS2D(d_model=8, d_state=4).eval()
    with torch.no_grad():
        m.Ds.normal_()
        m.dt_projs_bias.normal_(std=0.5)
        m.A_logs.normal_(std=0.5)
    x = torch.randn(2, 6, 6, 8)
    conv_out = torch.zeros(2, m.d_inner, 6, 6)
    generic = m(x)  # grad enabled: generic path
    assert not m.uses_row_chunks(conv_out)
    with torch.no_grad():
        assert m.uses_row_chunks(conv_out)
        assert not m.uses_row_chunks(torch.zeros(2, m.d_inner, 6, 5))
        rows = m(x)
        ref = naive_ss2d(m, x)
    assert (rows - generic).abs().max() < 1e-5
    assert (rows.double() - ref).abs().max() / ref.abs().max() < 1e-5


def test_shapes_at_256_and_backward():
    """A 256x256 image is 64x64 tokens at VMamba stage 1 (and DHKD's HSTM-4)."""
    m = SS2D(d_model=96)
    x = torch.randn(1, 64, 64, 96)
    with torch.no_grad():
        assert m(x).shape == (1, 64, 64, 96)
    small = SS2D(d_model=16)
    xs = torch.randn(2, 6, 6, 16, requires_grad=True)
    small(xs).square().mean().backward()
    assert xs.grad is not None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


class _Head(nn.Module):
    """A small module using SS2D, NCHW in and out."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 2, stride=2)
        self.block = VSSBlock(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.proj(x).permute(0, 2, 3, 1))
        return y.permute(0, 3, 1, 2)


def test_export_onnx_and_openvino(tmp_path):
    ov = pytest.importorskip("openvino")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _Head().eval()
    with torch.no_grad():
        model.block.op.Ds.normal_()
    x = torch.randn(1, 3, 20, 24)  # 10x12 tokens: L = 120, not a multiple of the chunk
    path = tmp_path / "ss2d.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18)
        expected = model(x).numpy()
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"Scan", "Loop"}  # OpenVINO mis-runs ONNX Scan
    compiled = ov.Core().compile_model(
        ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    out = compiled(x.numpy())[0]
    assert out.shape == expected.shape
    assert abs(out - expected).max() < 1e-4
