// Fused selective scan (Mamba S6 recurrence) for OpenVINO's CPU runtime, and the same kernel for ctypes.
//
// Recurrence per channel d and state n (anomalib_kd.components.ssm.selective_scan, eq. 1-2):
//     delta_t = softplus(delta_t + delta_bias)        (bias and softplus optional)
//     h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
//     y_t     = <C_t, h_t> + D * u_t
// Layouts as in mamba-ssm's selective_scan_fn: u, delta, y (batch, d, L); A (d, N); B, C (batch, G, N, L)
// shared by d / G consecutive channels, or (batch, N, L); D, delta_bias (d,).
//
// Cross-scan mode (cross_width = w > 0, VMamba's SS2D): the L = h x w positions of u, delta, B, C and y are
// a row-major image, and the groups are VMamba's 4 scan directions (G a multiple of 4, group g has
// direction g / (G / 4)): 0 row-major, 1 column-major, 2 and 3 the same reversed. Step s of direction k
// reads and writes position p_k(s) (p_0(s) = s, p_1(s) = (s % h) w + s / h, p_2(s) = p_0(L-1-s),
// p_3(s) = p_1(L-1-s)), so the graph needs none of the flips and transposes of cross-scan / cross-merge:
// y of every direction comes back in row-major order, ready to be summed.
//
// Vectorised over channels: one work item is W consecutive channels of one group (one SIMD register of
// f32 lanes, GCC vector extensions, so the same code is AVX-512, AVX2 or SSE by -march); B_t and C_t are
// broadcast scalars, so each state update is one vector exp and two FMAs with no horizontal reduction.
// The sequence is read in chunks of W positions, moved to lanes by in-register transposes of contiguous
// loads, and the outputs transposed back (scan_block). Work items (batch x channel blocks; VMamba's 4
// directions are part of d) run in parallel on TBB, the library OpenVINO's CPU plugin runs on, so the op
// uses the plugin's thread arena.
//
// Built on first use by anomalib_kd/components/ssm/fused/build.py (g++ -O3 -march=native, per-machine
// cache). Entry points: OpenVINO extension (op + ONNX frontend conversion of anomalib_kd::SelectiveScan),
// akd_selective_scan_f32 (C ABI, eager PyTorch through ctypes) and akd_arith_floor (the same arithmetic
// with no memory traffic, for the benchmark's floor).

#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>
#include <vector>

