// The CPU kernels, choosing per call the best build this CPU runs: AVX-512, AVX2 or the baseline.
// POM_EXT_CPU_ISA=base|avx2|avx512 caps the choice (the tests run every build this machine has), and the op
// pom_ext::cpu_isa() names the build that calls take now. Registered by csrc/registration.cpp.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "pom_ext/library.h"
#include "poly_cpu.h"

namespace pom_ext {
namespace cpu {
namespace {

enum class Isa { base = 0, avx2 = 1, avx512 = 2 };
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};

Isa hardware_isa() {
#ifdef POM_CPU_HAVE_AVX2
  // __builtin_cpu_supports also checks that the OS saves the vector registers it names.
  static const Isa hw = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
      return Isa::base;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    return Isa::avx2;
  }();
  return hw;
#else
  return Isa::base;
#endif
}

// The build calls take: the hardware's best, capped by POM_EXT_CPU_ISA (read at every call).
Isa pick() {
  const Isa hw = hardware_isa();
  const char* want = std::getenv("POM_EXT_CPU_ISA");
  if (want == nullptr || *want == '\0') return hw;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(want, kIsaNames[i]) == 0) return static_cast<Isa>(std::min(i, static_cast<int>(hw)));
  }
  TORCH_CHECK(false, "POM_EXT_CPU_ISA must be one of base, avx2, avx512 (or unset for the best this CPU runs), got '",
              want, "'");
}

#ifdef POM_CPU_HAVE_AVX2
#define POM_CPU_PICK(fn, ...)                                     \
  [&] {                                                           \
    switch (pick()) {                                             \
      case Isa::avx512:                                           \
        return avx512::fn(__VA_ARGS__);                           \
      case Isa::avx2:                                             \
        return avx2::fn(__VA_ARGS__);                             \
      default:                                                    \
        return base::fn(__VA_ARGS__);                             \
    }                                                             \
  }()
#else
// One build (POM_EXT_CPU_ISAS=base, or not x86-64): POM_EXT_CPU_ISA is still checked, as in the other builds.
#define POM_CPU_PICK(fn, ...) (static_cast<void>(pick()), base::fn(__VA_ARGS__))
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
at::Tensor causal_weighted(const at::Tensor& h, const at::Tensor& c, const at::Tensor& w, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_weighted_cpu, h, c, w, f, cu);
}

T3 causal_weighted_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c,
                       const at::Tensor& w, int64_t f, const OptT& cu, bool wg) {
  return POM_CPU_PICK(poly_causal_weighted_backward_cpu, g, H, h, c, w, f, cu, wg);
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
at::Tensor mean_rope(const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs, const at::Tensor& sn,
                     const at::Tensor& pos, const OptT& w, const OptT& cu) {
  return POM_CPU_PICK(poly_mean_rope_cpu, h, c, cs, sn, pos, w, cu);
}
T3 mean_rope_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c,
                 const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& pos, const OptT& w, const OptT& cu,
                 bool wg) {
  return POM_CPU_PICK(poly_mean_rope_backward_cpu, g, H, h, c, cs, sn, pos, w, cu, wg);
}
at::Tensor causal_rope(const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs, const at::Tensor& sn,
                       const at::Tensor& pos, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_rope_cpu, h, c, cs, sn, pos, f, cu);
}
T2 causal_rope_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs,
                   const at::Tensor& sn, const at::Tensor& pos, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_rope_backward_cpu, g, h, c, cs, sn, pos, f, cu);
}
at::Tensor causal_gated_rope(const at::Tensor& hs, const at::Tensor& c, const OptT& b, const at::Tensor& cs,
                             const at::Tensor& sn, const at::Tensor& gcs, const at::Tensor& gsn, const at::Tensor& pos,
                             int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_gated_rope_cpu, hs, c, b, cs, sn, gcs, gsn, pos, f, cu);
}
T3 causal_gated_rope_bwd(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c, const OptT& b,
                         const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& gcs, const at::Tensor& gsn,
                         const at::Tensor& pos, int64_t f, const OptT& cu) {
  return POM_CPU_PICK(poly_causal_gated_rope_backward_cpu, g, hs, c, b, cs, sn, gcs, gsn, pos, f, cu);
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const OptT& b) { return POM_CPU_PICK(causal_conv1d_cpu, x, w, b); }
T3 conv_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  return POM_CPU_PICK(causal_conv1d_backward_cpu, g, x, w, b);
}

}  // namespace
}  // namespace cpu

namespace detail {

std::string cpu_isa() { return cpu::kIsaNames[static_cast<int>(cpu::pick())]; }

void register_cpu(torch::Library& m) {
  using namespace cpu;
  POM_EXT_IMPL_OPS(m);
  m.impl("poly_state_step_", &state_step);
}

}  // namespace detail
}  // namespace pom_ext
