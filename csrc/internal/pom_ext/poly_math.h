// Element math of the Polynomial Mixer, shared by the CPU and CUDA kernels so
// both compute one function.
//
//   act(u)  = clamp(leaky_relu(u, 0.01), -0.1, 6)
//   p(h)    = sum_{k=1..K} c[k-1] * act(h)^k            (no constant term)
//   dp/dh   = act'(h) * sum_{k=1..K} k * c[k-1] * act(h)^(k-1)
//   dp/dc[k-1] = act(h)^k
//   gate    = hardsigmoid(x) (the selection of the layer, fused into the gated ops)
//
// Coefficients are read as c[k * cs] so a caller can pass a transposed (K, E)
// table and keep loads over the channel index contiguous. The degree is a
// template parameter for small K (fully unrolled) and K == 0 selects the
// generic path that reads the degree at run time.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define POM_HD __host__ __device__ __forceinline__
#define POM_UNROLL _Pragma("unroll")
#else
#define POM_HD inline __attribute__((always_inline))
// GCC unrolls the constant-trip-count degree loops by itself at -O3 (and warns on a pragma over the
// run-time-degree loops), so host code needs no unroll pragma.
#define POM_UNROLL
#endif

namespace pom_ext {
namespace math {

// Comparisons are written so that NaN propagates (every test is false for NaN), and each select has the
// shape `c > v ? c : v` / `c < v ? c : v` of an IEEE max / min whose second operand is v, which vectorizes to
// one max or min instruction that returns v when it is NaN.
template <typename T>
POM_HD T act(T u) {
  const T w = T(0.01) * u;
  T v = w > u ? w : u;              // leaky_relu: u >= 0 -> u, u < 0 -> 0.01 u
  v = T(-0.1) > v ? T(-0.1) : v;    // clamp below
  return T(6) < v ? T(6) : v;       // clamp above
}

// d act / du: 1 on (0, 6), 0.01 on (-10, 0] (at u = 0 torch's leaky_relu takes the negative slope), 0 outside
// [-10, 6] and for NaN. At the clamp's bounds u = -10 and u = 6 the derivative follows the installed torch's
// torch.clamp (SPEC §1.2): torch <= 2.13 passes the gradient at a bound, 2.14 does not. The rule is read once
// (math::act_grad_rule in pom_ext/library.h) and carried as the interval [lo, hi] of u with a nonzero derivative:
// [-10, 6], or the open interval (-10, 6) written as [the next value above -10, the next value below 6] of the
// type, so one comparison form serves both rules.
template <typename T>
struct ActGrad {
  T lo = T(-10), hi = T(6);
  POM_HD T operator()(T u) const {
    const T slope = u > T(0) ? T(1) : T(0.01);
    return (u >= lo && u <= hi) ? slope : T(0);
  }
};

// The gate: hardsigmoid(x) = min(max(x + 3, 0), 6) / 6, as torch computes it (NaN propagates).
template <typename T>
POM_HD T hsig(T x) {
  T v = x + T(3);
  v = v < T(0) ? T(0) : v;
  v = v > T(6) ? T(6) : v;
  return v / T(6);
}

// d hardsigmoid / dx: 1/6 on (-3, 3), 0 elsewhere, with torch's conventions (open interval, and the slope
// is the float 1/6 in every dtype) so the fused gate has the gradient of F.hardsigmoid exactly.
template <typename T>
POM_HD T hsig_grad(T x) {
  return (x > T(-3) && x < T(3)) ? T(1.0f / 6.0f) : T(0);
}

template <int K>
POM_HD int degree_of(int k_rt) {
  return K > 0 ? K : k_rt;
}

// p = sum_k c[k] a^(k+1), by Horner.
template <int K, typename T>
POM_HD T poly(T a, const T* c, int64_t cs, int k_rt) {
  const int deg = degree_of<K>(k_rt);
  T q = c[(deg - 1) * cs];
  POM_UNROLL
  for (int k = deg - 2; k >= 0; --k) q = q * a + c[k * cs];
  return q * a;
}

// p and dp/da together (Horner for both; the first step of dp's recurrence, dq = q, is taken outside the loop).
template <int K, typename T>
POM_HD void poly_and_slope(T a, const T* c, int64_t cs, int k_rt, T& p, T& dp) {
  const int deg = degree_of<K>(k_rt);
  T q = c[(deg - 1) * cs];
  if (deg == 1) {
    p = q * a;
    dp = q;
    return;
  }
  T dq = q;
  q = q * a + c[(deg - 2) * cs];
  POM_UNROLL
  for (int k = deg - 3; k >= 0; --k) {
    dq = dq * a + q;
    q = q * a + c[k * cs];
  }
  p = q * a;
  dp = q + a * dq;
}

// Kahan-compensated running sum: keeps long prefix sums accurate in fp32.
template <typename T>
POM_HD void kahan_add(T& sum, T& comp, T x) {
  T y = x - comp;
  T t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

}  // namespace math
}  // namespace pom_ext
