// Recurrent state on CUDA: poly_state_update, its backward, and the in-place
// decode step poly_state_step_.
//
// Short chunks (T <= kSmallT, the decode case T == 1 included): grid (batch rows,
// channel tiles), V channels per thread read 16 bytes at a time; each thread sums
// p over the T tokens and writes H and the new sum; a second launch then writes the
// new counts (after every block has read the old ones). No workspace, no host sync:
// the step can be captured in a CUDA graph and runs in place.
// Long chunks: row_partials (grid (chunks, channel tiles), slot partials, and a
// copy of the counts) then state_finish (grid (E / 32 x B), fixed-order fp64
// reduction of the slots of each row); in-place safe because the counts are
// read from the copy.
// Backward: gbar = grad_H / (count + T) + grad_sum (B, E), then row_backward
// (grad_h = gbar * dp/dh, grad_coeff from slot partials in fixed order).
#include <torch/library.h>

#include "pom_ext/state_grad.h"
#include "rows.cuh"

namespace pom_ext {
namespace cuda {
namespace {

constexpr int64_t kSmallT = 32;

__device__ __forceinline__ double read_sum(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
}

__device__ __forceinline__ void write_sum(void* p, bool f64, int64_t i, double v) {
  if (f64) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// Short chunks: grid (batch rows, channel tiles), V channels per thread (16-byte row loads), the T tokens
// summed in order; H and the new sum written here, the new count by state_count_kernel after it (so that
// every block has read the old count when it changes, also in place).
template <typename scalar_t, int K>
__global__ void __launch_bounds__(256)
    state_small_kernel(const scalar_t* __restrict__ h, Strides hs, bool vin, int64_t T, int64_t E,
                       CoeffArg<at::opmath_type<scalar_t>> ca, const void* sum_in, int64_t ss0, int64_t ss1,
                       const int64_t* count_in, int64_t cs, bool sum64, scalar_t* __restrict__ H, bool vout,
                       void* sum_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::value;
  const int64_t b = blockIdx.x;
  int64_t e0;
  int nv;
  if (!thread_channels<V>(E, e0, nv)) return;
  ChanCoeff<K, V, acc_t> cc;
  cc.load(ca, e0, nv);
  const int64_t cnt = count_in[b * cs] + T;
  const double inv = cnt > 0 ? 1.0 / static_cast<double>(cnt) : 0.0;
  acc_t f[V];
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = acc_t(0);
  for (int64_t t = 0; t < T; ++t) {
    acc_t x[V];
    load_row<V>(h + b * hs.b + t * hs.n, e0, hs.e, nv, vin, x);
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] += cc.poly(j, math::act(x[j]));
  }
  acc_t y[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (j < nv) {
      const int64_t e = e0 + j;
      const double sv = read_sum(sum_in, sum64, b * ss0 + e * ss1) + static_cast<double>(f[j]);
      y[j] = static_cast<acc_t>(sv * inv);
      write_sum(sum_out, sum64, b * E + e, sv);
    } else {
      y[j] = acc_t(0);
    }
  }
  store_row<V>(H + b * E, e0, 1, nv, vout, y);
}

__global__ void __launch_bounds__(256)
    state_count_kernel(const int64_t* count_in, int64_t cs, int64_t B, int64_t T, int64_t* count_out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B) count_out[b] = count_in[b * cs] + T;
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    state_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ S, Layout L, int lanes, int64_t T, int64_t E,
                        const void* sum_in, int64_t ss0, int64_t ss1, const int64_t* __restrict__ cnt_ws, bool sum64,
                        scalar_t* __restrict__ H, void* sum_out, int64_t* count_out) {
  __shared__ double sh[8][33];
  const int64_t eblocks = (E + 31) / 32;
  const int64_t b = blockIdx.x / eblocks;
  const int64_t eb = blockIdx.x - b * eblocks;
  const int64_t e = eb * 32 + threadIdx.x;
  const bool active = e < E;
  int64_t c0, c1;
  L.chunks_of(b, c0, c1);
  const double part = sum_slots(S + (active ? e : 0), E, c0 * lanes, c1 * lanes, active, sh);
  const int64_t cnt = cnt_ws[b] + T;
  if (threadIdx.y == 0 && active) {
    const double inv = cnt > 0 ? 1.0 / static_cast<double>(cnt) : 0.0;
    const double s = read_sum(sum_in, sum64, b * ss0 + e * ss1) + part;
    H[b * E + e] = static_cast<scalar_t>(s * inv);
    write_sum(sum_out, sum64, b * E + e, s);
  }
  if (eb == 0 && threadIdx.x == 0 && threadIdx.y == 0) count_out[b] = cnt;
}

// H = (sum + sum_t p_t) / (count + T) and the new state; sum_out and count_out are
// contiguous and may alias sum_in and count_in.
void state_into(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& sum_in, const at::Tensor& count_in,
                at::Tensor& H, at::Tensor& sum_out, at::Tensor& count_out) {
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t B = h.size(0), T = h.size(1), E = h.size(2);
  if (B == 0) return;
  const bool sum64 = sum_in.scalar_type() == at::kDouble;
  POM_DISPATCH_FLOATING(h.scalar_type(), "poly_state_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor keep;
    auto ca = coeff_arg<acc_t>(coeff, keep);
    if (T <= kSmallT || E == 0) {
      constexpr int V = Vec<scalar_t>::value;
      const Strides hs{h.stride(0), h.stride(1), h.stride(2)};
      const bool vin = vectorizable<scalar_t>(h.data_ptr(), hs, E);
      const bool vout = vectorizable<scalar_t>(H.data_ptr(), Strides{E, E, 1}, E);
      const int tx = threads_x(E, V, 128);
      const int64_t tiles = ceil_div(std::max<int64_t>(E, 1), static_cast<int64_t>(tx) * V);
      if (E > 0) {
        cuda_dispatch_degree(deg, [&](auto Kc) {
          state_small_kernel<scalar_t, decltype(Kc)::value><<<grid_of(B, tiles), tx, 0, stream>>>(
              h.data_ptr<scalar_t>(), hs, vin, T, E, ca, sum_in.data_ptr(), sum_in.stride(0), sum_in.stride(1),
              count_in.data_ptr<int64_t>(), count_in.stride(0), sum64, H.data_ptr<scalar_t>(), vout,
              sum_out.data_ptr());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      state_count_kernel<<<static_cast<unsigned>(ceil_div(B, 256)), 256, 0, stream>>>(
          count_in.data_ptr<int64_t>(), count_in.stride(0), B, T, count_out.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto cnt_ws = at::empty({B}, count_in.options());
    RowPartials rp = row_partials(h, coeff, nullptr, c10::nullopt, count_in.data_ptr<int64_t>(), count_in.stride(0),
                                  cnt_ws.data_ptr<int64_t>(), stream);
    const dim3 grid(static_cast<unsigned>(ceil_div(E, 32) * B));
    state_finish_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream>>>(
        rp.S.data_ptr<acc_t>(), rp.L, rp.lanes, T, E, sum_in.data_ptr(), sum_in.stride(0), sum_in.stride(1),
        cnt_ws.data_ptr<int64_t>(), sum64, H.data_ptr<scalar_t>(), sum_out.data_ptr(), count_out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_cuda(const at::Tensor& h, const at::Tensor& coeff,
                                                                      const at::Tensor& state_sum,
                                                                      const at::Tensor& count) {
  const char* op = "pom_ext::poly_state_update";
  checks::state_args(op, h, coeff, state_sum, count);
  auto H = at::empty({h.size(0), h.size(2)}, h.options());
  auto sum_out = at::empty({h.size(0), h.size(2)}, state_sum.options());
  auto count_out = at::empty({h.size(0)}, count.options());
  state_into(h, coeff, state_sum, count, H, sum_out, count_out);
  return {H, sum_out, count_out};
}

at::Tensor poly_state_step_cuda(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum,
                                at::Tensor& count) {
  checks::state_step_args("pom_ext::poly_state_step_", h, coeff, state_sum, count);
  auto H = at::empty({h.size(0), h.size(2)}, h.options());
  state_into(h, coeff, state_sum, count, H, state_sum, count);
  return H;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_backward_cuda(const at::Tensor& grad_H,
                                                                               const at::Tensor& grad_sum,
                                                                               const at::Tensor& h,
                                                                               const at::Tensor& coeff,
                                                                               const at::Tensor& count) {
  checks::state_backward_args("pom_ext::poly_state_update_backward", grad_H, grad_sum, h, coeff, count);
  const int64_t B = h.size(0), T = h.size(1), E = h.size(2);
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto gbar_t = state_chunk_grad(grad_H, grad_sum, count, T);
  const at::ScalarType acc = acc_type_of(h.scalar_type());
  auto gbar = gbar_t.to(acc).contiguous();
  auto gh = at::empty(h.sizes(), h.options());
  at::Tensor gc = row_backward(h, coeff, nullptr, c10::nullopt, gbar, gh, stream);
  return {gh, gc, gbar_t.to(grad_sum.scalar_type())};
}

}  // namespace

}  // namespace cuda

namespace detail {

void register_cuda_state(torch::Library& m) {
  m.impl("poly_state_update", &cuda::poly_state_update_cuda);
  m.impl("poly_state_update_backward", &cuda::poly_state_update_backward_cuda);
  m.impl("poly_state_step_", &cuda::poly_state_step_cuda);
}

}  // namespace detail
}  // namespace pom_ext
