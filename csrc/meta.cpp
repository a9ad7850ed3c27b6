// Meta kernels (shape functions) of the pom_ext ops: the shapes, dtypes and strides of the outputs, and the
// argument checks every backend runs. They serve the meta device and, through it, fake tensors (torch.compile,
// torch.export, AOTInductor) in C++ and Python alike; sizes are SymInts, so symbolic shapes pass through.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "pom_ext/checks.h"
#include "pom_ext/library.h"

namespace pom_ext {
namespace {

using OptT = c10::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor like(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

at::Tensor rows(const at::Tensor& h, c10::SymInt B) {
  return at::empty_symint({std::move(B), h.sym_size(-1)}, h.options());
}

at::Tensor eval(const at::Tensor& h, const at::Tensor& coeff) {
  checks::eval_args("pom_ext::poly_eval", h, coeff);
  return like(h);
}

T2 eval_bwd(const at::Tensor& grad_p, const at::Tensor& h, const at::Tensor& coeff) {
  checks::eval_backward_args("pom_ext::poly_eval_backward", grad_p, h, coeff);
  return {like(h), like(coeff)};
}

at::Tensor mean(const at::Tensor& h, const at::Tensor& coeff, const OptT& weight, const OptT& cu) {
  checks::mean_args("pom_ext::poly_mean", h, coeff, weight, cu);
  return rows(h, checks::sym_batch_of(h, cu));
}

// The weight's gradient (a bool mask gets h's dtype), or an empty tensor when not asked for.
at::Tensor weight_grad_like(const at::Tensor& h, const at::Tensor& weight, bool weight_grad) {
  if (!weight_grad) return at::empty({0}, h.options());
  const auto dtype = weight.scalar_type() == at::kBool ? h.scalar_type() : weight.scalar_type();
  return at::empty_symint(weight.sym_sizes(), h.options().dtype(dtype));
}

T3 mean_bwd(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
            const OptT& weight, const OptT& cu, bool weight_grad) {
  checks::mean_backward_args("pom_ext::poly_mean_backward", grad_H, H, h, coeff, weight, cu, weight_grad);
  return {like(h), like(coeff), weight_grad ? weight_grad_like(h, *weight, true) : at::empty({0}, h.options())};
}

at::Tensor causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size, const OptT& cu) {
  checks::causal_args("pom_ext::poly_causal", h, coeff, block_size, cu);
  return like(h);
}

T2 causal_bwd(const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
              const OptT& cu) {
  checks::causal_backward_args("pom_ext::poly_causal_backward", grad_H, h, coeff, block_size, cu);
  return {like(h), like(coeff)};
}

at::Tensor causal_weighted(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight, int64_t block_size,
                           const OptT& cu) {
  checks::causal_weighted_args("pom_ext::poly_causal_weighted", h, coeff, weight, block_size, cu);
  return like(h);
}

T3 causal_weighted_bwd(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
                       const at::Tensor& weight, int64_t block_size, const OptT& cu, bool weight_grad) {
  checks::causal_weighted_backward_args("pom_ext::poly_causal_weighted_backward", grad_H, H, h, coeff, weight,
                                        block_size, cu);
  return {like(h), like(coeff), weight_grad_like(h, weight, weight_grad)};
}

// The gated ops' output y (hs's rows, E columns) and gradients (of hs, coeff and the S gate biases).
at::Tensor gated_output(const at::Tensor& hs, const at::Tensor& coeff) {
  auto sizes = hs.sym_sizes().vec();
  sizes.back() = coeff.sym_size(0);
  return at::empty_symint(sizes, hs.options());
}

T3 gated_grads(const at::Tensor& hs, const at::Tensor& coeff, const OptT& bias) {
  const auto dtype = bias.has_value() ? bias->scalar_type() : hs.scalar_type();
  at::Tensor gb = at::empty_symint({hs.sym_size(-1) - coeff.sym_size(0)}, hs.options().dtype(dtype));
  return {like(hs), like(coeff), gb};
}

at::Tensor causal_gated(const at::Tensor& hs, const at::Tensor& coeff, const OptT& bias, int64_t block_size,
                        const OptT& cu) {
  checks::causal_gated_args("pom_ext::poly_causal_gated", hs, coeff, bias, block_size, cu);
  return gated_output(hs, coeff);
}

T3 causal_gated_bwd(const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff, const OptT& bias,
                    int64_t block_size, const OptT& cu) {
  checks::causal_gated_backward_args("pom_ext::poly_causal_gated_backward", grad_y, hs, coeff, bias, block_size, cu);
  return gated_grads(hs, coeff, bias);
}

T3 state_update(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum, const at::Tensor& count) {
  checks::state_args("pom_ext::poly_state_update", h, coeff, state_sum, count);
  return {rows(h, h.sym_size(0)), like(state_sum), like(count)};
}

T3 state_update_bwd(const at::Tensor& grad_H, const at::Tensor& grad_sum, const at::Tensor& h,
                    const at::Tensor& coeff, const at::Tensor& count) {
  checks::state_backward_args("pom_ext::poly_state_update_backward", grad_H, grad_sum, h, coeff, count);
  return {like(h), like(coeff), like(grad_sum)};
}

at::Tensor mean_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& pos, const OptT& weight, const OptT& cu) {
  checks::mean_rope_args("pom_ext::poly_mean_rope", h, coeff, cos, sin, pos, weight, cu);
  return rows(h, checks::sym_batch_of(h, cu));
}

T3 mean_rope_bwd(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
                 const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos, const OptT& weight,
                 const OptT& cu, bool weight_grad) {
  checks::rope("pom_ext::poly_mean_rope_backward", h, cos, sin, pos, cu);
  return mean_bwd(grad_H, H, h, coeff, weight, cu, weight_grad);
}

at::Tensor causal_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  checks::causal_rope_args("pom_ext::poly_causal_rope", h, coeff, cos, sin, pos, block_size, cu);
  return like(h);
}

