// poly_mean and its backward on CUDA (dense (B, N, E), weighted, packed varlen).
//
// Forward, two stages:
//  1. row_partials: grid (chunks, channel tiles), block (TX, TY); thread (x, y)
//     sums w * p over rows y, y + TY, ... of its chunk for V channels and writes
//     the slot (chunk, y) of S (and of W = sum w, in fp64). Reads h once.
//  2. mean_finish: grid (E / 32, B), block (32, 8): per (b, e) the slots of
//     sequence b are added in order in fp64; H = S / W (0 when W == 0).
// Backward:
//  1. mean_bwd_prep (one block per sequence): W = sum w (fp64), gbar = grad_H / W,
//     gdotH = <gbar, H>.
//  2. row_backward: same grid as stage 1; grad_h = gbar * w * dp/dh, and
//     grad_coeff partials per slot, reduced in slot order (reduce_coeff_grad).
//     Reads h once, writes grad_h once.
//  3. with weight_grad, mean_wgrad: one warp per row, grad_w = <gbar, p> - gdotH
//     (reads h once more).
// Rotary positions (poly_mean_rope, p~_n = R(pos_n) p_n, docs/rope.md): the same stages. The mean is linear, so a
// thread keeps its own V channels as in the plain op and sums both w c p and w s p of each (c, s: the cos and
// sin of the channel's pair at the row's position, read from the tables); rope_finish turns the sums of a pair
// (a, b = a + P): H~[a] = (C[a] - S[b]) / W, H~[b] = (C[b] + S[a]) / W. The backward turns gbar back per row,
// u_a = c gbar[a] + s gbar[b], u_b = c gbar[b] - s gbar[a] (R^T), in place of gbar; the weights' gradient is
// <u, p> - gdotH. No rotated (B, N, E) tensor is formed; h is read once a pass, as in the plain op.
#include <torch/library.h>

#include "rope.cuh"
#include "rows.cuh"

