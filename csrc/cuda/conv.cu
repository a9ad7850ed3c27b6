// causal_conv1d and its backward on CUDA: the depthwise convolution of ATen (cuDNN where it takes the dtype) on the
// channels-first view, with the K - 1 rows of left padding. No kernel of ours: on a GPU the op computes what the
// PoM block computed before it had the op (nn.Conv1d between two transposes), so a model gives the same results on
// either path; the CPU kernels (csrc/cpu/conv_cpu_impl.h) are where the op saves the transposes' copies.
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "common.cuh"

namespace pom_ext {
namespace cuda {
namespace {

// x (B, T, D) -> (B, D, K - 1 + T): channels first, K - 1 zeros before the first row.
at::Tensor padded_input(const at::Tensor& x, int64_t K) { return at::constant_pad_nd(x.transpose(1, 2), {K - 1, 0}); }

// weight (D, K) -> (D, 1, K) in x's dtype.
at::Tensor taps(const at::Tensor& x, const at::Tensor& weight) {
  return weight.to(x.scalar_type()).reshape({weight.size(0), 1, weight.size(1)});
}

at::Tensor causal_conv1d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  checks::conv_args("pom_ext::causal_conv1d", x, weight, bias);
  // The ATen calls below run in x's dtype whatever autocast region the op is called from (its output dtype is
  // x's, as the Meta kernel says).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (x.numel() == 0) return at::empty(x.sizes(), x.options());
  const int64_t D = x.size(2), K = weight.size(1);
  const c10::optional<at::Tensor> b = bias ? c10::optional<at::Tensor>(bias->to(x.scalar_type())) : c10::nullopt;
  const int64_t one = 1, zero = 0;
  return at::conv1d(padded_input(x, K), taps(x, weight), b, at::IntArrayRef(one), at::IntArrayRef(zero),
                    at::IntArrayRef(one), D)
      .transpose(1, 2)
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_cuda(const at::Tensor& grad_y,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const c10::optional<at::Tensor>& bias) {
  checks::conv_backward_args("pom_ext::causal_conv1d_backward", grad_y, x, weight, bias);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), K = weight.size(1);
  const at::Tensor no_bias = at::empty({0}, x.options());
  if (B * T == 0 || D == 0) {
    return {at::zeros(x.sizes(), x.options()), at::zeros(weight.sizes(), weight.options()),
            bias ? at::zeros(bias->sizes(), bias->options()) : no_bias};
  }
  const at::Tensor g = grad_y.to(x.scalar_type()).transpose(1, 2).contiguous();
  const std::vector<int64_t> bias_sizes{D};
  const int64_t one = 1, zero = 0;
  auto [gin, gw, gb] = at::convolution_backward(
      g, padded_input(x, K), taps(x, weight),
      bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(c10::nullopt), at::IntArrayRef(one),
      at::IntArrayRef(zero), at::IntArrayRef(one), false, at::IntArrayRef(zero), D, {true, true, bias.has_value()});
  at::Tensor gx = gin.narrow(2, K - 1, T).transpose(1, 2).contiguous();
  return {gx, gw.reshape({D, K}).to(weight.scalar_type()).contiguous(),
          bias ? gb.to(bias->scalar_type(), false, /*copy=*/true) : no_bias};
}

}  // namespace
}  // namespace cuda

namespace detail {

void register_cuda_conv(torch::Library& m) {
  m.impl("causal_conv1d", &cuda::causal_conv1d_cuda);
  m.impl("causal_conv1d_backward", &cuda::causal_conv1d_backward_cuda);
}

}  // namespace detail
}  // namespace pom_ext
