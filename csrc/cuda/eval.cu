// poly_eval and its backward on CUDA.
//
// Forward: element-wise over rows of (M, E); grid (row groups, channel tiles),
// block (TX, TY); every element read once and written once.
// Backward: grid (row chunks, channel tiles); each thread writes grad_h for its
// rows and keeps grad_coeff partials of its channels, stored per (chunk, row
// lane) and reduced in slot order by reduce_coeff_grad (deterministic).
#include <torch/library.h>

#include "common.cuh"

namespace pom_ext {
namespace cuda {
namespace {

constexpr int kTY = 4;  // row lanes per block (TX * kTY <= 256)
constexpr int kU = 4;   // rows in flight per thread

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    eval_fwd_kernel(const scalar_t* __restrict__ h, int64_t sM, int64_t sE, bool vin, scalar_t* __restrict__ out,
                    bool vout, int64_t M, int64_t E, CoeffArg<at::opmath_type<scalar_t>> ca) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for_rows_step<V, kU, scalar_t, acc_t>([&](int64_t m) { return h + m * sM; },
                                        static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y, M, step, e0, sE,
                                        nv, vin, [&](int64_t m, const acc_t (&x)[V]) {
                                          acc_t o[V];
#pragma unroll
                                          for (int j = 0; j < V; ++j) o[j] = cc.poly(j, math::act(x[j]));
                                          store_row<V>(out + m * E, e0, 1, nv, vout, o);
                                        });
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    eval_bwd_kernel(const scalar_t* __restrict__ g, int64_t gM, int64_t gE, bool vg, const scalar_t* __restrict__ h,
                    int64_t sM, int64_t sE, bool vin, scalar_t* __restrict__ gh, bool vout, int64_t M, int64_t E,
                    int64_t R, CoeffArg<at::opmath_type<scalar_t>> ca, at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  CoeffGradAcc<K, V, acc_t> f;
  f.init(part + slot * ca.deg * E + e0, E, nv, ca.deg);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * R;
  const int64_t m1 = m0 + R < M ? m0 + R : M;
  for (int64_t m = m0 + threadIdx.y; m < m1; m += blockDim.y) {
    acc_t x[V], gv[V], gx[V];
    load_row<V>(h + m * sM, e0, sE, nv, vin, x);
    load_row<V>(g + m * gM, e0, gE, nv, vg, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const acc_t a = math::act(x[j]);
      acc_t p, dp;
      cc.poly_and_slope(j, a, p, dp);
      gx[j] = gv[j] * ca.act_grad(x[j]) * dp;
      f.add_powers(j, gv[j], a);
    }
    store_row<V>(gh + m * E, e0, 1, nv, vout, gx);
  }
  f.finish();
}

// (..., E) as rows (M, E) with a row stride; a view whenever the leading dims collapse.
at::Tensor as_matrix(const at::Tensor& t) {
  const int64_t E = t.size(-1);
  if (t.dim() == 1) return t.view({1, E});
  const int64_t M = E == 0 ? 0 : t.numel() / E;
  return t.reshape({M, E});
}

at::Tensor poly_eval_cuda(const at::Tensor& h, const at::Tensor& coeff) {
  checks::eval_args("pom_ext::poly_eval", h, coeff);
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int deg = static_cast<int>(coeff.size(1));
  auto h2 = as_matrix(h);
  const int64_t M = h2.size(0), E = h2.size(1);
  auto out = at::empty({M, E}, h.options());
  if (M == 0 || E == 0) return out.view(h.sizes());
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = Vec<scalar_t>::value;
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    const int tx = threads_x(E, V, 64);
    const int ty = 256 / tx;
    const int64_t tiles = ceil_div(E, static_cast<int64_t>(tx) * V);
    const Strides hs{0, h2.stride(0), h2.stride(1)};
    const bool vin = vectorizable<scalar_t>(h2.data_ptr(), hs, E);
    const bool vout = E % V == 0;
    // About two waves of blocks: each thread walks many rows, its K * V coefficients loaded once for all.
    const int64_t waves = 2LL * sm_count(h.get_device()) * (2048 / (tx * ty));
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(ceil_div(M, ty), ceil_div(waves, tiles)));
    const dim3 grid = grid_of(groups, tiles);
    cuda_dispatch_degree(deg, [&](auto Kc) {
      eval_fwd_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(tx, ty), 0, stream>>>(
          h2.data_ptr<scalar_t>(), hs.n, hs.e, vin, out.data_ptr<scalar_t>(), vout, M, E, ca);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out.view(h.sizes());
}

std::tuple<at::Tensor, at::Tensor> poly_eval_backward_cuda(const at::Tensor& grad_p, const at::Tensor& h,
                                                           const at::Tensor& coeff) {
  checks::eval_backward_args("pom_ext::poly_eval_backward", grad_p, h, coeff);
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int deg = static_cast<int>(coeff.size(1));
  auto h2 = as_matrix(h);
  auto g2 = as_matrix(grad_p.scalar_type() == h.scalar_type() ? grad_p : grad_p.to(h.scalar_type()));
  const int64_t M = h2.size(0), E = h2.size(1);
  auto gh = at::empty({M, E}, h.options());
  at::Tensor gc;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_eval_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = Vec<scalar_t>::value;
    const int tx = threads_x(E, V, 64);
    const int ty = kTY * 64 / tx;
    const int64_t tiles = E == 0 ? 0 : ceil_div(E, static_cast<int64_t>(tx) * V);
    const int64_t R = rows_per_chunk(M, 1, tiles, 64, ty, h.get_device(), 8, 256 * ty);
    const int64_t nchunks = ceil_div(M, R);
    const int64_t nslots = nchunks * ty;
    auto part = at::empty({std::max<int64_t>(nslots, 1), deg, E}, h.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (M > 0 && E > 0) {
      at::Tensor keep;
      auto ca = coeff_arg<acc_t>(coeff, keep);
      const Strides hs{0, h2.stride(0), h2.stride(1)}, gs{0, g2.stride(0), g2.stride(1)};
      const bool vin = vectorizable<scalar_t>(h2.data_ptr(), hs, E);
      const bool vg = vectorizable<scalar_t>(g2.data_ptr(), gs, E);
      const bool vout = E % V == 0;
      const dim3 grid = grid_of(nchunks, tiles);
      cuda_dispatch_degree(deg, [&](auto Kc) {
        eval_bwd_kernel<scalar_t, decltype(Kc)::value><<<grid, dim3(tx, ty), 0, stream>>>(
            g2.data_ptr<scalar_t>(), gs.n, gs.e, vg, h2.data_ptr<scalar_t>(), hs.n, hs.e, vin,
            gh.data_ptr<scalar_t>(), vout, M, E, R, ca, part.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    gc = reduce_coeff_grad(part, M > 0 ? nslots : 0, deg, E, coeff, stream);
  });
  return {gh.view(h.sizes()), gc};
}

}  // namespace

}  // namespace cuda

namespace detail {

void register_cuda_eval(torch::Library& m) {
  m.impl("poly_eval", &cuda::poly_eval_cuda);
  m.impl("poly_eval_backward", &cuda::poly_eval_backward_cuda);
}

}  // namespace detail
}  // namespace pom_ext