namespace pom_ext {
namespace cuda {
namespace {

constexpr int kU = 4;  // rows in flight per thread

// ---- stage 1: partial sums per (chunk, row lane) ----

// Slot (chunk, y) of S: sum w p of its rows (S: (nslots, E)), or with ROPE sum w c p in columns [0, E) and
// sum w s p in [E, 2 E) (S: (nslots, 2 E)); W[slot] = sum w (fp64). cnt_ws (plain only, the state update): the
// block of a sequence's first chunk copies count_in[b] into cnt_ws[b].
template <bool ROPE, typename scalar_t, int K>
__device__ __forceinline__ void partials(const scalar_t* __restrict__ h, Strides hs, bool vin, const Layout& L,
                                         const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                                         const CoeffArg<at::opmath_type<scalar_t>>& ca,
                                         const RopeArg<at::opmath_type<scalar_t>>& ra,
                                         at::opmath_type<scalar_t>* __restrict__ S, double* __restrict__ W,
                                         const int64_t* __restrict__ count_in, int64_t count_stride,
                                         int64_t* __restrict__ cnt_ws) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  const int64_t c = blockIdx.x;
  const int64_t slot = c * blockDim.y + threadIdx.y;
  int64_t b = 0, n0 = 0, n1 = 0;
  if (!L.chunk(c, b, n0, n1)) n1 = n0;
  if (channel_tile() == 0 && threadIdx.x == 0) {
    if (cnt_ws && threadIdx.y == 0 && n1 > n0 && n0 == 0) cnt_ws[b] = count_in[b * count_stride];
    double wsum = 0.0;
    for (int64_t n = n0 + threadIdx.y; n < n1; n += blockDim.y)
      wsum += w ? static_cast<double>(w[L.off(ws, b, n)]) : 1.0;
    W[slot] = wsum;
  }
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  int64_t sec0 = 0, col0 = 0;
  int sign0;
  if (ROPE) pair_of(e0, ra.P, sec0, col0, sign0);
  acc_t f[V], fs[V];
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = fs[j] = acc_t(0);
  for_rows_step<V, kU, scalar_t, acc_t>([&](int64_t n) { return h + L.off(hs, b, n); }, n0 + threadIdx.y, n1,
                                        blockDim.y, e0, hs.e, nv, vin, [&](int64_t n, const acc_t (&x)[V]) {
                                          const acc_t wn = w ? w[L.off(ws, b, n)] : acc_t(1);
                                          acc_t ct[V], st[V];
                                          if constexpr (ROPE) turn_factors<V>(ra, L, b, n, e0, nv, sec0, col0, ct, st);
#pragma unroll
                                          for (int j = 0; j < V; ++j) {
                                            const acc_t p = wn * cc.poly(j, math::act(x[j]));
                                            if constexpr (ROPE) {
                                              f[j] += ct[j] * p;
                                              fs[j] += st[j] * p;
                                            } else {
                                              f[j] += p;
                                            }
                                          }
                                        });
  const int64_t width = ROPE ? 2 * E : E;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (j < nv) {
      S[slot * width + e0 + j] = f[j];
      if (ROPE) S[slot * width + E + e0 + j] = fs[j];
    }
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    row_partials_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L,
                        const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                        CoeffArg<at::opmath_type<scalar_t>> ca, at::opmath_type<scalar_t>* __restrict__ S,
                        double* __restrict__ W, const int64_t* __restrict__ count_in, int64_t count_stride,
                        int64_t* __restrict__ cnt_ws) {
  partials<false, scalar_t, K>(h, hs, vin, L, w, ws, E, ca, RopeArg<at::opmath_type<scalar_t>>{}, S, W, count_in,
                               count_stride, cnt_ws);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    rope_partials_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L,
                         const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                         CoeffArg<at::opmath_type<scalar_t>> ca, RopeArg<at::opmath_type<scalar_t>> ra,
                         at::opmath_type<scalar_t>* __restrict__ S, double* __restrict__ W) {
  partials<true, scalar_t, K>(h, hs, vin, L, w, ws, E, ca, ra, S, W, nullptr, 0, nullptr);
}

// ---- stage 2: the mean per (sequence, channel) ----

// H[b, e] = the slots of sequence b added in order in fp64, over W; with ROPE (P: the pairs of a section),
// H~[b, e] = (C[e] - sign S[partner]) / W: H~[a] = (C[a] - S[a + P]) / W, H~[a + P] = (C[a + P] + S[a]) / W.
template <bool ROPE, typename scalar_t>
__device__ __forceinline__ void finish(const at::opmath_type<scalar_t>* __restrict__ S, const double* __restrict__ W,
                                       const Layout& L, int lanes, int64_t E, int64_t P, scalar_t* __restrict__ H) {
  __shared__ double sh[8][33];
  const int64_t eblocks = (E + 31) / 32;
  const int64_t b = blockIdx.x / eblocks;
  const int64_t e = (blockIdx.x - b * eblocks) * 32 + threadIdx.x;
  const bool active = e < E;
  int64_t c0, c1;
  L.chunks_of(b, c0, c1);
  const int64_t width = ROPE ? 2 * E : E;
  double s = sum_slots(S + (active ? e : 0), width, c0 * lanes, c1 * lanes, active, sh);
  if (ROPE) {
    int64_t sec, col;
    int sign;
    pair_of(active ? e : 0, P, sec, col, sign);
    s -= sign * sum_slots(S + E + (active ? e + sign * P : 0), width, c0 * lanes, c1 * lanes, active, sh);
  }
  const double ws = sum_slots(W, 1, c0 * lanes, c1 * lanes, true, sh);
  if (threadIdx.y == 0 && active) H[b * E + e] = static_cast<scalar_t>(ws != 0.0 ? s / ws : 0.0);
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    mean_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ S, const double* __restrict__ W, Layout L,
                       int lanes, int64_t E, scalar_t* __restrict__ H) {
  finish<false, scalar_t>(S, W, L, lanes, E, 1, H);
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    rope_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ S, const double* __restrict__ W, Layout L,
                       int lanes, int64_t E, int64_t P, scalar_t* __restrict__ H) {
  finish<true, scalar_t>(S, W, L, lanes, E, P, H);
}

// ---- the backward's row pass ----

// grad_h = gbar[b] * w * dp/dh (with ROPE, gbar turned back at the row's position, R^T: u_a = c gbar[a] +
// s gbar[a + P], u_{a + P} = c gbar[a + P] - s gbar[a]), and the grad_coeff partials of the slot.
template <bool ROPE, typename scalar_t, int K>
__device__ __forceinline__ void backward_rows(const scalar_t* __restrict__ h, Strides hs, bool vin, const Layout& L,
                                              const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                                              const CoeffArg<at::opmath_type<scalar_t>>& ca,
                                              const RopeArg<at::opmath_type<scalar_t>>& ra,
                                              const at::opmath_type<scalar_t>* __restrict__ gbar,
                                              scalar_t* __restrict__ gh, Strides ghs, bool vout,
                                              at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  const int64_t c = blockIdx.x;
  const int64_t slot = c * blockDim.y + threadIdx.y;
  int64_t b = 0, n0 = 0, n1 = 0;
  if (!L.chunk(c, b, n0, n1)) n1 = n0;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  CoeffGradAcc<K, V, acc_t> f;
  f.init(part + slot * ca.deg * E + e0, E, nv, ca.deg);
  int64_t sec0 = 0, col0 = 0;
  int sign0;
  if (ROPE) pair_of(e0, ra.P, sec0, col0, sign0);
  acc_t g[V], gp[V];  // gbar of the channel; with ROPE, sign times gbar of its partner
#pragma unroll
  for (int j = 0; j < V; ++j) {
    g[j] = gp[j] = acc_t(0);
    if (n1 > n0 && j < nv) {
      g[j] = gbar[b * E + e0 + j];
      if (ROPE) {
        int64_t sec, col;
        int sign;
        pair_of(e0 + j, ra.P, sec, col, sign);
        gp[j] = static_cast<acc_t>(sign) * gbar[b * E + e0 + j + sign * ra.P];
      }
    }
  }
  for_rows_step<V, kU, scalar_t, acc_t>([&](int64_t n) { return h + L.off(hs, b, n); }, n0 + threadIdx.y, n1,
                                        blockDim.y, e0, hs.e, nv, vin, [&](int64_t n, const acc_t (&x)[V]) {
                                          acc_t ct[V], st[V], gx[V];
                                          if constexpr (ROPE) turn_factors<V>(ra, L, b, n, e0, nv, sec0, col0, ct, st);
                                          const acc_t wn = w ? w[L.off(ws, b, n)] : acc_t(1);
#pragma unroll
                                          for (int j = 0; j < V; ++j) {
                                            const acc_t a = math::act(x[j]);
                                            acc_t p, dp;
                                            cc.poly_and_slope(j, a, p, dp);
                                            acc_t gs;
                                            if constexpr (ROPE) {
                                              gs = (ct[j] * g[j] + st[j] * gp[j]) * wn;
                                            } else {
                                              gs = g[j] * wn;
                                            }
                                            gx[j] = gs * ca.act_grad(x[j]) * dp;
                                            f.add_powers(j, gs, a);
                                          }
                                          store_row<V>(gh + L.off(ghs, b, n), e0, ghs.e, nv, vout, gx);
                                        });
  f.finish();
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    row_backward_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L,
                        const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                        CoeffArg<at::opmath_type<scalar_t>> ca, const at::opmath_type<scalar_t>* __restrict__ gbar,
                        scalar_t* __restrict__ gh, Strides ghs, bool vout, at::opmath_type<scalar_t>* __restrict__ part) {
  backward_rows<false, scalar_t, K>(h, hs, vin, L, w, ws, E, ca, RopeArg<at::opmath_type<scalar_t>>{}, gbar, gh, ghs,
                                    vout, part);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    rope_backward_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, Layout L,
                         const at::opmath_type<scalar_t>* __restrict__ w, Strides ws, int64_t E,
                         CoeffArg<at::opmath_type<scalar_t>> ca, RopeArg<at::opmath_type<scalar_t>> ra,
                         const at::opmath_type<scalar_t>* __restrict__ gbar, scalar_t* __restrict__ gh, Strides ghs,
                         bool vout, at::opmath_type<scalar_t>* __restrict__ part) {
  backward_rows<true, scalar_t, K>(h, hs, vin, L, w, ws, E, ca, ra, gbar, gh, ghs, vout, part);
}

__device__ __forceinline__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double r = sh[0];
  __syncthreads();
  return r;
}

// One block (256 threads) per sequence.
template <typename acc_t>
__global__ void __launch_bounds__(256)
    mean_bwd_prep_kernel(Layout L, const acc_t* __restrict__ w, Strides ws, const acc_t* __restrict__ gH,
                         int64_t gH0, int64_t gH1, const acc_t* __restrict__ H, int64_t H0, int64_t H1, int64_t E,
                         acc_t* __restrict__ gbar, acc_t* __restrict__ gdotH) {
  __shared__ double sh[256];
  const int64_t b = blockIdx.x;
  const int64_t len = L.len(b);
  double wsum = 0.0;
  if (w) {
    for (int64_t n = threadIdx.x; n < len; n += blockDim.x) wsum += static_cast<double>(w[L.off(ws, b, n)]);
    wsum = block_sum(wsum, sh);
  } else {
    wsum = static_cast<double>(len);
  }
  const double inv = wsum != 0.0 ? 1.0 / wsum : 0.0;
  double dot = 0.0;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const acc_t g = static_cast<acc_t>(static_cast<double>(gH[b * gH0 + e * gH1]) * inv);
    gbar[b * E + e] = g;
    dot += static_cast<double>(g * H[b * H0 + e * H1]);
  }
  dot = block_sum(dot, sh);
  if (threadIdx.x == 0) gdotH[b] = static_cast<acc_t>(dot);
}