T2 causal_rope_bwd(const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                   const at::Tensor& sin, const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  checks::rope("pom_ext::poly_causal_rope_backward", h, cos, sin, pos, cu);
  return causal_bwd(grad_H, h, coeff, block_size, cu);
}

at::Tensor causal_gated_rope(const at::Tensor& hs, const at::Tensor& coeff, const OptT& bias, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& gcos, const at::Tensor& gsin,
                             const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  checks::causal_gated_rope_args("pom_ext::poly_causal_gated_rope", hs, coeff, bias, cos, sin, gcos, gsin, pos,
                                 block_size, cu);
  return gated_output(hs, coeff);
}

T3 causal_gated_rope_bwd(const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff, const OptT& bias,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& gcos, const at::Tensor& gsin,
                         const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  checks::causal_gated_rope_backward_args("pom_ext::poly_causal_gated_rope_backward", grad_y, hs, coeff, bias, cos,
                                          sin, gcos, gsin, pos, block_size, cu);
  return gated_grads(hs, coeff, bias);
}

at::Tensor state_step(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum, at::Tensor& count) {
  checks::state_step_args("pom_ext::poly_state_step_", h, coeff, state_sum, count);
  return rows(h, h.sym_size(0));
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  checks::conv_args("pom_ext::causal_conv1d", x, w, b);
  return like(x);
}

T3 conv_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  checks::conv_backward_args("pom_ext::causal_conv1d_backward", g, x, w, b);
  return {like(x), like(w), b ? like(*b) : at::empty({0}, x.options())};
}

}  // namespace

namespace detail {

void register_meta(torch::Library& m) {
  POM_EXT_IMPL_OPS(m);
  m.impl("poly_state_step_", &state_step);
}

}  // namespace detail
}  // namespace pom_ext
