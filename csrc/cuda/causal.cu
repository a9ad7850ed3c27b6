// Causal and block-causal prefix means (poly_causal), the gated mixer (poly_causal_gated) and their
// backward on CUDA.
//
// Rows are cut into chunks (plan.h; chunks never cross a sequence). Grid (chunks, channel tiles), block
// (TX, 1), V channels per thread. Two plans: whole blocks (chunks of R rows, R a multiple of the block size F,
// F = 1 included), or, for blocks larger than the rows a chunk should hold, split blocks (each F-block cut
// into cpb chunks), so that large blocks keep the grid full.
// Forward:
//  1. causal_tot: Kahan sum of p over each chunk (whole blocks: each that has a successor) -> tot (fp64).
//     Reads h once.
//  2. launch_chunk_scan: exclusive scan of the totals per (sequence, channel) in fp64.
//  3. causal_scan: whole blocks: every chunk rescans from its carry (Kahan-compensated fp32, fp64 for double);
//     F = 1 writes (S / (n + 1)) per row, F > 1 the block's mean to each of its rows; reads h once more.
//     Split blocks: a block's mean is its last chunk's carry plus total over its end row, written to the
//     chunk's rows without reading h.
//  With one chunk per sequence (dense, whole blocks), passes 1-2 are skipped.
// Backward (g: grad of the output; G_j = sum of g over F-block j / end_j):
//  1. causal_bwd_tot: sum of G over each chunk (whole blocks: each that has a predecessor). Reads g.
//  2. suffix scan of the totals.
//  3. causal_bwd_scan: whole blocks: F-blocks in reverse, gbar = running suffix sum of G (reads g and h); split
//     blocks: gbar = the reverse carry plus total of the block's first chunk (reads h only); grad_h =
//     gbar * dp/dh, grad_coeff partials per chunk, reduced in chunk order (reduce_coeff_grad).
// Weighted (poly_causal_weighted, a WeightArg): row n adds w_n p to the sums and reads them times inv_n (1 / the
// weight of the rows it sees, from ATen prefix sums, weight_grad.h) in place of 1 / (n + 1) or 1 / end; the
// backward scans g * inv and scales row n's share by w_n.
// Gated (hs = [h | pre], y = hardsigmoid(pre + bias) * H, one gate per q = E / S channels): the same kernels
// with a GateArg: the forward scales each output row by its gate, the backward scans g * gate. A third
// backward pass (causal_gate_bwd) recomputes H from forward carries and writes the gate's gradient:
// directly for q = 1 (with per-chunk bias partials), through per-row sums of g * H over runs of channels
// reduced per gate group for q > 1.
#include <torch/library.h>

#include <limits>
#include <numeric>

#include "common.cuh"
#include "rope.cuh"
#include "pom_ext/weight_grad.h"

namespace pom_ext {
namespace cuda {
namespace {

constexpr int kU = 4;                  // rows loaded ahead of the sequential scan
constexpr int64_t kMaxBwdRows = 4096;  // rows per chunk of the backward scan

// fn(n, x) for rows n = na .. nb - 1 of sequence b in order, kU rows in flight.
template <int V, typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void for_rows(const scalar_t* __restrict__ p, const Strides& s, bool vec, const Layout& L,
                                         int64_t b, int64_t na, int64_t nb, int64_t e0, int nv, Fn&& fn) {
  for_rows_step<V, kU, scalar_t, acc_t>([&](int64_t n) { return p + L.off(s, b, n); }, na, nb, 1, e0, s.e, nv, vec,
                                        fn);
}

// fn(n, x1, x2) for rows n = nb - 1 down to na, from two tensors (kU rows ahead, packed, when both vectorize).
template <int V, typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void for_rows2_rev(const scalar_t* __restrict__ p1, const Strides& s1, bool v1,
                                              const scalar_t* __restrict__ p2, const Strides& s2, bool v2,
                                              const Layout& L, int64_t b, int64_t na, int64_t nb, int64_t e0, int nv,
                                              Fn&& fn) {
  int64_t n = nb;
  if (v1 && v2) {
    for (; n - kU >= na; n -= kU) {
      uint4 r1[kU], r2[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        r1[u] = load_vec(p1 + L.off(s1, b, n - 1 - u), e0);
        r2[u] = load_vec(p2 + L.off(s2, b, n - 1 - u), e0);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        acc_t x1[V], x2[V];
        Pack<scalar_t>::unpack(r1[u], x1);
        Pack<scalar_t>::unpack(r2[u], x2);
        fn(n - 1 - u, x1, x2);
      }
    }
  }
  for (; n > na; --n) {
    acc_t x1[V], x2[V];
    load_row<V>(p1 + L.off(s1, b, n - 1), e0, s1.e, nv, v1, x1);
    load_row<V>(p2 + L.off(s2, b, n - 1), e0, s2.e, nv, v2, x2);
    fn(n - 1, x1, x2);
  }
}

// The layer's gate fused into the kernels: channel e of row n is scaled by
// s = hardsigmoid(pre[n, e / q] + bias[e / q]) (math::hsig), pre the S gate columns of hs, q = E / S.
// pre == nullptr: no gate (the plain op).
template <typename scalar_t>
struct GateArg {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pre = nullptr;
  Strides s;
  bool vec = false;             // q == 1 and 16-byte loads of pre are valid
  int64_t q = 1;
  const acc_t* bias = nullptr;  // (S,) in the accumulation type, or null

  // x[j] = pre + bias of the gate of channel e0 + j of row n (0 for j >= nv).
  template <int V>
  __device__ __forceinline__ void inputs(const Layout& L, int64_t b, int64_t n, int64_t e0, int nv,
                                         acc_t (&x)[V]) const {
    const scalar_t* row = pre + L.off(s, b, n);
    if (q == 1) {
      load_row<V>(row, e0, s.e, nv, vec, x);
      if (bias) {
#pragma unroll
        for (int j = 0; j < V; ++j) x[j] += j < nv ? bias[e0 + j] : acc_t(0);
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t gi = (e0 + j) / q;
      x[j] = j < nv ? static_cast<acc_t>(row[gi * s.e]) + (bias ? bias[gi] : acc_t(0)) : acc_t(0);
    }
  }
  template <int V>
  __device__ __forceinline__ void values(const Layout& L, int64_t b, int64_t n, int64_t e0, int nv,
                                         acc_t (&v)[V]) const {
    inputs<V>(L, b, n, e0, nv, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = math::hsig(v[j]);
  }
  // y = x * s of row n (y = x without a gate).
  template <int V>
  __device__ __forceinline__ void apply(const Layout& L, int64_t b, int64_t n, int64_t e0, int nv,
                                        const acc_t (&x)[V], acc_t (&y)[V]) const {
    if (pre) values<V>(L, b, n, e0, nv, y);
#pragma unroll
    for (int j = 0; j < V; ++j) y[j] = pre ? x[j] * y[j] : x[j];
  }
};

// The token weights of poly_causal_weighted (wi == nullptr: none): per row of h, its weight w and inv (weight_grad.h)
// side by side in the accumulation type, rows in order (dense: b * N + n; packed: the global row), so one pointer and
// no strides reach both.
template <typename acc_t>
struct WeightArg {
  const acc_t* wi = nullptr;
  __device__ __forceinline__ const acc_t* row(const Layout& L, int64_t b, int64_t n) const {
    return wi + 2 * (L.cu ? L.base(b) + n : b * L.N + n);
  }
  __device__ __forceinline__ acc_t at(const Layout& L, int64_t b, int64_t n) const { return row(L, b, n)[0]; }
  __device__ __forceinline__ acc_t inverse(const Layout& L, int64_t b, int64_t n) const { return row(L, b, n)[1]; }
};

// The kernels below are __device__ bodies with a compile-time W (weighted), each behind two __global__ entry
// points: the plain kernel (W = false: the code of the unweighted ops does not change with the weighted op) and
// its _weighted twin, instantiated for the degrees of lean_dispatch_degree only.
template <typename scalar_t, int K, bool W>
__device__ __forceinline__ void causal_tot(const scalar_t* __restrict__ h, Strides hs, bool vin,
                                           Layout L, int64_t E, CoeffArg<at::opmath_type<scalar_t>> ca,
                                           WeightArg<at::opmath_type<scalar_t>> wa, double* __restrict__ tot) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  // Whole blocks never use the total of a sequence's last chunk; split blocks use every chunk's (the last
  // chunk of each block gives that block's sum).
  if (!L.chunk(blockIdx.x, b, n0, n1) || (L.plan.cpb == 0 && n1 >= L.len(b))) return;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  acc_t run[V], comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = comp[j] = acc_t(0);
  for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t p = cc.poly(j, math::act(x[j]));
      math::kahan_add(run[j], comp[j], W ? wa.at(L, b, n) * p : p);
    }
  });
  double* t = tot + static_cast<int64_t>(blockIdx.x) * E + e0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < nv) t[j] = static_cast<double>(run[j]) - static_cast<double>(comp[j]);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_tot_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L, int64_t E,
                      CoeffArg<at::opmath_type<scalar_t>> ca, double* __restrict__ tot) {
  causal_tot<scalar_t, K, false>(h, hs, vin, L, E, ca, {}, tot);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_tot_weighted_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L, int64_t E,
                               CoeffArg<at::opmath_type<scalar_t>> ca, WeightArg<at::opmath_type<scalar_t>> wa,
                               double* __restrict__ tot) {
  causal_tot<scalar_t, K, true>(h, hs, vin, L, E, ca, wa, tot);
}