namespace akd {

#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif

typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

static inline vf splat(float s) { return vf{} + s; }

// exp(x) = 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (Cephes expf polynomial, ~1 ulp); x clamped to
// [-87.3, 88.3] (below, the result would be denormal: ~1e-38 instead of 0, harmless in the recurrence).
static inline __attribute__((always_inline)) vf vexp(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf t = x * 1.44269504088896341f + magic;
  vi n = (vi)t - (vi)magic;
  vf nf = t - magic;
  vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi scale = (n + 127) << 23;
  return p * (vf)scale;
}

// log(x) for x in [1, 2] (Cephes logf polynomial).
static inline __attribute__((always_inline)) vf vlog_1_2(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < splat(0.707106781186547524f);
  vf ef = __builtin_convertvector(e + small, vf);  // small: -1 in the mask lanes
  m = small ? m + m - 1.0f : m - 1.0f;
  vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(v) = log(1 + v) * v / ((1 + v) - 1) keeps full
// relative precision for small v (Goldberg's trick), and is v itself where 1 + v rounds to 1.
static inline vf vsoftplus(vf x) {
  vf ax = x < splat(0.0f) ? -x : x;
  vf v = vexp(-ax);
  vf w = v + 1.0f;
  vf den = w - 1.0f;
  vi tiny = den == splat(0.0f);
  vf safe_den = tiny ? splat(1.0f) : den;
  vf l1p = tiny ? v : vlog_1_2(w) * v / safe_den;
  vf pos = x > splat(0.0f) ? x : splat(0.0f);
  return pos + l1p;
}

struct ScanArgs {
  const float* u;
  const float* delta;
  const float* A;
  const float* B;
  const float* C;
  const float* D;           // may be null
  const float* delta_bias;  // may be null
  float* y;
  const float* bt;  // B transposed to step-major (batch, G, L, N): filled by run_scan
  const float* ct;  // C likewise
  int64_t batch, d, L, N, G;
  bool softplus;
  int64_t cross_width;  // 0: plain scan; w > 0: SS2D cross-scan over an (L / w) x w image (see top)
};

// In-register W x W transpose (r[i] lane j becomes r[j] lane i): log2(W) stages, each swapping the
// off-diagonal M x M blocks of every 2M x 2M block with two-source shuffles (vpermt2ps on AVX-512).
template <int M, int... J>
constexpr vi swap_low(std::integer_sequence<int, J...>) {
  return vi{((J & M) ? W + J - M : J)...};
}
template <int M, int... J>
constexpr vi swap_high(std::integer_sequence<int, J...>) {
  return vi{((J & M) ? W + J : J + M)...};
}
template <int M>
static inline __attribute__((always_inline)) void swap_blocks(vf* r) {
  constexpr vi low = swap_low<M>(std::make_integer_sequence<int, W>{});
  constexpr vi high = swap_high<M>(std::make_integer_sequence<int, W>{});
  for (int i = 0; i < W; ++i)
    if (!(i & M)) {
      const vf x = r[i], z = r[i + M];
      r[i] = __builtin_shuffle(x, z, low);
      r[i + M] = __builtin_shuffle(x, z, high);
    }
}
static inline __attribute__((always_inline)) void transpose(vf* r) {
  if constexpr (W == 16) swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
}

// cw (<= W) consecutive positions of nv channel rows (L floats apart) from src, to lanes: out[c * stride]
// is position c with one lane a channel (lanes >= nv zero).
static inline void load_lanes(const float* src, int64_t L, int nv, int cw, vf* out, int64_t stride) {
  vf r[W];
  for (int k = 0; k < W; ++k) {
    r[k] = vf{};
    if (k < nv) std::memcpy(&r[k], src + k * L, cw * sizeof(float));
  }
  transpose(r);
  for (int c = 0; c < cw; ++c) out[c * stride] = r[c];
}

// The inverse of load_lanes: lanes of in[c * stride] (c < cw) back to nv channel rows of dst.
static inline void store_lanes(const vf* in, int64_t stride, float* dst, int64_t L, int nv, int cw) {
  vf r[W];
  for (int c = 0; c < W; ++c) r[c] = c < cw ? in[c * stride] : vf{};
  transpose(r);
  for (int k = 0; k < nv; ++k) std::memcpy(dst + k * L, &r[k], cw * sizeof(float));
}

// One work item: batch b, channels [c0, c0 + nv) of group g (nv <= W; missing lanes are zero: with
// u = A = 0 their state stays 0, and they are never written back).
//
// The sequence is read as an image of `rows` x w positions (plain scan: one row of L) in chunks of W
// columns: one row of them for the row-major directions (plain, 0, 2), every row for the column-major
// ones (1, 3). A chunk is transposed to lanes (one vector a position) with in-register transposes of
// contiguous loads, scanned in the direction's order, and its outputs transposed back: hardware gathers
// (what a compiler makes of a per-lane strided loop) cost more than the recurrence on some CPUs.
template <int NS>
static void scan_block(const ScanArgs& a, int64_t b, int64_t c0, int nv, int64_t g) {
  const int64_t N = NS > 0 ? NS : a.N;
  const int64_t L = a.L;
  constexpr int NMAX = NS > 0 ? NS : 1;
  vf h_fixed[NMAX];
  vf a_fixed[NMAX];
  std::vector<vf> h_dyn, a_dyn;
  vf* h = h_fixed;
  vf* av = a_fixed;
  if (NS == 0) {
    h_dyn.assign(N, vf{});
    a_dyn.assign(N, vf{});
    h = h_dyn.data();
    av = a_dyn.data();
  }
  for (int64_t n = 0; n < N; ++n) {
    h[n] = vf{};
    vf t{};
    for (int k = 0; k < nv; ++k) t[k] = a.A[(c0 + k) * N + n];
    av[n] = t;
  }
  vf bias{}, dskip{};
  for (int k = 0; k < nv; ++k) {
    if (a.delta_bias) bias[k] = a.delta_bias[c0 + k];
    if (a.D) dskip[k] = a.D[c0 + k];
  }
  const float* bt = a.bt + (b * a.G + g) * L * N;  // step-major: B_t is N contiguous floats
  const float* ct = a.ct + (b * a.G + g) * L * N;
  const int64_t base = (b * a.d + c0) * L;
  const int direction = a.cross_width > 0 ? static_cast<int>(g / (a.G / 4)) : 0;
  const int64_t w = a.cross_width > 0 ? a.cross_width : L;  // image width
  const int64_t rows = L / w;                                // image height
  const bool by_column = direction & 1, reversed = direction >= 2;
  const int64_t chunk_rows = by_column ? rows : 1;
  const int64_t column_chunks = (w + W - 1) / W;
  const int64_t chunks = column_chunks * (by_column ? 1 : rows);
  std::vector<vf> ub(W * chunk_rows), db(W * chunk_rows), yb(W * chunk_rows);
  for (int64_t q = 0; q < chunks; ++q) {
    const int64_t chunk = reversed ? chunks - 1 - q : q;
    const int64_t row0 = by_column ? 0 : chunk / column_chunks;
    const int64_t j0 = (chunk % column_chunks) * W;
    const int cw = static_cast<int>(std::min<int64_t>(W, w - j0));
    for (int64_t r = 0; r < chunk_rows; ++r) {  // buffer index of (row r, column c): c * chunk_rows + r
      const int64_t offset = base + (row0 + r) * w + j0;
      load_lanes(a.u + offset, L, nv, cw, ub.data() + r, chunk_rows);
      load_lanes(a.delta + offset, L, nv, cw, db.data() + r, chunk_rows);
    }
    const int64_t steps = cw * chunk_rows;
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t i = reversed ? steps - 1 - s : s;  // column-major in the chunk = scan order
      const int64_t position = (row0 + i % chunk_rows) * w + j0 + i / chunk_rows;
      vf dt = db[i] + bias;
      if (a.softplus) dt = vsoftplus(dt);
      const vf x = dt * ub[i];
      vf acc = dskip * ub[i];
      const float* bn = bt + position * N;
      const float* cn = ct + position * N;
#pragma GCC unroll 16
      for (int64_t n = 0; n < N; ++n) {
        h[n] = vexp(dt * av[n]) * h[n] + x * bn[n];
        acc += h[n] * cn[n];
      }
      yb[i] = acc;
    }
    for (int64_t r = 0; r < chunk_rows; ++r)
      store_lanes(yb.data() + r, chunk_rows, a.y + base + (row0 + r) * w + j0, L, nv, cw);
  }
}

static void run_scan(ScanArgs a) {
  // B and C to step-major once (shared by every channel block of a group), so the inner loop reads
  // B_t and C_t as N contiguous floats.
  std::vector<float> bt(static_cast<size_t>(a.batch * a.G * a.L * a.N)), ct(bt.size());
  tbb::parallel_for(int64_t(0), a.batch * a.G, [&](int64_t bg) {
    const float* bsrc = a.B + bg * a.N * a.L;
    const float* csrc = a.C + bg * a.N * a.L;
    float* bdst = bt.data() + bg * a.L * a.N;
    float* cdst = ct.data() + bg * a.L * a.N;
    for (int64_t n = 0; n < a.N; ++n)
      for (int64_t t = 0; t < a.L; ++t) {
        bdst[t * a.N + n] = bsrc[n * a.L + t];
        cdst[t * a.N + n] = csrc[n * a.L + t];
      }
  });
  a.bt = bt.data();
  a.ct = ct.data();
  const int64_t dg = a.d / a.G;
  const int64_t blocks_per_group = (dg + W - 1) / W;
  const int64_t items = a.batch * a.G * blocks_per_group;
  tbb::parallel_for(int64_t(0), items, [&](int64_t i) {
    const int64_t blk = i % blocks_per_group;
    const int64_t g = (i / blocks_per_group) % a.G;
    const int64_t b = i / (blocks_per_group * a.G);
    const int64_t c0 = g * dg + blk * W;
    const int nv = static_cast<int>(std::min<int64_t>(W, dg - blk * W));
    if (a.N == 16)
      scan_block<16>(a, b, c0, nv, g);
    else
      scan_block<0>(a, b, c0, nv, g);
  });
}

// The recurrence's arithmetic with no loads or stores: `updates` state updates (exp + 2 FMA each, plus
// the readout FMA), spread over the same TBB workers. A lower bound for any kernel on this machine.
static float arith_floor(int64_t updates) {
  const int64_t vectors = updates / W;
  const int64_t chunks = 256;
  std::vector<float> sink(chunks, 0.0f);
  tbb::parallel_for(int64_t(0), chunks, [&](int64_t c) {
    const int64_t count = vectors / chunks / 16;
    vf h[16], av[16];
    for (int n = 0; n < 16; ++n) {
      h[n] = splat(0.001f * n);
      av[n] = splat(-1.0f - n);
    }
    vf dt = splat(0.01f + 1e-6f * c), x = splat(0.5f), acc{};
    for (int64_t i = 0; i < count; ++i) {
      for (int n = 0; n < 16; ++n) {
        h[n] = vexp(dt * av[n]) * h[n] + x * 0.25f;
        acc += h[n] * 0.5f;
      }
      dt += 1e-9f;
    }
    float s = 0.0f;
    for (int k = 0; k < W; ++k) s += acc[k];
    sink[c] = s;
  });
  float total = 0.0f;
  for (float s : sink) total += s;
  return total;
}

// ------------------------------------------------------------------------------------ OpenVINO op

class SelectiveScan : public ov::op::Op {
 public:
  OPENVINO_OP("SelectiveScan", "anomalib_kd");

