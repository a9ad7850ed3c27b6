// CPU kernels of causal_conv1d, the PoM block's causal depthwise convolution in the model's (B, T, D) layout,
// compiled per instruction set like poly_cpu_impl.h, after it (rows, buffers, flush, output pool):
//   y[b, t, d] = bias[d] + sum_k w[d, k] x[b, t - K + 1 + k, d]   (x = 0 before the first row).
// Every loop runs over the D contiguous channels of a row; the K input rows a row reads are the rows just read
// (in cache), so each pass reads x (or the gradient) and writes its output once. The weight and bias gradients
// are summed per chunk of rows (fixed chunks, whatever the thread count) in acc_t, flushed into fp64 every
// kFlushRows rows, and the chunks added in order: the results do not depend on the threads.
#ifndef POM_CPU_ARCH
#error "define POM_CPU_ARCH before including conv_cpu_impl.h"
#endif

namespace pom_ext {
namespace cpu {
namespace POM_CPU_ARCH {

// o += a * b over n channels.
template <typename acc_t>
inline void mul_add(acc_t* __restrict o, const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] += a[d] * b[d];
}

// y = the convolution of x (wT: the taps as a (K, D) table, coeff_table; bias: D values or empty); y contiguous.
template <typename scalar_t>
void conv_forward(const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& wT,
                  const std::vector<at::opmath_type<scalar_t>>& bias, int64_t K, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows xr = rows_of(x, nullptr);
  const int64_t T = xr.N, D = x.size(2), M = x.size(0) * T;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    RowBufs<acc_t> buf(2, D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r - b * T;
      acc_t* o = out_row(yp + r * D, buf[1]);
      if (bias.empty()) {
        std::fill(o, o + D, acc_t(0));
      } else {
        std::copy(bias.begin(), bias.end(), o);
      }
      for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k)
        mul_add(o, wT.data() + k * D, in_row(xp + xr.off(b, t - K + 1 + k), xr.sE, D, buf[0]), D);
      commit_row(yp + r * D, D, o);
    }
  });
}

// gx = the gradient of x (contiguous); part: per chunk of rows, (K + 1) x D fp64 sums: the weight's gradient by
// tap (sum over rows of g * the row's k-th input), then the bias's (sum of g).
template <typename scalar_t>
void conv_backward(const at::Tensor& g, const at::Tensor& x, const std::vector<at::opmath_type<scalar_t>>& wT,
                   int64_t K, at::Tensor& gx, std::vector<double>& part, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const Rows gr = rows_of(g, nullptr), xr = rows_of(x, nullptr);
  const int64_t T = xr.N, D = x.size(2), M = x.size(0) * T;
  const int64_t R = ceil_div(M, chunks);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    RowBufs<acc_t> buf(3, D), fbuf(1, (K + 1) * D);
    acc_t* f = fbuf[0];
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(f, f + (K + 1) * D, acc_t(0));
      double* d = part.data() + static_cast<size_t>(c) * (K + 1) * D;
      const int64_t m1 = std::min(M, (c + 1) * R);
      for (int64_t r = c * R; r < m1; ++r) {
        const int64_t b = r / T, t = r - b * T;
        // The input's gradient: the rows t .. t + K - 1 of g through taps K - 1 .. 0.
        acc_t* o = out_row(gxp + r * D, buf[2]);
        std::fill(o, o + D, acc_t(0));
        for (int64_t k = std::max<int64_t>(0, t + K - T); k < K; ++k)
          mul_add(o, wT.data() + k * D, in_row(gp + gr.off(b, t + K - 1 - k), gr.sE, D, buf[0]), D);
        commit_row(gxp + r * D, D, o);
        // The taps' and the bias's: g at row t times the rows t - K + 1 .. t of x.
        const acc_t* gt = in_row(gp + gr.off(b, t), gr.sE, D, buf[0]);
        for (int64_t k = std::max<int64_t>(0, K - 1 - t); k < K; ++k)
          mul_add(f + k * D, gt, in_row(xp + xr.off(b, t - K + 1 + k), xr.sE, D, buf[1]), D);
        acc_t* fb = f + K * D;
        for (int64_t e = 0; e < D; ++e) fb[e] += gt[e];
        if ((r - c * R + 1) % kFlushRows == 0) flush(f, d, (K + 1) * D);
      }
      flush(f, d, (K + 1) * D);
    }
  });
}

#if POM_CPU_PART == 1
at::Tensor causal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  checks::conv_args("pom_ext::causal_conv1d", x, weight, bias);
  auto y = pooled_empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv_forward<scalar_t>(x, coeff_table<acc_t>(weight), bias ? coeff_table<acc_t>(*bias) : std::vector<acc_t>(),
                           weight.size(1), y);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_cpu(const at::Tensor& grad_y,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          const c10::optional<at::Tensor>& bias) {
  checks::conv_backward_args("pom_ext::causal_conv1d_backward", grad_y, x, weight, bias);
  const at::Tensor g = grad_y.to(x.scalar_type());
  const int64_t M = x.size(0) * x.size(1), D = x.size(2), K = weight.size(1);
  auto gx = pooled_empty(x.sizes(), x.options());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxRowChunks, ceil_div(M, kMinChunkRows)));
  std::vector<double> part(static_cast<size_t>(chunks) * (K + 1) * D, 0.0);
  if (M > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_backward_cpu", [&] {
      conv_backward<scalar_t>(g, x, coeff_table<at::opmath_type<scalar_t>>(weight), K, gx, part, chunks);
    });
  }
  // The chunks' sums in chunk order, (D, K + 1) fp64: the weight's gradient by tap, then the bias's.
  const std::vector<int64_t> e0s(chunks, 0), widths(chunks, D);
  const at::Tensor sums = reduce_coeff_grad(part, e0s, widths, static_cast<int>(K + 1), D, at::empty({0}, at::kDouble));
  at::Tensor gw = sums.narrow(1, 0, K).to(weight.options(), false, /*copy=*/true).contiguous();
  at::Tensor gb = bias ? sums.select(1, K).to(bias->options(), false, /*copy=*/true).contiguous()
                       : at::empty({0}, x.options());
  return {gx, gw, gb};
}
#endif

}  // namespace POM_CPU_ARCH
}  // namespace cpu
}  // namespace pom_ext
