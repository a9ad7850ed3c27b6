// How the op library registers itself, and the torch rules its kernels follow (internal).
//
// Registration: csrc/registration.cpp owns it. When the library loads it defines the schemas and registers every
// kernel (CPU, CUDA, Meta, Autograd) through the functions below, unless the ops are already registered in this
// process (libpom_ext and the Python extension pom_ext._C loaded together): then the second one registers nothing
// and uses the first one's ops, provided both are the same build (build_info()); otherwise it records why it
// cannot, and ensure_registered() / `import pom_ext` raise that.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "pom_ext/poly_math.h"

namespace pom_ext {
namespace detail {

void define_ops(torch::Library& m);        // schemas (registration.cpp)
void register_cpu(torch::Library& m);      // csrc/cpu/register_cpu.cpp
void register_meta(torch::Library& m);     // csrc/meta.cpp
void register_autograd(torch::Library& m); // csrc/autograd.cpp
void register_inplace_or_view(torch::Library& m);  // csrc/autograd.cpp
#ifdef POM_EXT_WITH_CUDA
void register_cuda_eval(torch::Library& m);    // csrc/cuda/eval.cu
void register_cuda_mean(torch::Library& m);    // csrc/cuda/mean.cu
void register_cuda_causal(torch::Library& m);  // csrc/cuda/causal.cu
void register_cuda_state(torch::Library& m);   // csrc/cuda/state.cu
void register_cuda_conv(torch::Library& m);    // csrc/cuda/conv.cu
#endif

// "<version>+cpu" or "<version>+cuda": two loaded copies of the op library agree when these are equal.
const char* build_info();

// Empty, or why this copy of the op library could not take part (another build registered the ops first).
const std::string& registration_error();

// The CPU build the kernels run now: "base", "avx2" or "avx512" (csrc/cpu/register_cpu.cpp).
std::string cpu_isa();

// Whether the installed torch's torch.clamp passes the gradient at its lower and upper bound (torch <= 2.13: both,
// 2.14: neither), measured once, on first use, through torch's own autograd formula.
struct ClampBounds {
  bool lower = true, upper = true;
};
ClampBounds clamp_bounds();

// m.impl of every op but the in-place decode step, each to the function of the op's short name in the scope of
// the call (eval, eval_bwd, mean, mean_bwd, causal, causal_bwd, causal_weighted, causal_weighted_bwd, causal_gated,
// causal_gated_bwd, state_update,
// state_update_bwd, mean_rope, mean_rope_bwd, causal_rope, causal_rope_bwd, causal_gated_rope,
// causal_gated_rope_bwd, conv, conv_bwd): one list for the CPU, Meta and Autograd registrations.
#define POM_EXT_IMPL_OPS(m)                                    \
  do {                                                         \
    (m).impl("poly_eval", &eval);                              \
    (m).impl("poly_eval_backward", &eval_bwd);                 \
    (m).impl("poly_mean", &mean);                              \
    (m).impl("poly_mean_backward", &mean_bwd);                 \
    (m).impl("poly_causal", &causal);                          \
    (m).impl("poly_causal_backward", &causal_bwd);             \
    (m).impl("poly_causal_weighted", &causal_weighted);        \
    (m).impl("poly_causal_weighted_backward", &causal_weighted_bwd); \
    (m).impl("poly_causal_gated", &causal_gated);              \
    (m).impl("poly_causal_gated_backward", &causal_gated_bwd); \
    (m).impl("poly_state_update", &state_update);              \
    (m).impl("poly_state_update_backward", &state_update_bwd); \
    (m).impl("poly_mean_rope", &mean_rope);                    \
    (m).impl("poly_mean_rope_backward", &mean_rope_bwd);       \
    (m).impl("poly_causal_rope", &causal_rope);                \
    (m).impl("poly_causal_rope_backward", &causal_rope_bwd);   \
    (m).impl("poly_causal_gated_rope", &causal_gated_rope);    \
    (m).impl("poly_causal_gated_rope_backward", &causal_gated_rope_bwd); \
    (m).impl("causal_conv1d", &conv);                          \
    (m).impl("causal_conv1d_backward", &conv_bwd);             \
  } while (0)

// The typed handle of a registered op, e.g. op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>(
// "pom_ext::poly_eval"); throws when the ops are not registered.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace detail

namespace math {

// The activation's derivative under the installed torch's rule at the clamp's bounds (ActGrad, poly_math.h).
template <typename T>
ActGrad<T> act_grad_rule() {
  const detail::ClampBounds b = detail::clamp_bounds();
  ActGrad<T> r;
  if (!b.lower) r.lo = std::nextafter(T(-10), T(0));
  if (!b.upper) r.hi = std::nextafter(T(6), T(0));
  return r;
}

}  // namespace math
}  // namespace pom_ext