// Warp per row: gw[row] = sum_e u[e] p(h[row, e]) - gdotH[b], u = gbar[b] (with ROPE turned back at the row's
// position, R^T gbar[b]). tab: (deg, E) coefficients.
template <bool ROPE, typename scalar_t, int K>
__device__ __forceinline__ void weight_grad_rows(const scalar_t* __restrict__ h, Strides hs, const Layout& L,
                                                 int64_t M, int64_t E, const at::opmath_type<scalar_t>* __restrict__ tab,
                                                 int deg, const RopeArg<at::opmath_type<scalar_t>>& ra,
                                                 const at::opmath_type<scalar_t>* __restrict__ gbar,
                                                 const at::opmath_type<scalar_t>* __restrict__ gdotH,
                                                 at::opmath_type<scalar_t>* __restrict__ gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < M; r += step) {
    int64_t b, n;
    L.row(r, b, n);
    const scalar_t* row = h + L.off(hs, b, n);
    acc_t dot = acc_t(0);
    for (int64_t e = threadIdx.x; e < E; e += 32) {
      acc_t u = gbar[b * E + e];
      if (ROPE) {
        int64_t sec, col;
        int sign;
        pair_of(e, ra.P, sec, col, sign);
        const int64_t t = ra.pos[L.off(ra.ps, b, n) + sec * ra.ps.e] * ra.P + col;
        u = ra.cos[t] * u + static_cast<acc_t>(sign) * ra.sin[t] * gbar[b * E + e + sign * ra.P];
      }
      const acc_t a = math::act(static_cast<acc_t>(row[e * hs.e]));
      dot += u * math::poly<K>(a, tab + e, E, deg);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (threadIdx.x == 0) gw[r] = dot - gdotH[b];
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    mean_wgrad_kernel(const scalar_t* __restrict__ h, Strides hs, Layout L, int64_t M, int64_t E,
                      const at::opmath_type<scalar_t>* __restrict__ tab, int deg,
                      const at::opmath_type<scalar_t>* __restrict__ gbar,
                      const at::opmath_type<scalar_t>* __restrict__ gdotH, at::opmath_type<scalar_t>* __restrict__ gw) {
  weight_grad_rows<false, scalar_t, K>(h, hs, L, M, E, tab, deg, RopeArg<at::opmath_type<scalar_t>>{}, gbar, gdotH,
                                       gw);
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    rope_wgrad_kernel(const scalar_t* __restrict__ h, Strides hs, Layout L, int64_t M, int64_t E,
                      const at::opmath_type<scalar_t>* __restrict__ tab, int deg,
                      RopeArg<at::opmath_type<scalar_t>> ra, const at::opmath_type<scalar_t>* __restrict__ gbar,
                      const at::opmath_type<scalar_t>* __restrict__ gdotH, at::opmath_type<scalar_t>* __restrict__ gw) {
  weight_grad_rows<true, scalar_t, K>(h, hs, L, M, E, tab, deg, ra, gbar, gdotH, gw);
}

struct Geo {
  int tx, ty;
  int64_t tiles;
};

template <typename scalar_t>
Geo row_geometry(int64_t E) {
  constexpr int V = Vec<scalar_t>::value;
  Geo g;
  g.tx = threads_x(E, V, 64);
  g.ty = 256 / g.tx;
  g.tiles = E == 0 ? 0 : ceil_div(E, static_cast<int64_t>(g.tx) * V);
  return g;
}

template <typename scalar_t>
int64_t row_chunk_rows(const at::Tensor& h, bool packed, int64_t B, const Geo& g) {
  const int64_t rows = packed ? h.size(0) : h.size(0) * h.size(1);
  const int64_t avg = B > 0 ? ceil_div(rows, B) : 0;
  return rows_per_chunk(avg, B, g.tiles, 64, g.ty, h.get_device(), 8, 256 * g.ty);
}

// Stage 1 of the mean: row_partials, or with rope its rotary slots (S: (nslots, 2 E)).
RowPartials stage_partials(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                     const c10::optional<at::Tensor>& cu, const int64_t* count_in, int64_t count_stride,
                     int64_t* cnt_ws, const RopeHost* rope, cudaStream_t stream) {
  RowPartials rp;
  const bool packed = cu.has_value();
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu);
  const int deg = static_cast<int>(coeff.size(1));
  POM_DISPATCH_FLOATING(h.scalar_type(), "pom_ext_row_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geo g = row_geometry<scalar_t>(E);
    const int64_t R = row_chunk_rows<scalar_t>(h, packed, B, g);
    rp.L = make_layout(h, cu, plan::ChunkPlan{R}, rp.keep, stream);
    rp.lanes = g.ty;
    const int64_t nslots = rp.L.nchunks * g.ty;
    rp.S = at::empty({std::max<int64_t>(nslots, 1), rope ? 2 * E : E},
                     h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    rp.W = at::empty({std::max<int64_t>(nslots, 1)}, h.options().dtype(at::kDouble));
    if (rp.L.nchunks == 0 || E == 0) return;
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    const Strides hs = strides_of(h, packed);
    const bool vin = vectorizable<scalar_t>(h.data_ptr(), hs, E);
    const Strides ws = weight ? strides_of(*weight, packed) : Strides{};
    const acc_t* wp = weight ? weight->data_ptr<acc_t>() : nullptr;
    const dim3 grid = grid_of(rp.L.nchunks, g.tiles);
    cuda_dispatch_degree(deg, [&](auto Kc) {
      if (rope) {
        rope_partials_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(g.tx, g.ty), 0, stream>>>(
            h.data_ptr<scalar_t>(), hs, vin, rp.L, wp, ws, E, ca, rope->arg<scalar_t>(), rp.S.data_ptr<acc_t>(),
            rp.W.data_ptr<double>());
      } else {
        row_partials_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(g.tx, g.ty), 0, stream>>>(
            h.data_ptr<scalar_t>(), hs, vin, rp.L, wp, ws, E, ca, rp.S.data_ptr<acc_t>(), rp.W.data_ptr<double>(),
            count_in, count_stride, cnt_ws);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return rp;
}

// The backward's row pass: row_backward, or with rope gbar turned back at every row.
at::Tensor stage_backward_rows(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                         const c10::optional<at::Tensor>& cu, const at::Tensor& gbar, at::Tensor& gh,
                         const RopeHost* rope, cudaStream_t stream) {
  const bool packed = cu.has_value();
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu);
  const int deg = static_cast<int>(coeff.size(1));
  at::Tensor gc;
  POM_DISPATCH_FLOATING(h.scalar_type(), "pom_ext_row_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geo g = row_geometry<scalar_t>(E);
    const int64_t R = row_chunk_rows<scalar_t>(h, packed, B, g);
    LayoutKeep lk;
    const Layout L = make_layout(h, cu, plan::ChunkPlan{R}, lk, stream);
    const int64_t nslots = L.nchunks * g.ty;
    auto part = at::empty({std::max<int64_t>(nslots, 1), deg, E},
                          h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (L.nchunks > 0 && E > 0) {
      at::Tensor keep;
      auto ca = coeff_arg<acc_t>(coeff, keep);
      const Strides hs = strides_of(h, packed), ghs = strides_of(gh, packed);
      const bool vin = vectorizable<scalar_t>(h.data_ptr(), hs, E);
      const bool vout = vectorizable<scalar_t>(gh.data_ptr(), ghs, E);
      const Strides ws = weight ? strides_of(*weight, packed) : Strides{};
      const acc_t* wp = weight ? weight->data_ptr<acc_t>() : nullptr;
      const dim3 grid = grid_of(L.nchunks, g.tiles);
      cuda_dispatch_degree(deg, [&](auto Kc) {
        if (rope) {
          rope_backward_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(g.tx, g.ty), 0, stream>>>(
              h.data_ptr<scalar_t>(), hs, vin, L, wp, ws, E, ca, rope->arg<scalar_t>(), gbar.data_ptr<acc_t>(),
              gh.data_ptr<scalar_t>(), ghs, vout, part.data_ptr<acc_t>());
        } else {
          row_backward_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(g.tx, g.ty), 0, stream>>>(
              h.data_ptr<scalar_t>(), hs, vin, L, wp, ws, E, ca, gbar.data_ptr<acc_t>(), gh.data_ptr<scalar_t>(),
              ghs, vout, part.data_ptr<acc_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    gc = reduce_coeff_grad(part, L.nchunks > 0 ? nslots : 0, deg, E, coeff, stream);
  });
  return gc;
}

}  // namespace

RowPartials row_partials(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                         const c10::optional<at::Tensor>& cu, const int64_t* count_in, int64_t count_stride,
                         int64_t* cnt_ws, cudaStream_t stream) {
  return stage_partials(h, coeff, weight, cu, count_in, count_stride, cnt_ws, nullptr, stream);
}

at::Tensor row_backward(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                        const c10::optional<at::Tensor>& cu, const at::Tensor& gbar, at::Tensor& gh,
                        cudaStream_t stream) {
  return stage_backward_rows(h, coeff, weight, cu, gbar, gh, nullptr, stream);
}

namespace {

// The forward of poly_mean (rope == nullptr) and poly_mean_rope; the arguments are checked.
at::Tensor mean_forward(const char* op, const at::Tensor& h, const at::Tensor& coeff,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens,
                        const RopeHost* rope, cudaStream_t stream) {
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  auto H = at::empty({B, E}, h.options());
  if (B == 0 || E == 0) return H;
  at::Tensor wt;
  if (weight.has_value()) wt = weight->to(acc_type_of(h.scalar_type()));
  RowPartials rp =
      stage_partials(h, coeff, weight.has_value() ? &wt : nullptr, cu_seqlens, nullptr, 0, nullptr, rope, stream);
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_mean_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ceil_div(E, 32) * B));
    if (rope) {
      rope_finish_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream>>>(
          rp.S.data_ptr<acc_t>(), rp.W.data_ptr<double>(), rp.L, rp.lanes, E, rope->P, H.data_ptr<scalar_t>());
    } else {
      mean_finish_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream>>>(rp.S.data_ptr<acc_t>(), rp.W.data_ptr<double>(),
                                                                    rp.L, rp.lanes, E, H.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return H;
}

// The backward of poly_mean (rope == nullptr) and poly_mean_rope; the arguments are checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_backward(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad,
    const RopeHost* rope, cudaStream_t stream) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  const bool packed = cu_seqlens.has_value();
  const at::ScalarType acc = acc_type_of(h.scalar_type());
  at::Tensor wt;
  if (weight.has_value()) wt = weight->to(acc);
  auto gh = at::empty(h.sizes(), h.options());
  at::Tensor gw = weight_grad ? at::empty(weight->sizes(), h.options().dtype(acc)) : at::empty({0}, h.options());
  auto gbar = at::empty({std::max<int64_t>(B, 1), E}, h.options().dtype(acc));
  auto gdotH = at::empty({std::max<int64_t>(B, 1)}, h.options().dtype(acc));
  const at::Tensor* wp = weight.has_value() ? &wt : nullptr;
  if (B > 0) {
    LayoutKeep lk;
    const Layout L = make_layout(h, cu_seqlens, plan::ChunkPlan{1}, lk, stream);
    auto gHa = grad_H.to(acc);
    auto Ha = H.to(acc);
    const Strides ws = wp ? strides_of(wt, packed) : Strides{};
    AT_DISPATCH_FLOATING_TYPES(acc, "poly_mean_backward_prep_cuda", [&] {
      mean_bwd_prep_kernel<scalar_t><<<static_cast<unsigned>(B), 256, 0, stream>>>(
          L, wp ? wt.data_ptr<scalar_t>() : nullptr, ws, gHa.data_ptr<scalar_t>(), gHa.stride(0), gHa.stride(1),
          Ha.data_ptr<scalar_t>(), Ha.stride(0), Ha.stride(1), E, gbar.data_ptr<scalar_t>(),
          gdotH.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor gc = stage_backward_rows(h, coeff, wp, cu_seqlens, gbar, gh, rope, stream);
  const int64_t M = packed ? h.size(0) : h.size(0) * h.size(1);
  if (weight_grad && M > 0) {
    LayoutKeep lk;
    const Layout L = make_layout(h, cu_seqlens, plan::ChunkPlan{1}, lk, stream);
    POM_DISPATCH_FLOATING(h.scalar_type(), "poly_mean_wgrad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto tab = coeff.to(acc).t().contiguous();
      const Strides hs = strides_of(h, packed);
      const int64_t blocks = std::min<int64_t>(ceil_div(M, 8), 65535 * 8);
      cuda_dispatch_degree(deg, [&](auto Kc) {
        if (rope) {
          rope_wgrad_kernel<scalar_t, decltype(Kc)::value><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
              h.data_ptr<scalar_t>(), hs, L, M, E, tab.data_ptr<acc_t>(), deg, rope->arg<scalar_t>(),
              gbar.data_ptr<acc_t>(), gdotH.data_ptr<acc_t>(), gw.data_ptr<acc_t>());
        } else {
          mean_wgrad_kernel<scalar_t, decltype(Kc)::value><<<static_cast<unsigned>(blocks), dim3(32, 8), 0, stream>>>(
              h.data_ptr<scalar_t>(), hs, L, M, E, tab.data_ptr<acc_t>(), deg, gbar.data_ptr<acc_t>(),
              gdotH.data_ptr<acc_t>(), gw.data_ptr<acc_t>());
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (weight_grad) gw = gw.to(weight->scalar_type() == at::kBool ? h.scalar_type() : weight->scalar_type());
  return {gh, gc, gw};
}

at::Tensor poly_mean_cuda(const at::Tensor& h, const at::Tensor& coeff, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_mean";
  checks::mean_args(op, h, coeff, weight, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  return mean_forward(op, h, coeff, weight, cu_seqlens, nullptr, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_backward_cuda(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_mean_backward";
  checks::mean_backward_args(op, grad_H, H, h, coeff, weight, cu_seqlens, weight_grad);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  return mean_backward(grad_H, H, h, coeff, weight, cu_seqlens, weight_grad, nullptr,
                       c10::cuda::getCurrentCUDAStream());
}

at::Tensor poly_mean_rope_cuda(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& positions,
                               const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_mean_rope";
  checks::mean_rope_args(op, h, coeff, cos, sin, positions, weight, cu_seqlens);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  const RopeHost rope(op, h, cos, sin, positions, cu_seqlens);
  return mean_forward(op, h, coeff, weight, cu_seqlens, &rope, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_rope_backward_cuda(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_mean_rope_backward";
  checks::mean_rope_backward_args(op, grad_H, H, h, coeff, cos, sin, positions, weight, cu_seqlens, weight_grad);
  validate_offsets(op, cu_seqlens, h.size(0));
  c10::cuda::CUDAGuard guard(h.device());
  const RopeHost rope(op, h, cos, sin, positions, cu_seqlens);
  return mean_backward(grad_H, H, h, coeff, weight, cu_seqlens, weight_grad, &rope,
                       c10::cuda::getCurrentCUDAStream());
}

}  // namespace

}  // namespace cuda

namespace detail {

void register_cuda_mean(torch::Library& m) {
  m.impl("poly_mean", &cuda::poly_mean_cuda);
  m.impl("poly_mean_backward", &cuda::poly_mean_backward_cuda);
  m.impl("poly_mean_rope", &cuda::poly_mean_rope_cuda);
  m.impl("poly_mean_rope_backward", &cuda::poly_mean_rope_backward_cuda);
}

}  // namespace detail
}  // namespace pom_ext