  SelectiveScan() = default;
  SelectiveScan(const ov::OutputVector& args, bool delta_softplus, int64_t cross_width = 0)
      : Op(args), m_softplus(delta_softplus), m_cross_width(cross_width) {
    constructor_validate_and_infer_types();
  }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == 7,
                          "SelectiveScan takes 7 inputs (u, delta, A, B, C, D, delta_bias), got ",
                          get_input_size());
    for (size_t i = 0; i < 7; ++i) {
      const auto& et = get_input_element_type(i);
      NODE_VALIDATION_CHECK(this, et.is_dynamic() || et == ov::element::f32,
                            "SelectiveScan input ", i, " must be f32, got ", et);
    }
    const auto& u = get_input_partial_shape(0);
    NODE_VALIDATION_CHECK(this, u.rank().is_dynamic() || u.rank().get_length() == 3,
                          "SelectiveScan u must be (batch, d, L), got ", u);
    const auto& bsh = get_input_partial_shape(3);
    NODE_VALIDATION_CHECK(this,
                          bsh.rank().is_dynamic() || bsh.rank().get_length() == 3 || bsh.rank().get_length() == 4,
                          "SelectiveScan B must be (batch, G, N, L) or (batch, N, L), got ", bsh);
    set_output_type(0, ov::element::f32, u);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
    return std::make_shared<SelectiveScan>(new_args, m_softplus, m_cross_width);
  }

  bool visit_attributes(ov::AttributeVisitor& visitor) override {
    visitor.on_attribute("delta_softplus", m_softplus);
    visitor.on_attribute("cross_width", m_cross_width);
    return true;
  }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Shape& us = inputs[0].get_shape();
    const ov::Shape& as = inputs[2].get_shape();
    const ov::Shape& bs = inputs[3].get_shape();
    OPENVINO_ASSERT(us.size() == 3 && inputs[1].get_shape() == us, "SelectiveScan: u/delta shapes differ");
    OPENVINO_ASSERT(as.size() == 2 && as[0] == us[1], "SelectiveScan: A must be (d, N)");
    OPENVINO_ASSERT(inputs[4].get_shape() == bs, "SelectiveScan: B and C shapes differ");
    const int64_t N = static_cast<int64_t>(as[1]);
    const int64_t G = bs.size() == 4 ? static_cast<int64_t>(bs[1]) : 1;
    OPENVINO_ASSERT(bs[0] == us[0] && bs[bs.size() - 1] == us[2] && static_cast<int64_t>(bs[bs.size() - 2]) == N,
                    "SelectiveScan: B must be (batch, G, N, L) or (batch, N, L)");
    OPENVINO_ASSERT(G > 0 && us[1] % G == 0, "SelectiveScan: d must be a multiple of G");
    OPENVINO_ASSERT(m_cross_width == 0 || (G % 4 == 0 && m_cross_width > 0 && us[2] % m_cross_width == 0),
                    "SelectiveScan: cross_width needs G a multiple of 4 (the scan directions) and L a multiple "
                    "of cross_width, got G ", G, ", L ", us[2], ", cross_width ", m_cross_width);
    OPENVINO_ASSERT(ov::shape_size(inputs[5].get_shape()) == us[1] && ov::shape_size(inputs[6].get_shape()) == us[1],
                    "SelectiveScan: D and delta_bias must have d elements");
    outputs[0].set_shape(us);
    ScanArgs a{inputs[0].data<const float>(), inputs[1].data<const float>(), inputs[2].data<const float>(),
               inputs[3].data<const float>(), inputs[4].data<const float>(), inputs[5].data<const float>(),
               inputs[6].data<const float>(), outputs[0].data<float>(), nullptr, nullptr, static_cast<int64_t>(us[0]),
               static_cast<int64_t>(us[1]), static_cast<int64_t>(us[2]), N, G, m_softplus, m_cross_width};
    if (ov::shape_size(us) > 0) run_scan(a);
    return true;
  }

 private:
  bool m_softplus = false;
  int64_t m_cross_width = 0;
};

}  // namespace akd