template <typename acc_t, int V>
__device__ __forceinline__ void start_from_carry(const double* carry, int64_t c, int64_t E, int64_t e0, int nv,
                                                 acc_t (&run)[V], acc_t (&comp)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const double cv = (carry && j < nv) ? carry[c * E + e0 + j] : 0.0;
    run[j] = static_cast<acc_t>(cv);
    comp[j] = static_cast<acc_t>(static_cast<double>(run[j]) - cv);
  }
}

// fn(n, H) for rows n = n0 .. n1 - 1 of chunk blockIdx.x in order, H the mean of p over rows 0 .. n (F = 1)
// or over rows 0 .. the end of n's F-block; the scan starts from the chunk's carry (none for a sequence's first).
// Split blocks: H is the block's sum, its last chunk's carry plus total (fp64), over its end row; h is not read.
template <bool W, int V, typename scalar_t, int K, typename acc_t, typename Fn>
__device__ __forceinline__ void prefix_means(const scalar_t* __restrict__ h, const Strides& hs, bool vin,
                                             const Layout& L, int64_t b, int64_t n0, int64_t n1, int64_t E,
                                             int64_t e0, int nv, int64_t F, const ChanCoeff<K, V, acc_t>& cc,
                                             const double* carry, const double* tot, const WeightArg<acc_t>& wa,
                                             Fn&& fn) {
  if (L.plan.cpb > 0) {
    int64_t cf, cl, bend;
    L.block_chunks(b, blockIdx.x, cf, cl, bend);
    // Every row of the block reads the same total (its chunks' rows share the block's end).
    const double inv = W ? static_cast<double>(wa.inverse(L, b, n0)) : 1.0 / static_cast<double>(bend);
    acc_t H[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
      H[j] = j < nv ? static_cast<acc_t>((carry[cl * E + e0 + j] + tot[cl * E + e0 + j]) * inv) : acc_t(0);
    for (int64_t n = n0; n < n1; ++n) fn(n, H);
    return;
  }
  acc_t run[V], comp[V];
  start_from_carry<acc_t, V>(n0 > 0 ? carry : nullptr, blockIdx.x, E, e0, nv, run, comp);
  if (F == 1) {
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
      const acc_t inv = W ? wa.inverse(L, b, n) : acc_t(1) / static_cast<acc_t>(n + 1);
      const acc_t w = W ? wa.at(L, b, n) : acc_t(1);
      acc_t H[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t p = cc.poly(j, math::act(x[j]));
        math::kahan_add(run[j], comp[j], W ? w * p : p);
        H[j] = (run[j] - comp[j]) * inv;
      }
      fn(n, H);
    });
    return;
  }
  for (int64_t blk = n0; blk < n1; blk += F) {
    const int64_t bend = blk + F < n1 ? blk + F : n1;
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, blk, bend, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t p = cc.poly(j, math::act(x[j]));
        math::kahan_add(run[j], comp[j], W ? wa.at(L, b, n) * p : p);
      }
    });
    const acc_t inv = W ? wa.inverse(L, b, blk) : acc_t(1) / static_cast<acc_t>(bend);
    acc_t H[V];
#pragma unroll
    for (int j = 0; j < V; ++j) H[j] = (run[j] - comp[j]) * inv;
    for (int64_t n = blk; n < bend; ++n) fn(n, H);
  }
}

template <typename scalar_t, int K, bool W>
__device__ __forceinline__ void causal_scan(const scalar_t* __restrict__ h, Strides hs, bool vin,
                                            scalar_t* __restrict__ out, Strides os, bool vout, Layout L,
                                            int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                                            const double* __restrict__ carry, const double* __restrict__ tot,
                                            GateArg<scalar_t> gate,
                                            WeightArg<at::opmath_type<scalar_t>> wa) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1)) return;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  prefix_means<W, V>(h, hs, vin, L, b, n0, n1, E, e0, nv, F, cc, carry, tot, wa,
                     [&](int64_t n, const acc_t (&H)[V]) {
    acc_t y[V];
    gate.template apply<V>(L, b, n, e0, nv, H, y);
    store_row<V>(out + L.off(os, b, n), e0, os.e, nv, vout, y);
  });
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_scan_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, scalar_t* __restrict__ out, Strides os,
                       bool vout, Layout L, int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                       const double* __restrict__ carry, const double* __restrict__ tot, GateArg<scalar_t> gate) {
  causal_scan<scalar_t, K, false>(h, hs, vin, out, os, vout, L, E, F, ca, carry, tot, gate, {});
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_scan_weighted_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, scalar_t* __restrict__ out,
                                Strides os, bool vout, Layout L, int64_t E, int64_t F,
                                CoeffArg<at::opmath_type<scalar_t>> ca, const double* __restrict__ carry,
                                const double* __restrict__ tot, WeightArg<at::opmath_type<scalar_t>> wa) {
  causal_scan<scalar_t, K, true>(h, hs, vin, out, os, vout, L, E, F, ca, carry, tot, GateArg<scalar_t>{}, wa);
}

// Kahan-compensated sum of the (gated) gradient rows of F-block [blk, bend) (thousands of rows, for a large F),
// divided by bend. Gate: GateArg, or the gated rope op's LaneGate.
template <bool W, int V, typename scalar_t, typename acc_t, typename Gate>
__device__ __forceinline__ void block_grad(const scalar_t* g, const Strides& gs, bool vg, const Gate& gate,
                                           const WeightArg<acc_t>& wa, const Layout& L, int64_t b, int64_t blk,
                                           int64_t bend, int64_t e0, int nv, acc_t (&G)[V]) {
  acc_t comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) G[j] = comp[j] = acc_t(0);
  for_rows<V, scalar_t, acc_t>(g, gs, vg, L, b, blk, bend, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
    acc_t y[V];
    gate.template apply<V>(L, b, n, e0, nv, x, y);
#pragma unroll
    for (int j = 0; j < V; ++j) math::kahan_add(G[j], comp[j], y[j]);
  });
  const acc_t inv = W ? wa.inverse(L, b, blk) : acc_t(1) / static_cast<acc_t>(bend);
#pragma unroll
  for (int j = 0; j < V; ++j) G[j] = (G[j] - comp[j]) * inv;
}

// The sum of g inv (times the gate) over the rows of chunk blockIdx.x of sequence b, channels e0 .. e0 + nv - 1
// (whole blocks: each chunk that has a predecessor) -> tot. Gate: GateArg, or the gated rope op's LaneGate.
template <bool W, int V, typename scalar_t, typename Gate>
__device__ __forceinline__ void bwd_chunk_total(const scalar_t* __restrict__ g, const Strides& gs, bool vg,
                                                const Gate& gate, const WeightArg<at::opmath_type<scalar_t>>& wa,
                                                const Layout& L, int64_t b, int64_t n0, int64_t n1, int64_t E,
                                                int64_t F, int64_t e0, int nv, double* __restrict__ tot) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t run[V], comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = comp[j] = acc_t(0);
  if (L.plan.cpb > 0) {
    // Split blocks: every row of the chunk is in one block, which ends at bend.
    int64_t cf, cl, bend;
    L.block_chunks(b, blockIdx.x, cf, cl, bend);
    const acc_t inv = W ? wa.inverse(L, b, n0) : acc_t(1) / static_cast<acc_t>(bend);
    for_rows<V, scalar_t, acc_t>(g, gs, vg, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
      acc_t y[V];
      gate.template apply<V>(L, b, n, e0, nv, x, y);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], y[j] * inv);
    });
  } else if (F == 1) {
    for_rows<V, scalar_t, acc_t>(g, gs, vg, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
      const acc_t inv = W ? wa.inverse(L, b, n) : acc_t(1) / static_cast<acc_t>(n + 1);
      acc_t y[V];
      gate.template apply<V>(L, b, n, e0, nv, x, y);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], y[j] * inv);
    });
  } else {
    for (int64_t blk = n0; blk < n1; blk += F) {
      const int64_t bend = blk + F < n1 ? blk + F : n1;
      acc_t G[V];
      block_grad<W, V>(g, gs, vg, gate, wa, L, b, blk, bend, e0, nv, G);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], G[j]);
    }
  }
  double* t = tot + static_cast<int64_t>(blockIdx.x) * E + e0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < nv) t[j] = static_cast<double>(run[j]) - static_cast<double>(comp[j]);
}

template <typename scalar_t, bool W>
__device__ __forceinline__ void causal_bwd_tot(const scalar_t* __restrict__ g, Strides gs, bool vg,
                                               GateArg<scalar_t> gate,
                                               WeightArg<at::opmath_type<scalar_t>> wa, Layout L,
                                               int64_t E, int64_t F, double* __restrict__ tot) {
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  // Whole blocks never use the total of a sequence's first chunk; split blocks use every chunk's (the first
  // chunk of each block gives the suffix sum from that block on).
  if (!L.chunk(blockIdx.x, b, n0, n1) || (L.plan.cpb == 0 && n0 == 0)) return;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  bwd_chunk_total<W, V>(g, gs, vg, gate, wa, L, b, n0, n1, E, F, e0, nv, tot);
}

template <typename scalar_t>
__global__ void __launch_bounds__(128)
    causal_bwd_tot_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, GateArg<scalar_t> gate, Layout L,
                          int64_t E, int64_t F, double* __restrict__ tot) {
  causal_bwd_tot<scalar_t, false>(g, gs, vg, gate, {}, L, E, F, tot);
}

template <typename scalar_t>
__global__ void __launch_bounds__(128)
    causal_bwd_tot_weighted_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg,
                                   WeightArg<at::opmath_type<scalar_t>> wa, Layout L, int64_t E, int64_t F,
                                   double* __restrict__ tot) {
  causal_bwd_tot<scalar_t, true>(g, gs, vg, GateArg<scalar_t>{}, wa, L, E, F, tot);
}

