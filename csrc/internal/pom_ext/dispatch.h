// Compile-time degree dispatch shared by the CPU and CUDA launchers: degrees 1..4
// get fully unrolled kernels, every other degree runs the generic path (K == 0).
#pragma once

#include <type_traits>

namespace pom_ext {

template <typename F>
void dispatch_degree(int degree, F&& f) {
  switch (degree) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace pom_ext
