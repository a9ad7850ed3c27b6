// The pom_ext ops as C++ functions (SPEC §1.2-1.5, §2).
//
//   pom_ext::ops::*  call the registered op through the dispatcher (CPU or CUDA kernel,
//                    whichever the inputs live on); no autograd.
//   pom_ext::*       the differentiable forms (torch::autograd::Function calling the
//                    *_backward ops), usable for C++ training without Python.
//
// Shapes: h (B, N, E) dense or (total, E) packed with cu_seqlens (B + 1,) int32/int64;
// coeff (E, K); weight (B, N) bool/float (or (total,) packed); state_sum (B, E) fp32,
// count (B,) int64.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "pom_ext/export.h"

namespace pom_ext {

// Checks that the pom_ext ops are registered with the dispatcher (throws otherwise) and
// returns the library version. Referencing it keeps libpom_ext linked in.
POM_EXT_API const char* ensure_registered();

namespace ops {

using OptTensor = std::optional<at::Tensor>;

POM_EXT_API at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff);
POM_EXT_API std::tuple<at::Tensor, at::Tensor> poly_eval_backward(const at::Tensor& grad_p, const at::Tensor& h,
                                                                  const at::Tensor& coeff);

POM_EXT_API at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const OptTensor& weight = {},
                                 const OptTensor& cu_seqlens = {});
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_backward(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const OptTensor& weight, const OptTensor& cu_seqlens, bool weight_grad);

POM_EXT_API at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size = 1,
                                   const OptTensor& cu_seqlens = {});
POM_EXT_API std::tuple<at::Tensor, at::Tensor> poly_causal_backward(const at::Tensor& grad_H, const at::Tensor& h,
                                                                    const at::Tensor& coeff, int64_t block_size,
                                                                    const OptTensor& cu_seqlens);

POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update(const at::Tensor& h,
                                                                             const at::Tensor& coeff,
                                                                             const at::Tensor& state_sum,
                                                                             const at::Tensor& count);
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_backward(
    const at::Tensor& grad_H, const at::Tensor& grad_state_sum, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& count);

// Decoding: appends h (B, T, E) to (state_sum, count) in place and returns H (B, E).
POM_EXT_API at::Tensor poly_state_step_(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum,
                                        at::Tensor& count);

}  // namespace ops

// ---- differentiable ----

// p = poly(act(h)); h (..., E) -> (..., E). Gradients for h and coeff.
POM_EXT_API at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff);

// H = sum_n w p / sum_n w -> (B, E). Gradients for h, coeff and a floating weight.
POM_EXT_API at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const ops::OptTensor& weight = {},
                                 const ops::OptTensor& cu_seqlens = {});

// Block-causal prefix mean, layout of h. Gradients for h and coeff.
POM_EXT_API at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size = 1,
                                   const ops::OptTensor& cu_seqlens = {});

// (H (B, E), new_sum (B, E), new_count (B,)); gradients for h, coeff and state_sum.
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update(const at::Tensor& h,
                                                                             const at::Tensor& coeff,
                                                                             const at::Tensor& state_sum,
                                                                             const at::Tensor& count);

// ---- aggregation by mask (SPEC §1.4) and selection (§1.5) ----

// How context tokens are aggregated: none (mean), causal / block-causal, or a tensor that
// is a (B, N) weight/padding mask or a (B, T, N) mask. Implicit from a tensor and from
// the string "causal".
class POM_EXT_API Mask {
 public:
  enum class Kind { None, Causal, Tensor };

  Mask() = default;
  Mask(at::Tensor mask);                    // undefined tensor: none
  Mask(const char* name);                   // "causal"
  Mask(const std::string& name);            // "causal"
  static Mask none() { return Mask(); }
  static Mask causal(int64_t block_size = 1);

  Kind kind() const { return kind_; }
  bool is_none() const { return kind_ == Kind::None; }
  bool is_causal() const { return kind_ == Kind::Causal; }
  bool is_tensor() const { return kind_ == Kind::Tensor; }
  int64_t block_size() const { return block_size_; }
  const at::Tensor& tensor() const { return tensor_; }
  std::string repr() const;

 private:
  Kind kind_ = Kind::None;
  int64_t block_size_ = 1;
  at::Tensor tensor_;
};

// H from h (differentiable). Dense h (B, N, E): none / (B, N) -> (B, 1, E); causal -> (B, N, E);
// (B, T, N) -> (B, T, E). Packed h (total, E) with cu_seqlens: none -> (B, E), causal -> (total, E).
POM_EXT_API at::Tensor aggregate(const at::Tensor& h, const at::Tensor& coeff, const Mask& mask = {},
                                 const at::Tensor& cu_seqlens = {});

// y = s * H; with n_sel_heads G > 1, s (..., G) gates E / G contiguous channels each.
POM_EXT_API at::Tensor select(const at::Tensor& s, const at::Tensor& H, int64_t n_sel_heads = 1);

}  // namespace pom_ext
