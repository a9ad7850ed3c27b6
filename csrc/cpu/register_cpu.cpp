// Registers the CPU kernels, choosing per call between the AVX2 build and the
// baseline build. POM_EXT_CPU_ISA=base forces the baseline (used by the tests).
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "poly_cpu.h"

namespace pom_ext {
namespace cpu {
namespace {

bool use_avx2() {
#ifdef POM_CPU_HAVE_AVX2
  static const bool hw = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  const char* isa = std::getenv("POM_EXT_CPU_ISA");
  return hw && !(isa && std::strcmp(isa, "base") == 0);
#else
  return false;
#endif
}

#ifdef POM_CPU_HAVE_AVX2
#define POM_CPU_PICK(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define POM_CPU_PICK(fn, ...) base::fn(__VA_ARGS__)
#endif

using OptT = c10::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor eval(const at::Tensor& h, const at::Tensor& c) { return POM_CPU_PICK(poly_eval_cpu, h, c); }
T2 eval_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c) {
  return POM_CPU_PICK(poly_eval_backward_cpu, g, h, c);
}
at::Tensor mean(const at::Tensor& h, const at::Tensor& c, const OptT& w, const OptT& cu) {
  return POM_CPU_PICK(poly_mean_cpu, h, c, w, cu);
}
T3 mean_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c, const OptT& w,
            const OptT& cu, bool wg) {
  return POM_CPU_PICK(poly_mean_backward_cpu, g, H, h, c, w, cu, wg);
}
at::Tensor causal(const at::Tensor& h, const at::Tensor& c, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_cpu, h, c, f, cu);
}
T2 causal_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_backward_cpu, g, h, c, f, cu);
}
at::Tensor causal_gated(const at::Tensor& hs, const at::Tensor& c, const OptT& b, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_gated_cpu, hs, c, b, f, cu);
}
T3 causal_gated_bwd(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c, const OptT& b, int64_t f,
                    const OptT& cu) {
  return POM_CPU_PICK(poly_causal_gated_backward_cpu, g, hs, c, b, f, cu);
}
T3 state_update(const at::Tensor& h, const at::Tensor& c, const at::Tensor& s, const at::Tensor& n) {
  return POM_CPU_PICK(poly_state_update_cpu, h, c, s, n);
}
T3 state_update_bwd(const at::Tensor& gH, const at::Tensor& gs, const at::Tensor& h, const at::Tensor& c,
                    const at::Tensor& n) {
  return POM_CPU_PICK(poly_state_update_backward_cpu, gH, gs, h, c, n);
}
at::Tensor state_step(const at::Tensor& h, const at::Tensor& c, at::Tensor& s, at::Tensor& n) {
  return POM_CPU_PICK(poly_state_step_cpu, h, c, s, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(pom_ext, CPU, m) {
  m.impl("poly_eval", &eval);
  m.impl("poly_eval_backward", &eval_bwd);
  m.impl("poly_mean", &mean);
  m.impl("poly_mean_backward", &mean_bwd);
  m.impl("poly_causal", &causal);
  m.impl("poly_causal_backward", &causal_bwd);
  m.impl("poly_causal_gated", &causal_gated);
  m.impl("poly_causal_gated_backward", &causal_gated_bwd);
  m.impl("poly_state_update", &state_update);
  m.impl("poly_state_update_backward", &state_update_bwd);
  m.impl("poly_state_step_", &state_step);
}

}  // namespace cpu
}  // namespace pom_ext
