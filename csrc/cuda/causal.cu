// Causal and block-causal prefix means (poly_causal) and their backward on CUDA.
//
// Rows are cut into chunks of R rows (R a multiple of the block size F, so an
// F-block never straddles two chunks; chunks never cross a sequence). Grid
// (chunks, channel tiles), block (TX, 1), V channels per thread.
// Forward:
//  1. causal_tot: Kahan sum of p over each chunk that has a successor in its
//     sequence -> tot (fp64). Reads h once.
//  2. launch_chunk_scan: exclusive scan of the totals per (sequence, channel) in fp64.
//  3. causal_scan: every chunk rescans from its carry (Kahan-compensated fp32,
//     fp64 for double); F = 1 writes (S / (n + 1)) per row, F > 1 writes the
//     block's mean to each of its rows. Reads h once more, writes out once.
//  With one chunk per sequence (dense), passes 1-2 are skipped.
// Backward (g: grad of the output; G_j = sum of g over F-block j / end_j):
//  1. causal_bwd_tot: sum of G_j over each chunk that has a predecessor. Reads g.
//  2. suffix scan of the totals.
//  3. causal_bwd_scan: F-blocks in reverse, gbar = running suffix sum of G;
//     grad_h = gbar * dp/dh; grad_coeff partials per chunk, reduced in chunk
//     order (reduce_coeff_grad). Reads g and h once, writes grad_h once.
#include <torch/library.h>

#include <limits>

#include "common.cuh"

namespace pom_ext {
namespace cuda {
namespace {

constexpr int kU = 4;                  // rows loaded ahead of the sequential scan
constexpr int64_t kMaxBwdRows = 4096;  // rows per chunk of the backward scan

// fn(n, x) for rows n = na .. nb - 1 in order, loads issued kU rows at a time.
template <int V, typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void for_rows(const scalar_t* __restrict__ p, const Strides& s, bool vec, const Layout& L,
                                         int64_t b, int64_t na, int64_t nb, int64_t e0, int nv, Fn&& fn) {
  int64_t n = na;
  for (; n + kU <= nb; n += kU) {
    acc_t x[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) load_row<V>(p + L.off(s, b, n + u), e0, s.e, nv, vec, x[u]);
#pragma unroll
    for (int u = 0; u < kU; ++u) fn(n + u, x[u]);
  }
  for (; n < nb; ++n) {
    acc_t x[V];
    load_row<V>(p + L.off(s, b, n), e0, s.e, nv, vec, x);
    fn(n, x);
  }
}

// fn(n, x1, x2) for rows n = nb - 1 down to na, from two tensors.
template <int V, typename scalar_t, typename acc_t, typename Fn>
__device__ __forceinline__ void for_rows2_rev(const scalar_t* __restrict__ p1, const Strides& s1, bool v1,
                                              const scalar_t* __restrict__ p2, const Strides& s2, bool v2,
                                              const Layout& L, int64_t b, int64_t na, int64_t nb, int64_t e0, int nv,
                                              Fn&& fn) {
  int64_t n = nb;
  for (; n - kU >= na; n -= kU) {
    acc_t x1[kU][V], x2[kU][V];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      load_row<V>(p1 + L.off(s1, b, n - 1 - u), e0, s1.e, nv, v1, x1[u]);
      load_row<V>(p2 + L.off(s2, b, n - 1 - u), e0, s2.e, nv, v2, x2[u]);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) fn(n - 1 - u, x1[u], x2[u]);
  }
  for (; n > na; --n) {
    acc_t x1[V], x2[V];
    load_row<V>(p1 + L.off(s1, b, n - 1), e0, s1.e, nv, v1, x1);
    load_row<V>(p2 + L.off(s2, b, n - 1), e0, s2.e, nv, v2, x2);
    fn(n - 1, x1, x2);
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_tot_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L, int64_t E,
                      CoeffArg<at::opmath_type<scalar_t>> ca, double* __restrict__ tot) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1) || n1 >= L.len(b)) return;  // the last chunk's total is never used
  const int64_t e0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (e0 >= E) return;
  const int nv = E - e0 < V ? static_cast<int>(E - e0) : V;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  acc_t run[V], comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = comp[j] = acc_t(0);
  for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, e0, nv, [&](int64_t, const acc_t (&x)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], cc.poly(j, math::act(x[j])));
  });
  double* t = tot + static_cast<int64_t>(blockIdx.x) * E + e0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < nv) t[j] = static_cast<double>(run[j]) - static_cast<double>(comp[j]);
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

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_scan_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, scalar_t* __restrict__ out, Strides os,
                       bool vout, Layout L, int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                       const double* __restrict__ carry) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1)) return;
  const int64_t e0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (e0 >= E) return;
  const int nv = E - e0 < V ? static_cast<int>(E - e0) : V;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  acc_t run[V], comp[V];
  start_from_carry<acc_t, V>(n0 > 0 ? carry : nullptr, blockIdx.x, E, e0, nv, run, comp);
  if (F == 1) {
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(n + 1);
      acc_t o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        math::kahan_add(run[j], comp[j], cc.poly(j, math::act(x[j])));
        o[j] = (run[j] - comp[j]) * inv;
      }
      store_row<V>(out + L.off(os, b, n), e0, os.e, nv, vout, o);
    });
    return;
  }
  for (int64_t blk = n0; blk < n1; blk += F) {
    const int64_t bend = blk + F < n1 ? blk + F : n1;
    for_rows<V, scalar_t, acc_t>(h, hs, vin, L, b, blk, bend, e0, nv, [&](int64_t, const acc_t (&x)[V]) {
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], cc.poly(j, math::act(x[j])));
    });
    const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
    acc_t o[V];