// MODE: kTokens (F = 1), kWholeBlocks (chunks of whole F-blocks) or kSplitBlocks (plan.cpb > 0: the gradient
// reaching a block, the suffix sum of the block totals from it on, is its first chunk's reverse carry plus total,
// the same for every row of the chunk; g is not read).
enum ScanMode { kTokens = 0, kWholeBlocks = 1, kSplitBlocks = 2 };

template <typename scalar_t, int K, int MODE, bool W>
__device__ __forceinline__ void causal_bwd_scan(const scalar_t* __restrict__ g, Strides gs, bool vg,
                                                GateArg<scalar_t> gate,
                                                WeightArg<at::opmath_type<scalar_t>> wa,
                                                const scalar_t* __restrict__ h, Strides hs, bool vin,
                                                scalar_t* __restrict__ gh, Strides ghs, bool vout,
                                                Layout L, int64_t E, int64_t F,
                                                CoeffArg<at::opmath_type<scalar_t>> ca,
                                                const double* __restrict__ carry, const double* __restrict__ tot,
                                                at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b = 0, n0 = 0, n1 = 0;
  const bool valid = L.chunk(blockIdx.x, b, n0, n1);
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  CoeffGradAcc<K, V, acc_t> f;
  f.init(part + static_cast<int64_t>(blockIdx.x) * ca.deg * E + e0, E, nv, ca.deg);
  if (valid) {
    ChanCoeff<K, V, acc_t> cc;
    cc.load(ca, e0, nv);
    acc_t run[V], comp[V];
    if constexpr (MODE != kSplitBlocks) {
      start_from_carry<acc_t, V>(n1 < L.len(b) ? carry : nullptr, blockIdx.x, E, e0, nv, run, comp);
    }
    // gbar-weighted element backward of one row of h (times the row's weight).
    auto row_backward = [&](int64_t n, const acc_t (&gb)[V], const acc_t (&x)[V]) {
      const acc_t w = W ? wa.at(L, b, n) : acc_t(1);
      acc_t gx[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t a = math::act(x[j]);
        const acc_t gw = W ? w * gb[j] : gb[j];
        acc_t p, dp;
        cc.poly_and_slope(j, a, p, dp);
        gx[j] = gw * ca.act_grad(x[j]) * dp;
        f.add_powers(j, gw, a);
      }
      store_row<V>(gh + L.off(ghs, b, n), e0, ghs.e, nv, vout, gx);
    };
    if constexpr (MODE == kSplitBlocks) {
      int64_t cf, cl, bend;
      L.block_chunks(b, blockIdx.x, cf, cl, bend);
      acc_t gb[V];
#pragma unroll
      for (int j = 0; j < V; ++j)
        gb[j] = j < nv ? static_cast<acc_t>(carry[cf * E + e0 + j] + tot[cf * E + e0 + j]) : acc_t(0);
      for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, e0, nv,
                                   [&](int64_t n, const acc_t (&x)[V]) { row_backward(n, gb, x); });
    } else if constexpr (MODE == kTokens) {
      for_rows2_rev<V, scalar_t, acc_t>(g, gs, vg, h, hs, vin, L, b, n0, n1, e0, nv,
                                        [&](int64_t n, const acc_t (&gv)[V], const acc_t (&x)[V]) {
                                          const acc_t inv = W ? wa.inverse(L, b, n)
                                                              : acc_t(1) / static_cast<acc_t>(n + 1);
                                          acc_t y[V], gb[V];
                                          gate.template apply<V>(L, b, n, e0, nv, gv, y);
#pragma unroll
                                          for (int j = 0; j < V; ++j) {
                                            math::kahan_add(run[j], comp[j], y[j] * inv);
                                            gb[j] = run[j] - comp[j];
                                          }
                                          row_backward(n, gb, x);
                                        });
    } else {
      const int64_t nblocks = (n1 - n0 + F - 1) / F;
      for (int64_t jb = nblocks - 1; jb >= 0; --jb) {
        const int64_t blk = n0 + jb * F;
        const int64_t bend = blk + F < n1 ? blk + F : n1;
        acc_t G[V], gb[V];
        block_grad<W, V>(g, gs, vg, gate, wa, L, b, blk, bend, e0, nv, G);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          math::kahan_add(run[j], comp[j], G[j]);
          gb[j] = run[j] - comp[j];
        }
        for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, blk, bend, e0, nv,
                                     [&](int64_t n, const acc_t (&x)[V]) { row_backward(n, gb, x); });
      }
    }
  }
  f.finish();
}

template <typename scalar_t, int K, int MODE>
__global__ void __launch_bounds__(128)
    causal_bwd_scan_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, GateArg<scalar_t> gate,
                           const scalar_t* __restrict__ h, Strides hs, bool vin, scalar_t* __restrict__ gh,
                           Strides ghs, bool vout, Layout L,
                           int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                           const double* __restrict__ carry, const double* __restrict__ tot,
                           at::opmath_type<scalar_t>* __restrict__ part) {
  causal_bwd_scan<scalar_t, K, MODE, false>(g, gs, vg, gate, {}, h, hs, vin, gh, ghs, vout, L, E, F, ca, carry, tot,
                                            part);
}

template <typename scalar_t, int K, int MODE>
__global__ void __launch_bounds__(128)
    causal_bwd_scan_weighted_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg,
                                    WeightArg<at::opmath_type<scalar_t>> wa, const scalar_t* __restrict__ h,
                                    Strides hs, bool vin, scalar_t* __restrict__ gh, Strides ghs, bool vout, Layout L,
                                    int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                                    const double* __restrict__ carry, const double* __restrict__ tot,
                                    at::opmath_type<scalar_t>* __restrict__ part) {
  causal_bwd_scan<scalar_t, K, MODE, true>(g, gs, vg, GateArg<scalar_t>{}, wa, h, hs, vin, gh, ghs, vout, L, E, F, ca,
                                           carry, tot, part);
}

// Gradient of the gate inputs, by a forward scan that recomputes H from the forward carries; P = g * H.
// q == 1: gpre = hsig'(pre + bias) * P into the gate columns, and per-chunk sums of gpre (the bias
// gradient) into bpart (chunks, E). q > 1: sums of P over runs of u channels (u divides q and V, so a run
// lies in one gate group) into gsum (rows, E / u); the host reduces the runs of each group.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_gate_bwd_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, const scalar_t* __restrict__ h,
                           Strides hs, bool vin, GateArg<scalar_t> gate, Layout L, int64_t E, int64_t F,
                           CoeffArg<at::opmath_type<scalar_t>> ca, const double* __restrict__ carry,
                           const double* __restrict__ tot, scalar_t* __restrict__ gpre, Strides gps, bool vgp,
                           at::opmath_type<scalar_t>* __restrict__ bpart, at::opmath_type<scalar_t>* __restrict__ gsum,
                           Strides gss, int u) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b = 0, n0 = 0, n1 = 0;
  const bool valid = L.chunk(blockIdx.x, b, n0, n1);
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  acc_t fb[V];
#pragma unroll
  for (int j = 0; j < V; ++j) fb[j] = acc_t(0);
  if (valid) {
    ChanCoeff<K, V, acc_t> cc;
    cc.load(ca, e0, nv);
    // Row n of the gate's gradient from H (the row's prefix or block mean).
    prefix_means<false, V>(h, hs, vin, L, b, n0, n1, E, e0, nv, F, cc, carry, tot, WeightArg<acc_t>{},
                    [&](int64_t n, const acc_t (&H)[V]) {
      acc_t P[V];
      load_row<V>(g + L.off(gs, b, n), e0, gs.e, nv, vg, P);
#pragma unroll
      for (int j = 0; j < V; ++j) P[j] *= H[j];
      if (gate.q == 1) {
        acc_t x[V];
        gate.template inputs<V>(L, b, n, e0, nv, x);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          P[j] *= math::hsig_grad(x[j]);
          fb[j] += P[j];
        }
        store_row<V>(gpre + L.off(gps, b, n), e0, gps.e, nv, vgp, P);
        return;
      }
      acc_t* dst = gsum + L.off(gss, b, n) + e0 / u;
      acc_t t = acc_t(0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j < nv) {  // nv is a multiple of u: E is
          t += P[j];
          if ((j + 1) % u == 0) {
            dst[j / u] = t;
            t = acc_t(0);
          }
        }
      }
    });
  }
  if (bpart) {
    acc_t* dst = bpart + static_cast<int64_t>(blockIdx.x) * E + e0;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < nv) dst[j] = fb[j];
  }
}

// ---- rotary positions: poly_causal_rope and poly_causal_gated_rope ----
//
// The scans of the plain op with the channels of a pair in two lanes of one warp: lanes l and l + 16 own the
// two halves of one vector of V pairs (columns col0 .. col0 + nv - 1 of a section, rope.cuh), so both read one
// table row and exchange their values by one shuffle. Forward: each row's features are turned in registers, the
// partner's p from the shuffle (p~[a] = c p[a] - s p[a + P], p~[a + P] = c p[a + P] + s p[a]), and the scans run
// on p~ as the plain op's run on p (chunk totals and fp64 carries of width E, Kahan-compensated rescans).
// Backward: the suffix sums of g inv are the plain op's (causal_bwd_tot); each row turns them back with the
// partner's sum from the same shuffle, u[a] = c G[a] + s G[a + P], u[a + P] = c G[a + P] - s G[a], before the
// element backward. Lanes past the last pair vector stay in the loops (the shuffles need the whole warp) but load
// at channel 0 and store nothing.
// Gated (poly_causal_gated_rope, hs = [h | pre], y = s~ H~, s~ = R_g(pos) hardsigmoid(pre + bias)): q = E / S_g =
// P / Pg channels share a gate and gate j of a section pairs with j + Pg, so the gates of a lane's channels pair
// with those of its partner lane's: the turned gate is the lane's gate values and the partner's from one more
// shuffle (LaneGate). The forward scales each output row by s~; the backward scans g s~ (its chunk totals on the
// rope lanes, rope_bwd_tot), and rope_gate_bwd recomputes H~ from forward carries for the gate's gradient,
// R_g^T (g H~) (the partner's g H~ by a shuffle), times hardsigmoid': directly for q = 1, through run sums reduced
// per gate on the host for q > 1 (as causal_gate_bwd).

