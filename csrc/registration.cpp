// The pom_ext op library: op schemas, and the one place where this library registers itself with the dispatcher
// (CPU, CUDA, Meta and Autograd kernels; see pom_ext/library.h).
//
// Two copies of this library can be loaded into one process: libpom_ext (CMake, for C++ programs) and the Python
// extension pom_ext._C, e.g. a pybind11 module linked to libpom_ext next to `import pom_ext`. The dispatcher
// accepts one definition of the namespace, so the copy loaded second registers nothing and every call, from
// either copy's C++ API or from Python, goes to the first copy's kernels. That is right when the first copy has
// everything the second one has: the same version, and CUDA kernels if the second has them. Otherwise the second
// copy records why (registration_error()), and ensure_registered() (C++) and `import pom_ext` (Python) raise it
// instead of running another build's kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/AutogradState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <vector>

#include "pom_ext/library.h"
#include "pom_ext/version.h"

namespace pom_ext {
namespace detail {

void define_ops(torch::Library& m) {
  // p = poly(act(h)) element-wise; h: (..., E), coeff: (E, K).
  m.def("poly_eval(Tensor h, Tensor coeff) -> Tensor");
  m.def("poly_eval_backward(Tensor grad_p, Tensor h, Tensor coeff) -> (Tensor, Tensor)");
  // H = sum_n w p / sum_n w  (w = 1 without weight); h: (B, N, E) or (total, E) with cu_seqlens -> (B, E).
  m.def("poly_mean(Tensor h, Tensor coeff, Tensor? weight=None, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_mean_backward(Tensor grad_H, Tensor H, Tensor h, Tensor coeff, Tensor? weight, Tensor? cu_seqlens, "
      "bool weight_grad) -> (Tensor, Tensor, Tensor)");
  // Block-causal prefix mean (block_size 1: token-causal); output has the layout of h.
  m.def("poly_causal(Tensor h, Tensor coeff, int block_size=1, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_backward(Tensor grad_H, Tensor h, Tensor coeff, int block_size, Tensor? cu_seqlens) "
      "-> (Tensor, Tensor)");
  // Weighted block-causal prefix mean: H_t = sum_{n <= end(t)} w_n p_n / sum_{n <= end(t)} w_n (0 where that sum is
  // 0), end(t) the last row of t's block; weight: (B, N), or (total,) when packed, bool or floating. Padding (w = 0)
  // contributes nothing. The backward returns the weight's gradient when weight_grad is true (else an empty tensor).
  m.def("poly_causal_weighted(Tensor h, Tensor coeff, Tensor weight, int block_size=1, Tensor? cu_seqlens=None) "
        "-> Tensor");
  m.def(
      "poly_causal_weighted_backward(Tensor grad_H, Tensor H, Tensor h, Tensor coeff, Tensor weight, int block_size, "
      "Tensor? cu_seqlens, bool weight_grad) -> (Tensor, Tensor, Tensor)");
  // Gated block-causal mixer: hs = [h | pre] (E + S columns, E = coeff.size(0)); y = hardsigmoid(pre + gate_bias)
  // * H, one gate per channel (S = E) or per group of E / S channels; y has E columns. The backward returns the
  // gradient of hs as one tensor (h and pre columns), of coeff and of gate_bias.
  m.def("poly_causal_gated(Tensor hs, Tensor coeff, Tensor? gate_bias=None, int block_size=1, "
        "Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_gated_backward(Tensor grad_y, Tensor hs, Tensor coeff, Tensor? gate_bias, int block_size, "
      "Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor)");
  // Recurrent state: append a chunk h (B, T, E) to (state_sum (B, E) fp32 or fp64, count (B,) int64);
  // returns H (B, E) seen by every token of the chunk, and the new state.
  m.def("poly_state_update(Tensor h, Tensor coeff, Tensor state_sum, Tensor count) -> (Tensor, Tensor, Tensor)");
  m.def(
      "poly_state_update_backward(Tensor grad_H, Tensor grad_state_sum, Tensor h, Tensor coeff, Tensor count) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("poly_state_step_(Tensor h, Tensor coeff, Tensor(a!) state_sum, Tensor(b!) count) -> Tensor");
  // Rotary positions fused into the aggregations: p~_n = R(positions_n) p_n, then the mean (weighted, packed) or
  // the block-causal prefix mean of p~. cos, sin: (L, P) tables, E = 2 P S (S sections of 2 P channels: pair i of
  // section s joins channels 2Ps + i and 2Ps + P + i and turns by the angle of row positions[n, s], column i);
  // positions: (N, S) or (B, N, S) integer rows of the tables, (total, S) when packed. No gradient for the tables.
  m.def("poly_mean_rope(Tensor h, Tensor coeff, Tensor cos, Tensor sin, Tensor positions, Tensor? weight=None, "
        "Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_mean_rope_backward(Tensor grad_H, Tensor H, Tensor h, Tensor coeff, Tensor cos, Tensor sin, "
      "Tensor positions, Tensor? weight, Tensor? cu_seqlens, bool weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def("poly_causal_rope(Tensor h, Tensor coeff, Tensor cos, Tensor sin, Tensor positions, int block_size=1, "
        "Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_rope_backward(Tensor grad_H, Tensor h, Tensor coeff, Tensor cos, Tensor sin, Tensor positions, "
      "int block_size, Tensor? cu_seqlens) -> (Tensor, Tensor)");
  // The gated mixer with rotary positions: hs = [h | pre] as in poly_causal_gated; the features turn by cos, sin
  // (as in poly_causal_rope) and the S gates s = hardsigmoid(pre + gate_bias) by gate_cos, gate_sin (L, Pg) at the
  // same positions (2 Pg gates per section, gate j paired with j + Pg): y = R_g s * H~, H~ the block-causal prefix
  // mean of the turned features. No gradient for the tables.
  m.def("poly_causal_gated_rope(Tensor hs, Tensor coeff, Tensor? gate_bias, Tensor cos, Tensor sin, Tensor gate_cos, "
        "Tensor gate_sin, Tensor positions, int block_size=1, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_gated_rope_backward(Tensor grad_y, Tensor hs, Tensor coeff, Tensor? gate_bias, Tensor cos, "
      "Tensor sin, Tensor gate_cos, Tensor gate_sin, Tensor positions, int block_size, Tensor? cu_seqlens) "
      "-> (Tensor, Tensor, Tensor)");
  // The PoM block's causal depthwise convolution, in the (B, T, D) layout of the model (no transposes):
  // y[b, t, d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d], x = 0 before the first row (nn.Conv1d with
  // groups = D and K - 1 zeros of left padding). weight, bias: any floating dtype, gradients in their own dtypes;
  // the backward returns an empty bias gradient when bias is None.
  m.def("causal_conv1d(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("causal_conv1d_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");
  // Which CPU build the kernels run: "base", "avx2" or "avx512".
  m.def("cpu_isa() -> str", [] { return cpu_isa(); });
  // The build whose kernels this process runs: "<version>+cpu" or "<version>+cuda".
  m.def("build_info() -> str", [] { return std::string(build_info()); });
}

const char* build_info() {
#ifdef POM_EXT_WITH_CUDA
  return POM_EXT_VERSION "+cuda";
#else
  return POM_EXT_VERSION "+cpu";
#endif
}

ClampBounds clamp_bounds() {
  static const ClampBounds rule = [] {
    // torch's own formula, outside whatever state the caller is in (a kernel below autograd, inference mode, a
    // Python dispatch mode): default dispatch keys, grad mode on. Measured when the library loads; should that
    // fail, at the first backward (inside the autograd engine this is a reentrant backward, which it supports).
    c10::impl::ForceDispatchKeyGuard keys(c10::default_included_set, c10::default_excluded_set);
    const c10::AutogradState saved = c10::AutogradState::get_tls_state();
    c10::AutogradState::set_tls_state(c10::AutogradState(/*grad_mode=*/true, /*inference_mode=*/false,
                                                         /*fw_grad_mode=*/true, /*multithreading_enabled=*/true));
    ClampBounds r;
    try {
      const at::Tensor x = at::tensor(std::vector<double>{-0.1, 6.0}, at::kDouble).set_requires_grad(true);
      const at::Tensor y = at::clamp(x, -0.1, 6.0);
      const at::Tensor g = torch::autograd::grad({y}, {x}, {at::ones_like(y)}).at(0);
      r.lower = g[0].item<double>() != 0.0;
      r.upper = g[1].item<double>() != 0.0;
    } catch (...) {
      c10::AutogradState::set_tls_state(saved);
      throw;
    }
    c10::AutogradState::set_tls_state(saved);
    return r;
  }();
  return rule;
}

namespace {

std::string& conflict() {
  static std::string message;
  return message;
}

bool ops_defined() {
  return c10::Dispatcher::singleton().findSchema({"pom_ext::build_info", ""}).has_value();
}

std::string loaded_build_info() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pom_ext::build_info", "").typed<std::string()>();
  return op.call();
}

struct Registration {
  std::vector<std::unique_ptr<torch::Library>> libraries;

  torch::Library& add(torch::Library::Kind kind, std::optional<c10::DispatchKey> key) {
    libraries.push_back(std::make_unique<torch::Library>(kind, "pom_ext", key, __FILE__, __LINE__));
    return *libraries.back();
  }

  Registration() {
    if (ops_defined()) {
      const std::string other = loaded_build_info(), mine = build_info();
      const std::string cpu_of_other = other.substr(0, other.rfind('+')) + "+cpu";
      if (other != mine && mine != cpu_of_other) {
        conflict() = "pom_ext: the pom_ext ops are already registered in this process by another copy of the op "
                     "library, build " + other + ", and this copy is build " + std::string(build_info()) +
                     "; one process runs one build of pom_ext: load the build with CUDA kernels first, or builds "
                     "of one version with the same CUDA setting";
      }
      return;
    }
    define_ops(add(torch::Library::DEF, std::nullopt));
    register_cpu(add(torch::Library::IMPL, c10::DispatchKey::CPU));
#ifdef POM_EXT_WITH_CUDA
    torch::Library& cuda = add(torch::Library::IMPL, c10::DispatchKey::CUDA);
    register_cuda_eval(cuda);
    register_cuda_mean(cuda);
    register_cuda_causal(cuda);
    register_cuda_state(cuda);
    register_cuda_conv(cuda);
#endif
    register_meta(add(torch::Library::IMPL, c10::DispatchKey::Meta));
    register_autograd(add(torch::Library::IMPL, c10::DispatchKey::Autograd));
    register_inplace_or_view(add(torch::Library::IMPL, c10::DispatchKey::ADInplaceOrView));
    try {
      clamp_bounds();
    } catch (const std::exception&) {
      // measured at the first backward instead, which reports the error
    }
  }
};

Registration registration;

}  // namespace

const std::string& registration_error() { return conflict(); }

}  // namespace detail
}  // namespace pom_ext