#pragma unroll
    for (int j = 0; j < V; ++j) o[j] = (run[j] - comp[j]) * inv;
    for (int64_t n = blk; n < bend; ++n) store_row<V>(out + L.off(os, b, n), e0, os.e, nv, vout, o);
  }
}

// Sum of the gradient rows of F-block [blk, bend), divided by bend.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void block_grad(const scalar_t* g, const Strides& gs, bool vg, const Layout& L, int64_t b,
                                           int64_t blk, int64_t bend, int64_t e0, int nv, acc_t (&G)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) G[j] = acc_t(0);
  for_rows<V, scalar_t, acc_t>(g, gs, vg, L, b, blk, bend, e0, nv, [&](int64_t, const acc_t (&x)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) G[j] += x[j];
  });
  const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
#pragma unroll
  for (int j = 0; j < V; ++j) G[j] *= inv;
}

template <typename scalar_t>
__global__ void __launch_bounds__(128)
    causal_bwd_tot_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, Layout L, int64_t E, int64_t F,
                          double* __restrict__ tot) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b, n0, n1;
  if (!L.chunk(blockIdx.x, b, n0, n1) || n0 == 0) return;  // the first chunk's total is never used
  const int64_t e0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (e0 >= E) return;
  const int nv = E - e0 < V ? static_cast<int>(E - e0) : V;
  acc_t run[V], comp[V];