using plan::RopeLane;

template <int V>
__device__ __forceinline__ RopeLane rope_lane(int64_t P, int64_t S) {
  return plan::rope_lane(channel_tile() * blockDim.x + threadIdx.x, P, S, V);
}

// The gate of the gated rope op: its columns and bias (GateArg, q channels a gate) and its tables (L, Pg) at the
// features' positions.
template <typename scalar_t>
struct RopeGateArg {
  GateArg<scalar_t> gate;
  RopeArg<at::opmath_type<scalar_t>> tab;
};

// The turned gate on a rope lane (GATED = false: no gate, apply copies). Every lane of the warp calls turned /
// apply for a row (one shuffle).
template <typename scalar_t, bool GATED>
struct LaneGate {
  using acc_t = at::opmath_type<scalar_t>;
  RopeGateArg<scalar_t> a;
  RopeLane r;

  // pre + bias of the gates of the lane's channels at row n (gate (e0 + j) / q: 32-bit, e0 < E).
  template <int V>
  __device__ __forceinline__ void inputs(const Layout& L, int64_t b, int64_t n, acc_t (&x)[V]) const {
    if (a.gate.q == 1) {
      a.gate.template inputs<V>(L, b, n, r.e0, r.nv, x);
      return;
    }
    const scalar_t* row = a.gate.pre + L.off(a.gate.s, b, n);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t gi = static_cast<int>(r.e0 + j) / static_cast<int>(a.gate.q);
      x[j] = j < r.nv ? static_cast<acc_t>(row[gi * a.gate.s.e]) + (a.gate.bias ? a.gate.bias[gi] : acc_t(0))
                      : acc_t(0);
    }
  }
  // s~ of the lane's channels at row n of sequence b.
  template <int V>
  __device__ __forceinline__ void turned(const Layout& L, int64_t b, int64_t n, acc_t (&sg)[V]) const {
    acc_t x[V], xp[V], c[V], s[V];
    inputs<V>(L, b, n, x);
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = math::hsig(x[j]);
    partner_values<V>(x, xp);
    lane_factors<V>(a.tab, a.gate.q, L, b, n, r, c, s);
#pragma unroll
    for (int j = 0; j < V; ++j) sg[j] = c[j] * x[j] - static_cast<acc_t>(r.sign) * s[j] * xp[j];
  }
  // y = s~ x of row n (the lane's channels: e0, nv are the lane's).
  template <int V>
  __device__ __forceinline__ void apply(const Layout& L, int64_t b, int64_t n, int64_t, int, const acc_t (&x)[V],
                                        acc_t (&y)[V]) const {
    if constexpr (GATED) {
      turned<V>(L, b, n, y);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] *= x[j];
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = x[j];
    }
  }
};

// fn(n, H~) for the rows n = n0 .. n1 - 1 of chunk blockIdx.x in order, on the rope lane r: H~ the mean of p~ over
// rows 0 .. n (F = 1) or over rows 0 .. the end of n's F-block, rescanned from the chunk's carry (none for a
// sequence's first). Split blocks: the block's mean from its last chunk's carry and total; h is not read.
template <int V, int K, typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void rope_prefix_means(const scalar_t* __restrict__ h, const Strides& hs, bool vin,
                                                  const Layout& L, int64_t b, int64_t n0, int64_t n1, int64_t E,
                                                  int64_t F, const RopeLane& r, const CoeffArg<acc_t>& ca,
                                                  const RopeArg<acc_t>& ra, const double* carry, const double* tot,
                                                  Fn&& fn) {
  if (L.plan.cpb > 0) {
    int64_t cf, cl, bend;
    L.block_chunks(b, blockIdx.x, cf, cl, bend);
    const double inv = 1.0 / static_cast<double>(bend);
    acc_t H[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
      H[j] = j < r.nv ? static_cast<acc_t>((carry[cl * E + r.e0 + j] + tot[cl * E + r.e0 + j]) * inv) : acc_t(0);
    for (int64_t n = n0; n < n1; ++n) fn(n, H);
    return;
  }
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, r.e0, r.nv);
  acc_t run[V], comp[V];
  start_from_carry<acc_t, V>(n0 > 0 ? carry : nullptr, blockIdx.x, E, r.e0, r.nv, run, comp);
  if (F == 1) {
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, r.e0, r.nv, [&](int64_t n, const acc_t (&x)[V]) {
      acc_t pt[V], H[V];
      turned_features<V>(ra, r, L, b, n, cc, x, pt);
      const acc_t inv = acc_t(1) / static_cast<acc_t>(n + 1);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        math::kahan_add(run[j], comp[j], pt[j]);
        H[j] = (run[j] - comp[j]) * inv;
      }
      fn(n, H);
    });
    return;
  }
  for (int64_t blk = n0; blk < n1; blk += F) {
    const int64_t bend = blk + F < n1 ? blk + F : n1;
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, blk, bend, r.e0, r.nv, [&](int64_t n, const acc_t (&x)[V]) {
      acc_t pt[V];
      turned_features<V>(ra, r, L, b, n, cc, x, pt);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], pt[j]);
    });
    const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
    acc_t H[V];
#pragma unroll
    for (int j = 0; j < V; ++j) H[j] = (run[j] - comp[j]) * inv;
    for (int64_t n = blk; n < bend; ++n) fn(n, H);
  }
}

// Kahan sum of p~ over a chunk's rows (whole blocks: each chunk that has a successor) -> tot (E).
template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    rope_tot_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L, int64_t E, int64_t S,
                    CoeffArg<at::opmath_type<scalar_t>> ca, RopeArg<at::opmath_type<scalar_t>> ra,
                    double* __restrict__ tot) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1) || (L.plan.cpb == 0 && n1 >= L.len(b))) return;
  const RopeLane r = rope_lane<V>(ra.P, S);
  if (__all_sync(0xffffffffu, r.nv == 0)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, r.e0, r.nv);
  acc_t run[V], comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = comp[j] = acc_t(0);
  for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, r.e0, r.nv, [&](int64_t n, const acc_t (&x)[V]) {
    acc_t pt[V];
    turned_features<V>(ra, r, L, b, n, cc, x, pt);
#pragma unroll
    for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], pt[j]);
  });
  double* t = tot + static_cast<int64_t>(blockIdx.x) * E + r.e0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < r.nv) t[j] = static_cast<double>(run[j]) - static_cast<double>(comp[j]);
}

// The forward's output pass: every chunk rescans p~ from its carry and writes its rows, times the turned gate when
// GATED (split blocks: each block's mean from its last chunk's carry and total, h not read).
template <typename scalar_t, int K, bool GATED>
__global__ void __launch_bounds__(128)
    rope_scan_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, scalar_t* __restrict__ out, Strides os,
                     bool vout, Layout L, int64_t E, int64_t S, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                     RopeArg<at::opmath_type<scalar_t>> ra, const double* __restrict__ carry,
                     const double* __restrict__ tot, RopeGateArg<scalar_t> ga) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1)) return;
  const RopeLane r = rope_lane<V>(ra.P, S);
  if (__all_sync(0xffffffffu, r.nv == 0)) return;
  const LaneGate<scalar_t, GATED> gate{ga, r};
  rope_prefix_means<V, K>(h, hs, vin, L, b, n0, n1, E, F, r, ca, ra, carry, tot, [&](int64_t n, const acc_t (&H)[V]) {
    acc_t y[V];
    gate.template apply<V>(L, b, n, r.e0, r.nv, H, y);
    if (r.nv > 0) store_row<V>(out + L.off(os, b, n), r.e0, os.e, r.nv, vout, y);
  });
}

// The gated backward's chunk totals of g s~ inv on the rope lanes (the plain rope op's are causal_bwd_tot's).
template <typename scalar_t>
__global__ void __launch_bounds__(128)
    rope_bwd_tot_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, RopeGateArg<scalar_t> ga, Layout L,
                        int64_t E, int64_t P, int64_t S, int64_t F, double* __restrict__ tot) {
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1) || (L.plan.cpb == 0 && n0 == 0)) return;
  const RopeLane r = rope_lane<V>(P, S);
  if (__all_sync(0xffffffffu, r.nv == 0)) return;
  bwd_chunk_total<false, V>(g, gs, vg, LaneGate<scalar_t, true>{ga, r}, {}, L, b, n0, n1, E, F, r.e0, r.nv, tot);
}

