// Entry points of the CPU kernels, one set per instruction set (see poly_cpu_impl.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#define POM_CPU_DECLARE_OPS(ARCH)                                                                                 \
  namespace pom_ext {                                                                                             \
  namespace cpu {                                                                                                 \
  namespace ARCH {                                                                                                \
  at::Tensor poly_eval_cpu(const at::Tensor& h, const at::Tensor& coeff);                                         \
  std::tuple<at::Tensor, at::Tensor> poly_eval_backward_cpu(const at::Tensor& grad_p, const at::Tensor& h,        \
                                                            const at::Tensor& coeff);                             \
  at::Tensor poly_mean_cpu(const at::Tensor& h, const at::Tensor& coeff, const c10::optional<at::Tensor>& weight, \
                           const c10::optional<at::Tensor>& cu_seqlens);                                          \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_backward_cpu(                                          \
      const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,                \
      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad);    \
  at::Tensor poly_causal_cpu(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,                    \
                             const c10::optional<at::Tensor>& cu_seqlens);                                        \
  std::tuple<at::Tensor, at::Tensor> poly_causal_backward_cpu(const at::Tensor& grad_H, const at::Tensor& h,      \
                                                              const at::Tensor& coeff, int64_t block_size,        \
                                                              const c10::optional<at::Tensor>& cu_seqlens);       \
  at::Tensor poly_causal_weighted_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,       \
                                      int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens);           \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_weighted_backward_cpu(                               \
      const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,                \
      const at::Tensor& weight, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad); \
  at::Tensor poly_causal_gated_cpu(const at::Tensor& hs, const at::Tensor& coeff,                                 \
                                   const c10::optional<at::Tensor>& gate_bias, int64_t block_size,                \
                                   const c10::optional<at::Tensor>& cu_seqlens);                                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_backward_cpu(                                  \
      const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,                                    \
      const c10::optional<at::Tensor>& gate_bias, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_cpu(                                           \
      const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum, const at::Tensor& count);         \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_backward_cpu(                                  \
      const at::Tensor& grad_H, const at::Tensor& grad_sum, const at::Tensor& h, const at::Tensor& coeff,         \
      const at::Tensor& count);                                                                                   \
  at::Tensor poly_state_step_cpu(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum,             \
                                 at::Tensor& count);                                                              \
  at::Tensor poly_mean_rope_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,              \
                                const at::Tensor& sin, const at::Tensor& positions,                               \
                                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu);    \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_rope_backward_cpu(                                     \
      const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,                \
      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,                                  \
      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu, bool weight_grad);            \
  at::Tensor poly_causal_rope_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,            \
                                  const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,         \
                                  const c10::optional<at::Tensor>& cu);                                           \
  std::tuple<at::Tensor, at::Tensor> poly_causal_rope_backward_cpu(                                               \
      const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,              \
      const at::Tensor& sin, const at::Tensor& positions, int64_t block_size, const c10::optional<at::Tensor>& cu); \
  at::Tensor poly_causal_gated_rope_cpu(const at::Tensor& hs, const at::Tensor& coeff,                             \
                                        const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos,         \
                                        const at::Tensor& sin, const at::Tensor& gate_cos,                         \
                                        const at::Tensor& gate_sin, const at::Tensor& positions,                   \
                                        int64_t block_size, const c10::optional<at::Tensor>& cu);                  \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_rope_backward_cpu(                              \
      const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,                                    \
      const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos, const at::Tensor& sin,                   \
      const at::Tensor& gate_cos, const at::Tensor& gate_sin, const at::Tensor& positions, int64_t block_size,    \
      const c10::optional<at::Tensor>& cu);                                                                       \
  at::Tensor causal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight,                                     \
                               const c10::optional<at::Tensor>& bias);                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward_cpu(                                      \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,                                    \
      const c10::optional<at::Tensor>& bias);                                                                     \
  }                                                                                                               \
  }                                                                                                               \
  }

POM_CPU_DECLARE_OPS(base)
// POM_CPU_BASE_ONLY: a build of the baseline kernels only (setup.py / CMake POM_EXT_CPU_ISAS=base).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(POM_CPU_BASE_ONLY)
#define POM_CPU_HAVE_AVX2 1
POM_CPU_DECLARE_OPS(avx2)
POM_CPU_DECLARE_OPS(avx512)
#endif