#pragma unroll
  for (int j = 0; j < V; ++j) run[j] = comp[j] = acc_t(0);
  if (F == 1) {
    for_rows<V, scalar_t, acc_t>(g, gs, vg, L, b, n0, n1, e0, nv, [&](int64_t n, const acc_t (&x)[V]) {
      const acc_t inv = acc_t(1) / static_cast<acc_t>(n + 1);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], x[j] * inv);
    });
  } else {
    for (int64_t blk = n0; blk < n1; blk += F) {
      const int64_t bend = blk + F < n1 ? blk + F : n1;
      acc_t G[V];
      block_grad<V>(g, gs, vg, L, b, blk, bend, e0, nv, G);
#pragma unroll
      for (int j = 0; j < V; ++j) math::kahan_add(run[j], comp[j], G[j]);
    }
  }
  double* t = tot + static_cast<int64_t>(blockIdx.x) * E + e0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (j < nv) t[j] = static_cast<double>(run[j]) - static_cast<double>(comp[j]);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(128)
    causal_bwd_scan_kernel(const scalar_t* __restrict__ g, Strides gs, bool vg, const scalar_t* __restrict__ h,
                           Strides hs, bool vin, scalar_t* __restrict__ gh, Strides ghs, bool vout, Layout L,
                           int64_t E, int64_t F, CoeffArg<at::opmath_type<scalar_t>> ca,
                           const double* __restrict__ carry, at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t b = 0, n0 = 0, n1 = 0;
  const bool valid = L.chunk(blockIdx.x, b, n0, n1);
  const int64_t e0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (e0 >= E) return;
  const int nv = E - e0 < V ? static_cast<int>(E - e0) : V;
  CoeffGradAcc<K, V, acc_t> f;
  f.init(part + static_cast<int64_t>(blockIdx.x) * ca.deg * E + e0, E, nv, ca.deg);
  if (valid) {
    ChanCoeff<K, V, acc_t> cc;
    cc.load(ca, e0, nv);
    acc_t run[V], comp[V];
    start_from_carry<acc_t, V>(n1 < L.len(b) ? carry : nullptr, blockIdx.x, E, e0, nv, run, comp);
    // gbar-weighted element backward of one row of h.
    auto row_backward = [&](int64_t n, const acc_t (&gb)[V], const acc_t (&x)[V]) {
      acc_t gx[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t a = math::act(x[j]);
        acc_t p, dp;
        cc.poly_and_slope(j, a, p, dp);
        gx[j] = gb[j] * math::act_grad(x[j]) * dp;
        f.add_powers(j, gb[j], a);
      }
      store_row<V>(gh + L.off(ghs, b, n), e0, ghs.e, nv, vout, gx);
    };
    if (F == 1) {
      for_rows2_rev<V, scalar_t, acc_t>(g, gs, vg, h, hs, vin, L, b, n0, n1, e0, nv,
                                        [&](int64_t n, const acc_t (&gv)[V], const acc_t (&x)[V]) {
                                          const acc_t inv = acc_t(1) / static_cast<acc_t>(n + 1);
                                          acc_t gb[V];
#pragma unroll
                                          for (int j = 0; j < V; ++j) {
                                            math::kahan_add(run[j], comp[j], gv[j] * inv);
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
        block_grad<V>(g, gs, vg, L, b, blk, bend, e0, nv, G);
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

struct ScanPlan {
  int tx;
  int64_t tiles;
  Layout L;
  LayoutKeep keep;
  bool single;  // every sequence is one chunk: no carries
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
  const int64_t R = rows_per_chunk(avg, B, p.tiles, 64, p.F, h.get_device(), std::min(32, 2048 / p.tx), max_rows);
  p.L = make_layout(h, cu, R, p.keep, stream);
  p.single = !cu.has_value() && p.L.ncps <= 1;
  return p;
}

at::Tensor poly_causal_cuda(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal";
  checks::causal_args(op, h, coeff, block_size, cu_seqlens);
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1);
  const bool packed = cu_seqlens.has_value();
  auto out = at::empty(h.sizes(), h.options());
  if (h.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_causal_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Outputs come from Kahan-compensated scans: chunks may be as long as the sequence.
    ScanPlan p = plan_scan<scalar_t>(h, cu_seqlens, block_size, std::numeric_limits<int64_t>::max(), stream);
    if (p.L.nchunks == 0) return;
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    const Strides hs = strides_of(h, packed), os = strides_of(out, packed);
    const bool vin = vectorizable<scalar_t>(h.data_ptr(), hs, E);
    const bool vout = vectorizable<scalar_t>(out.data_ptr(), os, E);
    const dim3 grid(static_cast<unsigned>(p.L.nchunks), static_cast<unsigned>(p.tiles));
    at::Tensor tot, carry;
    dispatch_degree(deg, [&](auto Kc) {
      constexpr int K = decltype(Kc)::value;
      if (!p.single) {
        tot = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        carry = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        causal_tot_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin, p.L, E, ca,
                                                                   tot.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_chunk_scan(tot.data_ptr<double>(), carry.data_ptr<double>(), p.L, E, false, stream);
      }
      causal_scan_kernel<scalar_t, K><<<grid, p.tx, 0, stream>>>(h.data_ptr<scalar_t>(), hs, vin,
                                                                  out.data_ptr<scalar_t>(), os, vout, p.L, E,
                                                                  p.F, ca,
                                                                  p.single ? nullptr : carry.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> poly_causal_backward_cuda(const at::Tensor& grad_H, const at::Tensor& h,
                                                             const at::Tensor& coeff, int64_t block_size,
                                                             const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_backward";
  checks::causal_backward_args(op, grad_H, h, coeff, block_size, cu_seqlens);
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1);
  const bool packed = cu_seqlens.has_value();
  auto g = grad_H.scalar_type() == h.scalar_type() ? grad_H : grad_H.to(h.scalar_type());
  auto gh = at::empty(h.sizes(), h.options());
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_causal_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // grad_coeff partials are plain fp32 sums per chunk: keep chunks short.
    ScanPlan p = plan_scan<scalar_t>(h, cu_seqlens, block_size, kMaxBwdRows, stream);
    const int64_t nslots = h.numel() == 0 ? 0 : p.L.nchunks;
    auto part = at::empty({std::max<int64_t>(nslots, 1), deg, E},
                          h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (nslots > 0) {
      at::Tensor keep;
      auto ca = coeff_arg<acc_t>(coeff, keep);
      const Strides hs = strides_of(h, packed), gs = strides_of(g, packed), ghs = strides_of(gh, packed);
      const bool vin = vectorizable<scalar_t>(h.data_ptr(), hs, E);
      const bool vg = vectorizable<scalar_t>(g.data_ptr(), gs, E);
      const bool vout = vectorizable<scalar_t>(gh.data_ptr(), ghs, E);
      const dim3 grid(static_cast<unsigned>(p.L.nchunks), static_cast<unsigned>(p.tiles));
      at::Tensor tot, carry;
      if (!p.single) {
        tot = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        carry = at::empty({p.L.nchunks, E}, h.options().dtype(at::kDouble));
        causal_bwd_tot_kernel<scalar_t><<<grid, p.tx, 0, stream>>>(g.data_ptr<scalar_t>(), gs, vg, p.L, E,
                                                                    p.F, tot.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launch_chunk_scan(tot.data_ptr<double>(), carry.data_ptr<double>(), p.L, E, true, stream);
      }
      dispatch_degree(deg, [&](auto Kc) {
        causal_bwd_scan_kernel<scalar_t, decltype(Kc)::value><<<grid, p.tx, 0, stream>>>(
            g.data_ptr<scalar_t>(), gs, vg, h.data_ptr<scalar_t>(), hs, vin, gh.data_ptr<scalar_t>(), ghs, vout, p.L,
            E, p.F, ca, p.single ? nullptr : carry.data_ptr<double>(), part.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    gc = reduce_coeff_grad(part, nslots, deg, E, coeff, stream);
  });
  return {gh, gc};
}

}  // namespace

TORCH_LIBRARY_IMPL(pom_ext, CUDA, m) {
  m.impl("poly_causal", &poly_causal_cuda);
  m.impl("poly_causal_backward", &poly_causal_backward_cuda);
}

}  // namespace cuda
}  // namespace pom_ext