// The backward's pass over h: gbar (the suffix sum of g inv, times the turned gate when GATED, from the carries)
// turned back per row and the element backward; grad_coeff partials per chunk (MODE: ScanMode).
template <typename scalar_t, int K, int MODE, bool GATED>
__global__ void __launch_bounds__(128)
    rope_bwd_scan_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, const scalar_t* __restrict__ h,
                         Strides hs, bool vin, scalar_t* __restrict__ gh, Strides ghs, bool vout, Layout L, int64_t E,
                         int64_t S, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                         RopeArg<at::opmath_type<scalar_t>> ra, const double* __restrict__ carry,
                         const double* __restrict__ tot, at::opmath_type<scalar_t>* __restrict__ part,
                         RopeGateArg<scalar_t> ga) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b = 0, n0 = 0, n1 = 0;
  const bool valid = L.chunk(blockIdx.x, b, n0, n1);
  const RopeLane r = rope_lane<V>(ra.P, S);
  if (__all_sync(0xffffffffu, r.nv == 0)) return;
  CoeffGradAcc<K, V, acc_t> f;
  f.init(part + static_cast<int64_t>(blockIdx.x) * ca.deg * E + r.e0, E, r.nv, ca.deg);
  if (valid) {
    ChanCoeff<K, V, acc_t> cc;
    cc.load(ca, r.e0, r.nv);
    // Row n's element backward from the suffix sums of the lane (gb) and of its partner (gp).
    auto row_backward = [&](int64_t n, const acc_t (&gb)[V], const acc_t (&gp)[V], const acc_t (&x)[V]) {
      acc_t ct[V], st[V], gx[V];
      lane_factors<V>(ra, 1, L, b, n, r, ct, st);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t a = math::act(x[j]);
        const acc_t u = ct[j] * gb[j] + static_cast<acc_t>(r.sign) * st[j] * gp[j];
        acc_t p, dp;
        cc.poly_and_slope(j, a, p, dp);
        gx[j] = u * ca.act_grad(x[j]) * dp;
        f.add_powers(j, u, a);
      }
      if (r.nv > 0) store_row<V>(gh + L.off(ghs, b, n), r.e0, ghs.e, r.nv, vout, gx);
    };
    if constexpr (MODE == kSplitBlocks) {
      int64_t cf, cl, bend;
      L.block_chunks(b, blockIdx.x, cf, cl, bend);
      const int64_t pe = r.e0 + r.sign * ra.P;
      acc_t gb[V], gp[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        gb[j] = j < r.nv ? static_cast<acc_t>(carry[cf * E + r.e0 + j] + tot[cf * E + r.e0 + j]) : acc_t(0);
        gp[j] = j < r.nv ? static_cast<acc_t>(carry[cf * E + pe + j] + tot[cf * E + pe + j]) : acc_t(0);
      }
      for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, r.e0, r.nv,
                                   [&](int64_t n, const acc_t (&x)[V]) { row_backward(n, gb, gp, x); });
    } else {
      const LaneGate<scalar_t, GATED> gate{ga, r};
      acc_t run[V], comp[V];
      start_from_carry<acc_t, V>(n1 < L.len(b) ? carry : nullptr, blockIdx.x, E, r.e0, r.nv, run, comp);
      if constexpr (MODE == kTokens) {
        for_rows2_rev<V, scalar_t, acc_t>(g, gs, vg, h, hs, vin, L, b, n0, n1, r.e0, r.nv,
                                          [&](int64_t n, const acc_t (&gv)[V], const acc_t (&x)[V]) {
                                            const acc_t inv = acc_t(1) / static_cast<acc_t>(n + 1);
                                            acc_t y[V], gb[V], gp[V];
                                            gate.template apply<V>(L, b, n, r.e0, r.nv, gv, y);
#pragma unroll
                                            for (int j = 0; j < V; ++j) {
                                              math::kahan_add(run[j], comp[j], y[j] * inv);
                                              gb[j] = run[j] - comp[j];
                                            }
                                            partner_values<V>(gb, gp);
                                            row_backward(n, gb, gp, x);
                                          });
      } else {
        const int64_t nblocks = (n1 - n0 + F - 1) / F;
        for (int64_t jb = nblocks - 1; jb >= 0; --jb) {
          const int64_t blk = n0 + jb * F;
          const int64_t bend = blk + F < n1 ? blk + F : n1;
          acc_t G[V], gb[V], gp[V];
          block_grad<false, V>(g, gs, vg, gate, WeightArg<acc_t>{}, L, b, blk, bend, r.e0, r.nv, G);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            math::kahan_add(run[j], comp[j], G[j]);
            gb[j] = run[j] - comp[j];
          }
          partner_values<V>(gb, gp);
          for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, blk, bend, r.e0, r.nv,
                                       [&](int64_t n, const acc_t (&x)[V]) { row_backward(n, gb, gp, x); });
        }
      }
    }
  }
  f.finish();
}

// The gated rope op's gate gradient, by a forward scan that recomputes H~ from the forward carries: d = R_g^T
// (g H~) per channel (the partner's g H~ by a shuffle; the turn is one per gate, so turning each channel's share
// and summing a gate's channels turns the gate's sum). q == 1: gpre = hsig'(pre + bias) d into the gate columns
// and per-chunk sums of gpre (the bias gradient) into bpart (chunks, E); q > 1: sums of d over runs of u channels
// into gsum (rows, E / u), reduced per gate on the host (as causal_gate_bwd_kernel).
template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    rope_gate_bwd_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, const scalar_t* __restrict__ h,
                         Strides hs, bool vin, RopeGateArg<scalar_t> ga, Layout L, int64_t E, int64_t S, int64_t F,
                         CoeffArg<at::opmath_type<scalar_t>> ca, RopeArg<at::opmath_type<scalar_t>> ra,
                         const double* __restrict__ carry, const double* __restrict__ tot,
                         scalar_t* __restrict__ gpre, Strides gps, bool vgp,
                         at::opmath_type<scalar_t>* __restrict__ bpart, at::opmath_type<scalar_t>* __restrict__ gsum,
                         Strides gss, int u) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b = 0, n0 = 0, n1 = 0;
  const bool valid = L.chunk(blockIdx.x, b, n0, n1);
  const RopeLane r = rope_lane<V>(ra.P, S);
  if (__all_sync(0xffffffffu, r.nv == 0)) return;
  const int64_t q = ga.gate.q;
  acc_t fb[V];
#pragma unroll
  for (int j = 0; j < V; ++j) fb[j] = acc_t(0);
  if (valid) {
    rope_prefix_means<V, K>(h, hs, vin, L, b, n0, n1, E, F, r, ca, ra, carry, tot,
                            [&](int64_t n, const acc_t (&H)[V]) {
      acc_t d[V], dp[V], c[V], s[V];
      load_row<V>(g + L.off(gs, b, n), r.e0, gs.e, r.nv, vg, d);
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] *= H[j];
      partner_values<V>(d, dp);
      lane_factors<V>(ga.tab, q, L, b, n, r, c, s);
#pragma unroll
      for (int j = 0; j < V; ++j) d[j] = c[j] * d[j] + static_cast<acc_t>(r.sign) * s[j] * dp[j];
      if (r.nv == 0) return;
      if (q == 1) {
        acc_t x[V];
        ga.gate.template inputs<V>(L, b, n, r.e0, r.nv, x);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          d[j] *= math::hsig_grad(x[j]);
          fb[j] += d[j];
        }
        store_row<V>(gpre + L.off(gps, b, n), r.e0, gps.e, r.nv, vgp, d);
        return;
      }
      acc_t* dst = gsum + L.off(gss, b, n) + r.e0 / u;
      acc_t t = acc_t(0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j < r.nv) {  // nv is a multiple of u: u divides V and q, and q divides P
          t += d[j];
          if ((j + 1) % u == 0) {
            dst[j / u] = t;
            t = acc_t(0);
          }
        }
      }
    });
  }
  if (bpart && r.nv > 0) {
    acc_t* dst = bpart + static_cast<int64_t>(blockIdx.x) * E + r.e0;
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < r.nv) dst[j] = fb[j];
  }
}

struct ScanPlan {
  int tx;
  int64_t tiles;
  Layout L;
  LayoutKeep keep;
  bool single;  // every sequence is one chunk: no carries (never with split blocks: a block has cpb >= 2 chunks)
  int64_t F;    // block size, clamped to the number of rows (same blocks, no overflow)
};

template <typename scalar_t>
ScanPlan plan_scan(const at::Tensor& h, const c10::optional<at::Tensor>& cu, int64_t F, int64_t max_rows,
                   cudaStream_t stream) {
  constexpr int V = Vec<scalar_t>::value;
  ScanPlan p;
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu);
  p.tx = threads_x(E, V, 128);
  p.tiles = E == 0 ? 0 : ceil_div(E, static_cast<int64_t>(p.tx) * V);
  const int64_t rows = cu.has_value() ? h.size(0) : h.size(0) * h.size(1);
  const int64_t avg = B > 0 ? ceil_div(rows, B) : 0;
  p.F = std::min<int64_t>(F, std::max<int64_t>(rows, 1));
  // The rows a chunk should hold for the grid to fill the GPU; blocks larger than that are split (plan.h).
  const int64_t want = rows_per_chunk(avg, B, p.tiles, 64, 1, h.get_device(), std::min(32, 2048 / p.tx), max_rows);
  p.L = make_layout(h, cu, plan::make_plan(p.F, want), p.keep, stream);
  p.single = !cu.has_value() && p.L.ncps <= 1 && p.L.plan.cpb == 0;
  return p;
}

// The gate of hs = [h | pre]: pre's strides, q = E / S channels per gate, the bias in the accumulation type
// (held by `keep`).
template <typename scalar_t>
GateArg<scalar_t> gate_arg(const at::Tensor& pre, bool packed, int64_t E, const c10::optional<at::Tensor>& bias,
                           at::Tensor& keep) {
  using acc_t = at::opmath_type<scalar_t>;
  GateArg<scalar_t> a;
  a.pre = pre.data_ptr<scalar_t>();
  a.s = strides_of(pre, packed);
  a.q = E / pre.size(-1);
  a.vec = a.q == 1 && vectorizable<scalar_t>(pre.data_ptr(), a.s, E);
  if (bias.has_value()) {
    keep = bias->detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    a.bias = keep.data_ptr<acc_t>();
  }
  return a;
}

