// libpom_ext_probe: a shared library linked to libpom_ext, as a pybind11 module or a plugin of a C++ stack would
// be, loaded into a Python process together with `import pom_ext` (tests/test_cpp_interop.py), in either order.
#include <pom_ext/pom_ext.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

namespace {
std::string last_error;
}

extern "C" {

// The version of the pom_ext ops this process runs, or "error: ..." when they cannot run.
const char* pom_ext_probe_version() {
  try {
    last_error = pom_ext::ensure_registered();
  } catch (const c10::Error& e) {
    last_error = std::string("error: ") + e.what_without_backtrace();
  }
  return last_error.c_str();
}

// sum(poly_causal(h, coeff)) + sum(d/dh) for h[b, n, e] = sin(0.1 (b N E + n E + e)) and coeff[e, k] =
// cos(e + k) / (k + 1), through the C++ API (autograd included); NaN on error (pom_ext_probe_error()).
double pom_ext_probe_causal(int64_t B, int64_t N, int64_t E, int64_t K) {
  try {
    torch::Tensor h = (torch::arange(B * N * E, torch::kDouble) * 0.1).sin().view({B, N, E}).requires_grad_();
    torch::Tensor k = torch::arange(K, torch::kDouble);
    torch::Tensor coeff = (torch::arange(E, torch::kDouble).unsqueeze(1) + k).cos() / (k + 1);
    torch::Tensor y = pom_ext::poly_causal(h, coeff);
    y.sum().backward();
    return y.sum().item<double>() + h.grad().sum().item<double>();
  } catch (const c10::Error& e) {
    last_error = std::string("error: ") + e.what_without_backtrace();
    return std::nan("");
  }
}

const char* pom_ext_probe_error() { return last_error.c_str(); }
}
