// Rotary positions in the CUDA kernels (the rope ops, docs/rope.md): the tables and positions as the kernels
// read them, and the host side that checks and prepares them. E = 2 P S: S sections of 2 P channels; channel e
// of section s pairs with e + P (first half) or e - P (second half) and turns by column (e - 2 P s) mod P of
// the tables, at the row's position in section s.
#pragma once

#include "common.cuh"

namespace pom_ext {
namespace cuda {

// The tables and positions of the rope op: cos, sin (L, P) in the accumulation type, contiguous; the position
// of (sequence b, row n, section s) at pos[L.off(ps, b, n) + s * ps.e].
template <typename acc_t>
struct RopeArg {
  const acc_t* cos = nullptr;
  const acc_t* sin = nullptr;
  const int64_t* pos = nullptr;
  Strides ps;
  int64_t P = 1;
  bool uniform = false;  // P % V == 0 and 16-byte aligned tables: a thread's V channels share a section half
};

// Channel e's pair: its section, its table column and its half (sign +1: first half, paired with e + P; -1:
// second half, paired with e - P).
__device__ __forceinline__ void pair_of(int64_t e, int64_t P, int64_t& sec, int64_t& col, int& sign) {
  sec = e / (2 * P);
  const int64_t r = e - 2 * P * sec;
  sign = r < P ? 1 : -1;
  col = r < P ? r : r - P;
}

// V consecutive values of a table row, 16 bytes a load (p 16-byte aligned).
template <int V, typename acc_t>
__device__ __forceinline__ void load_acc(const acc_t* __restrict__ p, acc_t (&x)[V]) {
  constexpr int W = 16 / sizeof(acc_t);
  static_assert(V % W == 0, "V values of the accumulation type fill whole 16-byte vectors");
#pragma unroll
  for (int i = 0; i < V / W; ++i) {
    acc_t y[W];
    Pack<acc_t>::unpack(__ldg(reinterpret_cast<const uint4*>(p) + i), y);
#pragma unroll
    for (int j = 0; j < W; ++j) x[i * W + j] = y[j];
  }
}

// cos and sin of the pairs of channels e0 .. e0 + nv - 1 at row n of sequence b (0 past nv). Uniform: the
// channels share section sec0 and columns col0 .. col0 + V - 1.
template <int V, typename acc_t>
__device__ __forceinline__ void turn_factors(const RopeArg<acc_t>& ra, const Layout& L, int64_t b, int64_t n,
                                             int64_t e0, int nv, int64_t sec0, int64_t col0, acc_t (&c)[V],
                                             acc_t (&s)[V]) {
  const int64_t* prow = ra.pos + L.off(ra.ps, b, n);
  if (ra.uniform) {
    const int64_t r = prow[sec0 * ra.ps.e] * ra.P + col0;
    load_acc<V>(ra.cos + r, c);
    load_acc<V>(ra.sin + r, s);
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    c[j] = acc_t(0);
    s[j] = acc_t(0);
    if (j < nv) {
      int64_t sec, col;
      int sign;
      pair_of(e0 + j, ra.P, sec, col, sign);
      const int64_t r = prow[sec * ra.ps.e] * ra.P + col;
      c[j] = ra.cos[r];
      s[j] = ra.sin[r];
    }
  }
}

// cos and sin of a rope lane's channels at row n of sequence b (0 past nv): the lane's channels lie in one section
// half, so channel e0 + j reads column (col0 + j) / q of the tables at the position of section sec. q = 1: the
// features' tables (16 bytes a load when uniform); q > 1: the gated rope op's gate tables (L, Pg), q = P / Pg
// channels a gate.
template <int V, typename acc_t>
__device__ __forceinline__ void lane_factors(const RopeArg<acc_t>& ra, int64_t q, const Layout& L, int64_t b,
                                             int64_t n, const plan::RopeLane& r, acc_t (&c)[V], acc_t (&s)[V]) {
  if (q == 1 && ra.uniform) {
    turn_factors<V>(ra, L, b, n, r.e0, r.nv, r.sec, r.col0, c, s);
    return;
  }
  const int64_t row = ra.pos[L.off(ra.ps, b, n) + r.sec * ra.ps.e] * ra.P;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t col = q == 1 ? r.col0 + j : static_cast<int>(r.col0 + j) / static_cast<int>(q);  // < P
    c[j] = j < r.nv ? ra.cos[row + col] : acc_t(0);
    s[j] = j < r.nv ? ra.sin[row + col] : acc_t(0);
  }
}

// The values of the partner lane (l ^ 16).
template <int V, typename acc_t>
__device__ __forceinline__ void partner_values(const acc_t (&x)[V], acc_t (&y)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) y[j] = __shfl_xor_sync(0xffffffffu, x[j], 16);
}