// The degrees the kernels of the weighted and the gated rope ops are instantiated for ("lean"): 2 (the models'
// default) with its fixed-degree kernels, every other degree with the generic-degree kernels (coefficients from a
// table), which keeps the build's size and time near those of the other ops alone.
template <int K>
constexpr bool kLeanDegree = K == 0 || K == 2;
template <typename Fn>
void lean_dispatch_degree(int degree, Fn&& fn) {
#ifdef POM_CUDA_ONE_VARIANT
  (void)degree;
  fn(std::integral_constant<int, 0>{});
#else
  if (degree == 2) {
    fn(std::integral_constant<int, 2>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
#endif
}

// The degree dispatch of an op: the lean degrees for the weighted and the gated rope kernels.
template <typename Fn>
void dispatch_causal_degree(int degree, bool lean, Fn&& fn) {
  if (lean) {
    lean_dispatch_degree(degree, std::forward<Fn>(fn));
  } else {
    cuda_dispatch_degree(degree, std::forward<Fn>(fn));
  }
}

// A rope call's kernel arguments: the features' tables, the sections S = E / (2 P), the channel tiles of the
// rope lanes (rope_lanes threads a row) and, for the gated op, its gate. 16-byte rows need every lane's first
// channel on a vector: P a multiple of V (lanes_vec).
template <typename scalar_t>
struct RopeCall {
  RopeArg<at::opmath_type<scalar_t>> ra;
  RopeGateArg<scalar_t> ga;
  bool gated = false;
  int64_t S = 1, tiles = 0;
  bool lanes_vec = false;

  RopeCall(const RopeHost& rope, int64_t E, int tx, const RopeGateArg<scalar_t>* gate)
      : ra(rope.arg<scalar_t>()), gated(gate != nullptr), S(E / (2 * rope.P)),
        tiles(ceil_div(plan::rope_lanes(rope.P, E / (2 * rope.P), Vec<scalar_t>::value), static_cast<int64_t>(tx))),
        lanes_vec(rope.P % Vec<scalar_t>::value == 0) {
    if (gate) ga = *gate;
  }
};

// The gated rope op's gate: the gated op's gate (gate_arg; 16-byte loads of pre need the rope lanes' alignment
// too) and the gate tables at the features' positions.
template <typename scalar_t>
RopeGateArg<scalar_t> rope_gate_arg(const GateArg<scalar_t>& gate, const RopeHost& rope) {
  RopeGateArg<scalar_t> a;
  a.gate = gate;
  a.gate.vec = a.gate.vec && rope.P % Vec<scalar_t>::value == 0;
  a.tab = rope.gate_arg<scalar_t>();
  return a;
}

// out (E columns, laid out like h) = H, or gate * H when the gate is set; with wa (no gate) the weighted prefix
// means; with rope, the rope op's H~ on the rope lanes (times the turned gate rope_gate of the gated rope op).
template <typename scalar_t>
void causal_forward(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                    const c10::optional<at::Tensor>& cu, const GateArg<scalar_t>& gate,
                    const WeightArg<at::opmath_type<scalar_t>>* wa, at::Tensor& out, cudaStream_t stream,
                    const RopeHost* rope = nullptr, const RopeGateArg<scalar_t>* rope_gate = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t E = h.size(-1);
  const bool packed = cu.has_value();
  // Outputs come from Kahan-compensated scans: chunks may be as long as the sequence.
  ScanPlan p = plan_scan<scalar_t>(h, cu, block_size, std::numeric_limits<int64_t>::max(), stream);
  if (p.L.nchunks == 0) return;
  c10::optional<RopeCall<scalar_t>> rc;
  if (rope) rc.emplace(*rope, E, p.tx, rope_gate);
  const bool lv = !rc || rc->lanes_vec;
  at::Tensor keep;
  auto ca = coeff_arg<acc_t>(coeff, keep);
  const Strides hs = strides_of(h, packed), os = strides_of(out, packed);
  const bool vin = lv && vectorizable<scalar_t>(h.data_ptr(), hs, E);
  const bool vout = lv && vectorizable<scalar_t>(out.data_ptr(), os, E);
  const dim3 grid = grid_of(p.L.nchunks, rc ? rc->tiles : p.tiles);
  const bool rope_gated = rc && rc->gated;
  dispatch_causal_degree(static_cast<int>(coeff.size(1)), wa != nullptr || rope_gated, [&](auto Kc) {
    constexpr int K = decltype(Kc)::value;
    at::Tensor tot, carry;
    if (!p.single) {
      tot = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
      carry = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
      bool done = false;
      if constexpr (kLeanDegree<K>) {
        if (wa) {
          causal_tot_weighted_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L,
                                                                              E, ca, *wa, tot.data_ptr<double>());
          done = true;
        }
      }
      if (done) {
      } else if (rc) {
        rope_tot_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L, E, rc->S, ca,
                                                                 rc->ra, tot.data_ptr<double>());
      } else {
        causal_tot_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L, E, ca,
                                                                   tot.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_chunk_scan(tot.data_ptr<double>(), carry.data_ptr<double>(), p.L, E, false, stream);
    }
    const double* cp = p.single ? nullptr : carry.data_ptr<double>();
    const double* tp = p.single ? nullptr : tot.data_ptr<double>();
    scalar_t* const op = out.data_ptr<scalar_t>();
    const scalar_t* const hp = h.data_ptr<scalar_t>();
    if constexpr (kLeanDegree<K>) {
      if (wa) {
        causal_scan_weighted_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(hp, hs, vin, op, os, vout, p.L, E, p.F, ca,
                                                                             cp, tp, *wa);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      if (rope_gated) {
        rope_scan_kernel<scalar_t, K, true><<<grid, p.tx, 0, stream>>>(hp, hs, vin, op, os, vout, p.L, E, rc->S, p.F,
                                                                        ca, rc->ra, cp, tp, rc->ga);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    if (rc) {
      rope_scan_kernel<scalar_t, K, false><<<grid, p.tx, 0, stream>>>(hp, hs, vin, op, os, vout, p.L, E, rc->S, p.F,
                                                                       ca, rc->ra, cp, tp, rc->ga);
    } else {
      causal_scan_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(hp, hs, vin, op, os, vout, p.L, E, p.F, ca, cp, tp,
                                                                  gate);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_h into gh (laid out like h) for the upstream gradient g, times the gate when it is set; returns
// grad_coeff. p: the backward's plan (chunks of at most kMaxBwdRows rows). rc: the rope op's scans on the rope
// lanes (g times the turned gate for the gated rope op; `gate` unused).
template <typename scalar_t>
at::Tensor causal_backward(const at::Tensor& g, const at::Tensor& h, const at::Tensor& coeff, const ScanPlan& p,
                           const GateArg<scalar_t>& gate, const WeightArg<at::opmath_type<scalar_t>>* wa,
                           const at::Tensor& gh, bool packed, cudaStream_t stream,
                           const RopeCall<scalar_t>* rc = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1);
  const int64_t nslots = h.numel() == 0 ? 0 : p.L.nchunks;
  at::Tensor part = at::empty({std::max<int64_t>(nslots, 1), deg, E},
                               h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (nslots > 0) {
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    const bool lv = rc == nullptr || rc->lanes_vec;
    const bool rope_gated = rc && rc->gated;
    const Strides hs = strides_of(h, packed), gs = strides_of(g, packed), ghs = strides_of(gh, packed);
    const bool vin = lv && vectorizable<scalar_t>(h.data_ptr(), hs, E);
    const bool vg = vectorizable<scalar_t>(g.data_ptr(), gs, E);
    const bool vout = lv && vectorizable<scalar_t>(gh.data_ptr(), ghs, E);
    const dim3 plain_grid = grid_of(p.L.nchunks, p.tiles);
    const dim3 grid = rc ? grid_of(p.L.nchunks, rc->tiles) : plain_grid;
    at::Tensor tot, carry;
    if (!p.single) {
      tot = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
      carry = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
      if (wa) {
        causal_bwd_tot_weighted_kernel<scalar_t><<<grid, p.tx, 0, stream>>>(g.data_ptr<scalar_t>(), gs, vg, *wa,
                                                                             p.L, E, p.F, tot.data_ptr<double>());
      } else if (rope_gated) {
        // g s~ on the rope lanes (the turned gate needs the partner lane).
        rope_bwd_tot_kernel<scalar_t><<<grid, p.tx, 0, stream>>>(g.data_ptr<scalar_t>(), gs, vg && lv, rc->ga, p.L, E,
                                                                  rc->ra.P, rc->S, p.F, tot.data_ptr<double>());
      } else {
        // The rope op's suffix sums of g inv are the plain op's (plain channels, plain grid).
        causal_bwd_tot_kernel<scalar_t><<<plain_grid, p.tx, 0, stream>>>(g.data_ptr<scalar_t>(), gs, vg, gate, p.L,
                                                                          E, p.F, tot.data_ptr<double>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_chunk_scan(tot.data_ptr<double>(), carry.data_ptr<double>(), p.L, E, true, stream);
    }
    acc_t* const partp = part.data_ptr<acc_t>();
    const double* cp = p.single ? nullptr : carry.data_ptr<double>();
    const double* tp = p.single ? nullptr : tot.data_ptr<double>();
    const scalar_t* const gp = g.data_ptr<scalar_t>();
    const scalar_t* const hp = h.data_ptr<scalar_t>();
    scalar_t* const ghp = gh.data_ptr<scalar_t>();
    dispatch_causal_degree(deg, wa != nullptr || rope_gated, [&](auto Kc) {
      constexpr int K = decltype(Kc)::value;
      if constexpr (kLeanDegree<K>) {
        if (wa) {
          auto kernel = p.L.plan.cpb > 0 ? causal_bwd_scan_weighted_kernel<scalar_t, K, kSplitBlocks>
                        : p.F == 1      ? causal_bwd_scan_weighted_kernel<scalar_t, K, kTokens>
                                        : causal_bwd_scan_weighted_kernel<scalar_t, K, kWholeBlocks>;
          kernel<<<grid, p.tx, 0, stream>>>(gp, gs, vg, *wa, hp, hs, vin, ghp, ghs, vout, p.L, E, p.F, ca, cp, tp,
                                            partp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        if (rope_gated && p.L.plan.cpb == 0) {  // split blocks read no g: the ungated kernel
          auto kernel = p.F == 1 ? rope_bwd_scan_kernel<scalar_t, K, kTokens, true>
                                 : rope_bwd_scan_kernel<scalar_t, K, kWholeBlocks, true>;
          kernel<<<grid, p.tx, 0, stream>>>(gp, gs, vg && lv, hp, hs, vin, ghp, ghs, vout, p.L, E, rc->S, p.F, ca,
                                            rc->ra, cp, tp, partp, rc->ga);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      if (rc) {
        auto kernel = p.L.plan.cpb > 0 ? rope_bwd_scan_kernel<scalar_t, K, kSplitBlocks, false>
                      : p.F == 1      ? rope_bwd_scan_kernel<scalar_t, K, kTokens, false>
                                      : rope_bwd_scan_kernel<scalar_t, K, kWholeBlocks, false>;
        kernel<<<grid, p.tx, 0, stream>>>(gp, gs, vg && lv, hp, hs, vin, ghp, ghs, vout, p.L, E, rc->S, p.F, ca,
                                          rc->ra, cp, tp, partp, rc->ga);
      } else {
        auto kernel = p.L.plan.cpb > 0 ? causal_bwd_scan_kernel<scalar_t, K, kSplitBlocks>
                      : p.F == 1      ? causal_bwd_scan_kernel<scalar_t, K, kTokens>
                                      : causal_bwd_scan_kernel<scalar_t, K, kWholeBlocks>;
        kernel<<<grid, p.tx, 0, stream>>>(gp, gs, vg, gate, hp, hs, vin, ghp, ghs, vout, p.L, E, p.F, ca, cp, tp,
                                          partp);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return reduce_coeff_grad(part, nslots, deg, E, coeff, stream);
}

// Gradient of the gate columns into gpre and of the bias (returned, in the dtype of `like`), recomputing H
// by a forward scan on the backward's plan p. bias: the gate's bias in the accumulation type (or undefined).
// rc: the gated rope op (H~ and the turned gate on the rope lanes), else the plain gated op.
template <typename scalar_t>
at::Tensor gate_backward(const at::Tensor& g, const at::Tensor& h, const at::Tensor& pre, const at::Tensor& coeff,
                         const ScanPlan& p, const GateArg<scalar_t>& gate, const at::Tensor& bias,
                         const at::Tensor& gpre, bool packed, const at::Tensor& like, cudaStream_t stream,
                         const RopeCall<scalar_t>* rc = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t E = h.size(-1), S = pre.size(-1), q = gate.q;
  const int64_t nslots = h.numel() == 0 ? 0 : p.L.nchunks;
  const int u = static_cast<int>(std::gcd(q, static_cast<int64_t>(V)));
  // q == 1: per-chunk partials of the bias gradient; q > 1: run sums of g * H, (rows, E / u).
  at::Tensor bpart, gsum;
  if (q == 1) {
    bpart = at::empty({std::max<int64_t>(nslots, 1), 1, E}, h.options().dtype(acc_type));
  } else {
    auto sizes = h.sizes().vec();
    sizes.back() = E / u;
    gsum = at::empty(sizes, h.options().dtype(acc_type));
  }
  if (nslots > 0) {
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    const Strides hs = strides_of(h, packed), gs = strides_of(g, packed), gps = strides_of(gpre, packed);
    const Strides gss = q == 1 ? Strides{} : strides_of(gsum, packed);
    const bool lv = rc == nullptr || rc->lanes_vec;
    const bool vin = lv && vectorizable<scalar_t>(h.data_ptr(), hs, E);
    const bool vg = lv && vectorizable<scalar_t>(g.data_ptr(), gs, E);
    const bool vgp = lv && q == 1 && vectorizable<scalar_t>(gpre.data_ptr(), gps, E);
    const dim3 grid = grid_of(p.L.nchunks, rc ? rc->tiles : p.tiles);
    scalar_t* const gpp = q == 1 ? gpre.data_ptr<scalar_t>() : nullptr;
    acc_t* const bpp = q == 1 ? bpart.data_ptr<acc_t>() : nullptr;
    acc_t* const gsp = q == 1 ? nullptr : gsum.data_ptr<acc_t>();
    dispatch_causal_degree(static_cast<int>(coeff.size(1)), rc != nullptr, [&](auto Kc) {
      constexpr int K = decltype(Kc)::value;
      at::Tensor tot, carry;
      if (!p.single) {
        tot = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        carry = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        if (rc) {
          rope_tot_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L, E, rc->S, ca,
                                                                   rc->ra, tot.data_ptr<double>());
        } else {
          causal_tot_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L, E, ca,
                                                                     tot.data_ptr<double>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_chunk_scan(tot.data_ptr<double>(), carry.data_ptr<double>(), p.L, E, false, stream);
      }
      const double* cp = p.single ? nullptr : carry.data_ptr<double>();
      const double* tp = p.single ? nullptr : tot.data_ptr<double>();
      if constexpr (kLeanDegree<K>) {
        if (rc) {
          rope_gate_bwd_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(
              g.data_ptr<scalar_t>(), gs, vg, h.data_ptr<scalar_t>(), hs, vin, rc->ga, p.L, E, rc->S, p.F, ca, rc->ra,
              cp, tp, gpp, gps, vgp, bpp, gsp, gss, u);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      causal_gate_bwd_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(
          g.data_ptr<scalar_t>(), gs, vg, h.data_ptr<scalar_t>(), hs, vin, gate, p.L, E, p.F, ca, cp, tp, gpp, gps,
          vgp, bpp, gsp, gss, u);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (q == 1) return reduce_coeff_grad(bpart, nslots, 1, E, like, stream).view({E});
  // Per group: the sum of its runs times hardsigmoid'(pre + bias) (math::hsig_grad: the float 1/6 inside
  // (-3, 3)); the bias gradient sums the rows in fp64.
  at::Tensor x = pre.to(acc_type).reshape({-1, S});
  if (bias.defined()) x = x + bias;
  const at::Tensor slope = at::logical_and(x > -3, x < 3).to(acc_type) * static_cast<double>(1.0f / 6.0f);
  const at::Tensor gp = gsum.reshape({-1, S, q / u}).sum(-1) * slope;
  gpre.copy_(gp.view(gpre.sizes()));
  return gp.to(at::kDouble).sum(0).to(like.scalar_type());
}

// The weights as the kernels read them: (w, inv) pairs (weight_grad.h) in the accumulation type, one per row of h
// (held by keep).
template <typename acc_t>
WeightArg<acc_t> weight_arg(const at::Tensor& weight, int64_t block_size, const c10::optional<at::Tensor>& cu,
                            at::Tensor& keep) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  keep = at::stack({weight.to(at::kDouble), inverse_prefix_weights(weight, block_size, cu)}, -1).to(acc).contiguous();
  WeightArg<acc_t> a;
  a.wi = keep.data_ptr<acc_t>();
  return a;
}

// The forward and the backward (grad_h, grad_coeff) of the plain (weight == nullptr) and the weighted causal op,
// after their checks.
at::Tensor causal_op(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                     const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor* weight) {
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return out;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_causal_cuda", [&] {
    at::Tensor keep;
    WeightArg<at::opmath_type<scalar_t>> wa;
    if (weight) wa = weight_arg<at::opmath_type<scalar_t>>(*weight, block_size, cu_seqlens, keep);
    causal_forward<scalar_t>(h, coeff, block_size, cu_seqlens, GateArg<scalar_t>{}, weight ? &wa : nullptr, out,
                             stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> causal_backward_op(const at::Tensor& grad_H, const at::Tensor& h,
                                                      const at::Tensor& coeff, int64_t block_size,
                                                      const c10::optional<at::Tensor>& cu_seqlens,
                                                      const at::Tensor* weight) {
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto g = grad_H.scalar_type() == h.scalar_type() ? grad_H : grad_H.to(h.scalar_type());
  auto gh = at::empty(h.sizes(), h.options());
  at::Tensor gc;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_causal_backward_cuda", [&] {
    // grad_coeff partials are plain fp32 sums per chunk: keep chunks short.
    const ScanPlan p = plan_scan<scalar_t>(h, cu_seqlens, block_size, kMaxBwdRows, stream);
    at::Tensor keep;
    WeightArg<at::opmath_type<scalar_t>> wa;
    if (weight) wa = weight_arg<at::opmath_type<scalar_t>>(*weight, block_size, cu_seqlens, keep);
    gc = causal_backward<scalar_t>(g, h, coeff, p, GateArg<scalar_t>{}, weight ? &wa : nullptr, gh,
                                   cu_seqlens.has_value(), stream);
  });
  return {gh, gc};
}

at::Tensor poly_causal_cuda(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  checks::causal_args("pom_ext::poly_causal", h, coeff, block_size, cu_seqlens);
  validate_offsets("pom_ext::poly_causal", cu_seqlens, h.size(0));
  return causal_op(h, coeff, block_size, cu_seqlens, nullptr);
}

std::tuple<at::Tensor, at::Tensor> poly_causal_backward_cuda(const at::Tensor& grad_H, const at::Tensor& h,
                                                             const at::Tensor& coeff, int64_t block_size,
                                                             const c10::optional<at::Tensor>& cu_seqlens) {
  checks::causal_backward_args("pom_ext::poly_causal_backward", grad_H, h, coeff, block_size, cu_seqlens);
  validate_offsets("pom_ext::poly_causal_backward", cu_seqlens, h.size(0));
  return causal_backward_op(grad_H, h, coeff, block_size, cu_seqlens, nullptr);
}

at::Tensor poly_causal_weighted_cuda(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                     int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_weighted";
  checks::causal_weighted_args(op, h, coeff, weight, block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  return causal_op(h, coeff, block_size, cu_seqlens, &weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_weighted_backward_cuda(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& weight, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_causal_weighted_backward";
  checks::causal_weighted_backward_args(op, grad_H, H, h, coeff, weight, block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  auto [gh, gc] = causal_backward_op(grad_H, h, coeff, block_size, cu_seqlens, &weight);
  at::Tensor gw = at::empty({0}, h.options());
  if (weight_grad) {
    // The weights' gradient needs p: the element-wise op through the dispatcher (its CUDA kernel).
    c10::cuda::CUDAGuard guard(h.device());
    static const auto eval = detail::op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("pom_ext::poly_eval");
    gw = causal_weight_grad(grad_H, H, eval.call(h, coeff), weight, block_size, cu_seqlens);
  }
  return {gh, gc, gw};
}

// The gated ops after their checks: hs = [h | pre] (E + S columns), y = s * H with s = hardsigmoid(pre +
// gate_bias) per gate group; with rope (the gated rope op, its gate tables set), y = s~ * H~, the features and the
// gate turned at the positions.
at::Tensor gated_op(const at::Tensor& hs, const at::Tensor& coeff, const c10::optional<at::Tensor>& gate_bias,
                    int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens, const RopeHost* rope) {
  c10::cuda::CUDAGuard guard(hs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t E = coeff.size(0), S = hs.size(-1) - E;
  auto sizes = hs.sizes().vec();
  sizes.back() = E;
  auto out = at::empty(sizes, hs.options());
  if (out.numel() == 0) return out;
  const at::Tensor h = hs.narrow(-1, 0, E), pre = hs.narrow(-1, E, S);
  POM_DISPATCH_FLOATING(hs.scalar_type(), "poly_causal_gated_cuda", [&] {
    at::Tensor keep;
    const auto gate = gate_arg<scalar_t>(pre, cu_seqlens.has_value(), E, gate_bias, keep);
    if (!rope) {
      causal_forward<scalar_t>(h, coeff, block_size, cu_seqlens, gate, nullptr, out, stream);
      return;
    }
    const auto ga = rope_gate_arg<scalar_t>(gate, *rope);
    causal_forward<scalar_t>(h, coeff, block_size, cu_seqlens, GateArg<scalar_t>{}, nullptr, out, stream, rope, &ga);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_backward_op(const at::Tensor& grad_y, const at::Tensor& hs,
                                                                 const at::Tensor& coeff,
                                                                 const c10::optional<at::Tensor>& gate_bias,
                                                                 int64_t block_size,
                                                                 const c10::optional<at::Tensor>& cu_seqlens,
                                                                 const RopeHost* rope) {
  c10::cuda::CUDAGuard guard(hs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t E = coeff.size(0), S = hs.size(-1) - E;
  const bool packed = cu_seqlens.has_value();
  const at::Tensor h = hs.narrow(-1, 0, E), pre = hs.narrow(-1, E, S);
  auto g = grad_y.scalar_type() == hs.scalar_type() ? grad_y : grad_y.to(hs.scalar_type());
  // One buffer for both gradients, with the layout of a contiguous hs.
  auto ghs = at::empty(hs.sizes(), hs.options());
  const at::Tensor gh = ghs.narrow(-1, 0, E), gpre = ghs.narrow(-1, E, S);
  const at::Tensor& like = gate_bias.has_value() ? *gate_bias : hs;
  at::Tensor gc, gbias;
  POM_DISPATCH_FLOATING(hs.scalar_type(), "poly_causal_gated_backward_cuda", [&] {
    const ScanPlan p = plan_scan<scalar_t>(h, cu_seqlens, block_size, kMaxBwdRows, stream);
    at::Tensor keep;
    const auto gate = gate_arg<scalar_t>(pre, packed, E, gate_bias, keep);
    if (!rope) {
      gbias = gate_backward<scalar_t>(g, h, pre, coeff, p, gate, keep, gpre, packed, like, stream);
      gc = causal_backward<scalar_t>(g, h, coeff, p, gate, nullptr, gh, packed, stream);
      return;
    }
    const auto ga = rope_gate_arg<scalar_t>(gate, *rope);
    const RopeCall<scalar_t> rc(*rope, E, p.tx, &ga);
    gbias = gate_backward<scalar_t>(g, h, pre, coeff, p, ga.gate, keep, gpre, packed, like, stream, &rc);
    gc = causal_backward<scalar_t>(g, h, coeff, p, GateArg<scalar_t>{}, nullptr, gh, packed, stream, &rc);
  });
  return {ghs, gc, gbias};
}

at::Tensor poly_causal_gated_cuda(const at::Tensor& hs, const at::Tensor& coeff,
                                  const c10::optional<at::Tensor>& gate_bias, int64_t block_size,
                                  const c10::optional<at::Tensor>& cu_seqlens) {
  checks::causal_gated_args("pom_ext::poly_causal_gated", hs, coeff, gate_bias, block_size, cu_seqlens);
  validate_offsets("pom_ext::poly_causal_gated", cu_seqlens, hs.size(0));
  return gated_op(hs, coeff, gate_bias, block_size, cu_seqlens, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& gate_bias, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_backward";
  checks::causal_gated_backward_args(op, grad_y, hs, coeff, gate_bias, block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, hs.size(0));
  return gated_backward_op(grad_y, hs, coeff, gate_bias, block_size, cu_seqlens, nullptr);
}

at::Tensor poly_causal_rope_cuda(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,
                                 const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_rope";
  checks::causal_rope_args(op, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RopeHost rope(op, h, cos, sin, positions, cu_seqlens);
  auto out = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return out;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_causal_rope_cuda", [&] {
    causal_forward<scalar_t>(h, coeff, block_size, cu_seqlens, GateArg<scalar_t>{}, nullptr, out, stream, &rope);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> poly_causal_rope_backward_cuda(const at::Tensor& grad_H, const at::Tensor& h,
                                                                  const at::Tensor& coeff, const at::Tensor& cos,
                                                                  const at::Tensor& sin, const at::Tensor& positions,
                                                                  int64_t block_size,
                                                                  const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_rope_backward";
  checks::causal_rope_backward_args(op, grad_H, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const RopeHost rope(op, h, cos, sin, positions, cu_seqlens);
  auto g = grad_H.scalar_type() == h.scalar_type() ? grad_H : grad_H.to(h.scalar_type());
  auto gh = at::empty(h.sizes(), h.options());
  at::Tensor gc;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_causal_rope_backward_cuda", [&] {
    // grad_coeff partials are plain fp32 sums per chunk: keep chunks short.
    const ScanPlan p = plan_scan<scalar_t>(h, cu_seqlens, block_size, kMaxBwdRows, stream);
    const RopeCall<scalar_t> rc(rope, h.size(-1), p.tx, nullptr);
    gc = causal_backward<scalar_t>(g, h, coeff, p, GateArg<scalar_t>{}, nullptr, gh, cu_seqlens.has_value(), stream,
                                   &rc);
  });
  return {gh, gc};
}

// The gated rope op: the positions checked and the tables (with the gate's) made ready once, then the gated ops'
// bodies on the rope lanes. (RopeHost reads only hs's dtype and leading sizes, which are h's.)
at::Tensor poly_causal_gated_rope_cuda(const at::Tensor& hs, const at::Tensor& coeff,
                                       const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos,
                                       const at::Tensor& sin, const at::Tensor& gate_cos, const at::Tensor& gate_sin,
                                       const at::Tensor& positions, int64_t block_size,
                                       const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_rope";
  checks::causal_gated_rope_args(op, hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions, block_size,
                                 cu_seqlens);
  validate_offsets(op, cu_seqlens, hs.size(0));
  c10::cuda::CUDAGuard guard(hs.device());
  RopeHost rope(op, hs, cos, sin, positions, cu_seqlens);
  rope.gate(gate_cos, gate_sin);
  return gated_op(hs, coeff, gate_bias, block_size, cu_seqlens, &rope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_rope_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& gate_cos, const at::Tensor& gate_sin, const at::Tensor& positions, int64_t block_size,
    const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_rope_backward";
  checks::causal_gated_rope_backward_args(op, grad_y, hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions,
                                          block_size, cu_seqlens);
  validate_offsets(op, cu_seqlens, hs.size(0));
  c10::cuda::CUDAGuard guard(hs.device());
  RopeHost rope(op, hs, cos, sin, positions, cu_seqlens);
  rope.gate(gate_cos, gate_sin);
  return gated_backward_op(grad_y, hs, coeff, gate_bias, block_size, cu_seqlens, &rope);
}

}  // namespace

}  // namespace cuda

namespace detail {

void register_cuda_causal(torch::Library& m) {
  m.impl("poly_causal", &cuda::poly_causal_cuda);
  m.impl("poly_causal_backward", &cuda::poly_causal_backward_cuda);
  m.impl("poly_causal_weighted", &cuda::poly_causal_weighted_cuda);
  m.impl("poly_causal_weighted_backward", &cuda::poly_causal_weighted_backward_cuda);
  m.impl("poly_causal_gated", &cuda::poly_causal_gated_cuda);
  m.impl("poly_causal_gated_backward", &cuda::poly_causal_gated_backward_cuda);
  m.impl("poly_causal_rope", &cuda::poly_causal_rope_cuda);
  m.impl("poly_causal_rope_backward", &cuda::poly_causal_rope_backward_cuda);
  m.impl("poly_causal_gated_rope", &cuda::poly_causal_gated_rope_cuda);
  m.impl("poly_causal_gated_rope_backward", &cuda::poly_causal_gated_rope_backward_cuda);
}

}  // namespace detail
}  // namespace pom_ext
