// Gradient reaching every token of an appended chunk, and the incoming state sum, for
// poly_state_update's backward; ATen ops only, so every backend computes it alike.
#pragma once

#include <ATen/ATen.h>

namespace pom_ext {

// H = (sum + S) / (count + T), new_sum = sum + S: d/d(sum) = d/d(p_t) = grad_H / (count + T) + grad_new_sum
// (grad_H contributes 0 where count + T == 0). Returned in float64, shape (B, E).
inline at::Tensor state_chunk_grad(const at::Tensor& grad_H, const at::Tensor& grad_sum, const at::Tensor& count,
                                   int64_t T) {
  auto cnt = (count.to(at::kDouble) + static_cast<double>(T)).unsqueeze(1);
  return at::where(cnt > 0, grad_H.to(at::kDouble) / cnt.clamp_min(1), at::zeros_like(cnt)) +
         grad_sum.to(at::kDouble);
}

}  // namespace pom_ext