// p~ of the lane's channels in row n of sequence b: the features of x turned with the partner's.
template <int V, int K, typename acc_t>
__device__ __forceinline__ void turned_features(const RopeArg<acc_t>& ra, const plan::RopeLane& r, const Layout& L,
                                                int64_t b, int64_t n, const ChanCoeff<K, V, acc_t>& cc,
                                                const acc_t (&x)[V], acc_t (&pt)[V]) {
  acc_t p[V], pp[V], ct[V], st[V];
#pragma unroll
  for (int j = 0; j < V; ++j) p[j] = cc.poly(j, math::act(x[j]));
  partner_values<V>(p, pp);
  lane_factors<V>(ra, 1, L, b, n, r, ct, st);
#pragma unroll
  for (int j = 0; j < V; ++j) pt[j] = ct[j] * p[j] - static_cast<acc_t>(r.sign) * st[j] * pp[j];
}

// The tables and positions of a rope call on the device: the tables in the accumulation type, the positions as
// int64 ((N, S) broadcast over the batch). Every position is checked against the tables' rows: one aminmax and a
// copy of its two values to the host, a synchronization per call (an index past the tables would read past them).
// The gated rope op adds its gate tables (gate(), the same rows: checks::gate_rope), read at the same positions.
struct RopeHost {
  at::Tensor cos, sin, gate_cos, gate_sin, pos;
  int64_t P = 1;
  bool packed = false;

  RopeHost(const char* op, const at::Tensor& h, const at::Tensor& cos_, const at::Tensor& sin_,
           const at::Tensor& positions, const c10::optional<at::Tensor>& cu)
      : packed(cu.has_value()) {
    const at::ScalarType acc = acc_type_of(h.scalar_type());
    cos = cos_.to(acc).contiguous();
    sin = sin_.to(acc).contiguous();
    P = cos.size(1);
    pos = positions.to(at::kLong);
    if (!packed && pos.dim() == 2) pos = pos.unsqueeze(0).expand({h.size(0), h.size(1), pos.size(1)});
    if (pos.numel() > 0) {
      const auto mm = at::aminmax(pos);
      const at::Tensor lohi = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();  // one copy to the host
      checks::rope_positions(op, lohi.data_ptr<int64_t>()[0], lohi.data_ptr<int64_t>()[1], cos.size(0));
    }
  }

  void gate(const at::Tensor& gcos, const at::Tensor& gsin) {
    gate_cos = gcos.to(cos.scalar_type()).contiguous();
    gate_sin = gsin.to(cos.scalar_type()).contiguous();
  }

  template <typename scalar_t>
  RopeArg<at::opmath_type<scalar_t>> arg() const {
    return arg_of<scalar_t>(cos, sin);
  }
  template <typename scalar_t>
  RopeArg<at::opmath_type<scalar_t>> gate_arg() const {
    return arg_of<scalar_t>(gate_cos, gate_sin);
  }

 private:
  template <typename scalar_t>
  RopeArg<at::opmath_type<scalar_t>> arg_of(const at::Tensor& c, const at::Tensor& s) const {
    using acc_t = at::opmath_type<scalar_t>;
    RopeArg<acc_t> a;
    a.cos = c.data_ptr<acc_t>();
    a.sin = s.data_ptr<acc_t>();
    a.pos = pos.data_ptr<int64_t>();
    a.ps = strides_of(pos, packed);
    a.P = c.size(1);
    a.uniform = a.P % Vec<scalar_t>::value == 0 && reinterpret_cast<uintptr_t>(a.cos) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(a.sin) % 16 == 0;
    return a;
  }
};

}  // namespace cuda
}  // namespace pom_ext
