// The pom_ext ops as C++ functions (SPEC §1.2-1.5, §2).
//
//   pom_ext::ops::*  call the registered op through the dispatcher (CPU, CUDA or Meta kernel,
//                    whichever device the inputs live on), below autograd: no gradient.
//   pom_ext::*       the same ops with autograd (registered with the dispatcher, so a
//                    TorchScript or exported model that calls them trains in C++ too);
//                    their backward is not differentiable (double backward raises).
//
// Shapes: h (B, N, E) dense or (total, E) packed with cu_seqlens (B + 1,) int32/int64;
// coeff (E, K); weight (B, N) bool/float (or (total,) packed); state_sum (B, E) fp32
// (fp64 for float64 inputs), count (B,) int64.
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

// The CPU build the kernels run now: "avx512", "avx2" or "base" (capped by POM_EXT_CPU_ISA).
POM_EXT_API std::string cpu_isa();

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

// Weighted block-causal prefix mean: H_t = sum_{n <= end(t)} w_n p_n / sum_{n <= end(t)} w_n (0 where that sum is
// 0), layout of h; weight (B, N), or (total,) with cu_seqlens, bool (padding) or floating.
POM_EXT_API at::Tensor poly_causal_weighted(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                            int64_t block_size = 1, const OptTensor& cu_seqlens = {});
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_weighted_backward(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& weight, int64_t block_size, const OptTensor& cu_seqlens, bool weight_grad);

// Gated block-causal mixer: hs (B, N, E + S) = [h | gate pre-activation] -> y = hardsigmoid(pre + gate_bias) * H,
// (B, N, E); S = E (a gate per channel) or S dividing E (a gate per group of E / S channels).
POM_EXT_API at::Tensor poly_causal_gated(const at::Tensor& hs, const at::Tensor& coeff,
                                         const OptTensor& gate_bias = {}, int64_t block_size = 1,
                                         const OptTensor& cu_seqlens = {});
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_backward(
    const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
    int64_t block_size, const OptTensor& cu_seqlens);

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

// Rotary positions fused into the aggregations (SPEC §2b): the mean / block-causal prefix mean of
// p~_n = R(positions_n) p_n. cos, sin: (L, P) tables with E = 2 P S (S sections of 2 P channels; in section s, pair i
// joins channels 2Ps + i and 2Ps + P + i and turns by the angle of row positions[n, s], column i); positions:
// (N, S) or (B, N, S) integer rows of the tables, (total, S) when packed.
POM_EXT_API at::Tensor poly_mean_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& positions,
                                      const OptTensor& weight = {}, const OptTensor& cu_seqlens = {});
POM_EXT_API at::Tensor poly_causal_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                        const at::Tensor& sin, const at::Tensor& positions, int64_t block_size = 1,
                                        const OptTensor& cu_seqlens = {});
// The gated mixer with rotary positions: hs = [h | pre] as for poly_causal_gated; the features turn by (cos, sin) as
// for poly_causal_rope, the S gates hardsigmoid(pre + gate_bias) by (gate_cos, gate_sin) (L, Pg) at the same
// positions (2 Pg gates per section, gate j paired with j + Pg) -> y = s~ * H~ (E columns).
POM_EXT_API at::Tensor poly_causal_gated_rope(const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
                                              const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& gate_cos,
                                              const at::Tensor& gate_sin, const at::Tensor& positions,
                                              int64_t block_size = 1, const OptTensor& cu_seqlens = {});
// The PoM block's causal depthwise convolution: x (B, T, D), weight (D, K), bias (D,) ->
// y[b, t, d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d] (zeros before the first row); and its backward
// (gradients of x, weight and bias; an empty bias gradient without bias).
POM_EXT_API at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias = {});
POM_EXT_API std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(const at::Tensor& grad_y,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& weight,
                                                                                  const OptTensor& bias = {});

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

// Weighted block-causal prefix mean (ops::poly_causal_weighted). Gradients for h, coeff and a floating weight.
POM_EXT_API at::Tensor poly_causal_weighted(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                            int64_t block_size = 1, const ops::OptTensor& cu_seqlens = {});

// Gated block-causal mixer (ops::poly_causal_gated). Gradients for hs (one tensor), coeff and gate_bias.
POM_EXT_API at::Tensor poly_causal_gated(const at::Tensor& hs, const at::Tensor& coeff,
                                         const ops::OptTensor& gate_bias = {}, int64_t block_size = 1,
                                         const ops::OptTensor& cu_seqlens = {});

// The rope ops (ops::poly_mean_rope, ops::poly_causal_rope) with gradients for h, coeff (and a floating weight).
POM_EXT_API at::Tensor poly_mean_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& positions,
                                      const ops::OptTensor& weight = {}, const ops::OptTensor& cu_seqlens = {});
POM_EXT_API at::Tensor poly_causal_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                        const at::Tensor& sin, const at::Tensor& positions, int64_t block_size = 1,
                                        const ops::OptTensor& cu_seqlens = {});
// ops::poly_causal_gated_rope with gradients for hs (one tensor), coeff and gate_bias.
POM_EXT_API at::Tensor poly_causal_gated_rope(const at::Tensor& hs, const at::Tensor& coeff,
                                              const ops::OptTensor& gate_bias, const at::Tensor& cos,
                                              const at::Tensor& sin, const at::Tensor& gate_cos,
                                              const at::Tensor& gate_sin, const at::Tensor& positions,
                                              int64_t block_size = 1, const ops::OptTensor& cu_seqlens = {});

// ops::causal_conv1d with gradients for x, weight and bias.
POM_EXT_API at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const ops::OptTensor& bias = {});

// x~ = R(positions) x for x (..., N, E) (tables and positions as for the rope ops), in x's dtype; differentiable.
POM_EXT_API at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& positions);

// Rotary positions for aggregate(): the rope ops' tables and positions (undefined cos: none).
struct POM_EXT_API Rotation {
  at::Tensor cos, sin, positions;
  bool defined() const { return cos.defined(); }
};

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
// With a rotation, of the rotated features (the rope ops; a (B, T, N) mask rotates p, then the batched product).
POM_EXT_API at::Tensor aggregate(const at::Tensor& h, const at::Tensor& coeff, const Mask& mask = {},
                                 const at::Tensor& cu_seqlens = {}, const Rotation& rotation = {});

// y = s * H; with n_sel_heads G > 1, s (..., G) gates E / G contiguous channels each.
POM_EXT_API at::Tensor select(const at::Tensor& s, const at::Tensor& H, int64_t n_sel_heads = 1);

}  // namespace pom_ext