// ------------------------------------------------------------------------------------ entry points

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>(
    {std::make_shared<ov::OpExtension<akd::SelectiveScan>>(),
     std::make_shared<ov::frontend::onnx::ConversionExtension>(
         "SelectiveScan", "anomalib_kd", [](const ov::frontend::NodeContext& ctx) -> ov::OutputVector {
           ov::OutputVector inputs;
           for (size_t i = 0; i < ctx.get_input_size(); ++i) inputs.push_back(ctx.get_input(static_cast<int>(i)));
           const bool softplus = ctx.get_attribute<int64_t>("delta_softplus", 0) != 0;
           const int64_t cross_width = ctx.get_attribute<int64_t>("cross_width", 0);
           return {std::make_shared<akd::SelectiveScan>(inputs, softplus, cross_width)->output(0)};
         })}));

extern "C" {

// The kernel on contiguous f32 buffers (D, delta_bias may be null). Returns the SIMD width used, or -1
// (nothing computed) for a cross_width the shapes do not allow.
__attribute__((visibility("default"))) int akd_selective_scan_f32(const float* u, const float* delta,
                                                                  const float* A, const float* B,
                                                                  const float* C, const float* D,
                                                                  const float* delta_bias, float* y,
                                                                  int64_t batch, int64_t d, int64_t L,
                                                                  int64_t N, int64_t G, int softplus,
                                                                  int64_t cross_width) {
  if (cross_width < 0 || (cross_width > 0 && (G % 4 != 0 || L % cross_width != 0))) return -1;
  akd::ScanArgs a{u, delta, A, B, C, D, delta_bias, y, nullptr, nullptr, batch, d, L, N, G, softplus != 0,
                  cross_width};
  if (batch * d * L > 0) akd::run_scan(a);
  return akd::W;
}

__attribute__((visibility("default"))) float akd_arith_floor(int64_t updates) {
  return akd::arith_floor(updates);
}

__attribute__((visibility("default"))) int akd_simd_width() { return akd::W; }
}
