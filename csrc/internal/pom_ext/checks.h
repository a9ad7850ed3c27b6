// Argument validation shared by every backend of the pom_ext ops, the Meta kernels (shape functions) included.
// Each message names the op, the argument, what was given and what was expected. Sizes are read as SymInts, so
// the same checks run on real tensors and on fake tensors with symbolic shapes (torch.compile).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace pom_ext {
namespace checks {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void floating(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": argument '", arg,
              "' must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void rank(const char* op, const char* arg, const at::Tensor& t, int64_t r, const char* shape) {
  TORCH_CHECK(t.dim() == r, op, ": argument '", arg, "' must be a ", r, "-D tensor ", shape,
              ", got a ", t.dim(), "-D tensor of shape ", t.sym_sizes());
}

inline void same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                        const char* ref_arg = "h") {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", arg, "' is on ", t.device(),
              " but '", ref_arg, "' is on ", ref.device(), "; move both to one device");
}

inline void size_is(const char* op, const char* arg, const at::Tensor& t, int64_t dim, const c10::SymInt& expected,
                    const char* what) {
  TORCH_CHECK(t.sym_size(dim) == expected, op, ": argument '", arg, "' has size ", t.sym_size(dim), " in dim ", dim,
              " but ", what, " is ", expected, " (shape ", t.sym_sizes(), ")");
}

// coeff: an (E, K) floating table with K >= 1 on the device of h (any E).
inline void coeff_shape(const char* op, const at::Tensor& h, const at::Tensor& c, const char* h_arg = "h") {
  floating(op, "coeff", c);
  same_device(op, "coeff", c, h, h_arg);
  rank(op, "coeff", c, 2, "(E, K)");
  TORCH_CHECK(c.sym_size(1) >= 1, op, ": argument 'coeff' must have degree K >= 1 columns, got shape ",
              c.sym_sizes());
}

// coeff: (E, K) with K >= 1 and E matching the last dim of h.
inline void coeff(const char* op, const at::Tensor& h, const at::Tensor& c) {
  coeff_shape(op, h, c);
  size_is(op, "coeff", c, 0, h.sym_size(-1), "the width E of 'h'");
}

// h: (B, N, E) dense, or (total, E) when cu_seqlens packs several sequences.
inline void h_and_layout(const char* op, const at::Tensor& h, const c10::optional<at::Tensor>& cu,
                         const char* arg = "h") {
  floating(op, arg, h);
  if (cu.has_value()) {
    rank(op, arg, h, 2, "(total, E) when 'cu_seqlens' is given");
    const at::Tensor& c = *cu;
    same_device(op, "cu_seqlens", c, h, arg);
    TORCH_CHECK(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, op,
                ": argument 'cu_seqlens' must be int32 or int64, got ", c.scalar_type());
    rank(op, "cu_seqlens", c, 1, "(B + 1,)");
    TORCH_CHECK(c.sym_size(0) >= 2, op, ": argument 'cu_seqlens' must hold at least 2 offsets (B + 1 with B >= 1), "
                "got ", c.sym_size(0));
  } else {
    rank(op, arg, h, 3, "(B, N, E)");
  }
}

// Values of cu_seqlens, for backends that can read them without a device sync.
template <typename index_t>
inline void cu_values(const char* op, const index_t* cu, int64_t n, int64_t total) {
  TORCH_CHECK(cu[0] == 0, op, ": argument 'cu_seqlens' must start at 0, got ", static_cast<int64_t>(cu[0]));
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(cu[i] >= cu[i - 1], op, ": argument 'cu_seqlens' must be non-decreasing, got ",
                static_cast<int64_t>(cu[i - 1]), " then ", static_cast<int64_t>(cu[i]), " at index ", i);
  TORCH_CHECK(cu[n - 1] == total, op, ": argument 'cu_seqlens' must end at the number of packed tokens ", total,
              " (rows of 'h'), got ", static_cast<int64_t>(cu[n - 1]));
}

inline c10::SymInt sym_batch_of(const at::Tensor& h, const c10::optional<at::Tensor>& cu) {
  return cu.has_value() ? cu->sym_size(0) - 1 : h.sym_size(0);
}

// The batch of concrete (kernel) tensors.
inline int64_t batch_of(const at::Tensor& h, const c10::optional<at::Tensor>& cu) {
  return cu.has_value() ? cu->size(0) - 1 : h.size(0);
}

// weight: (B, N) (or (total,) when packed), bool or floating.
inline void weight(const char* op, const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& cu) {
  same_device(op, "weight", w, h);
  TORCH_CHECK(w.scalar_type() == at::kBool || is_float_type(w.scalar_type()), op,
              ": argument 'weight' must be bool or floating, got ", w.scalar_type());
  if (cu.has_value()) {
    rank(op, "weight", w, 1, "(total,) when 'cu_seqlens' is given");
    size_is(op, "weight", w, 0, h.sym_size(0), "the number of packed tokens of 'h'");
  } else {
    rank(op, "weight", w, 2, "(B, N)");
    size_is(op, "weight", w, 0, h.sym_size(0), "the batch B of 'h'");
    size_is(op, "weight", w, 1, h.sym_size(1), "the length N of 'h'");
  }
}

inline void block_size(const char* op, int64_t f) {
  TORCH_CHECK(f >= 1, op, ": argument 'block_size' must be >= 1, got ", f);
}

// A gradient must have the shape of the output it belongs to.
inline void same_shape(const char* op, const char* arg, const at::Tensor& g, c10::SymIntArrayRef expected,
                       const char* what) {
  TORCH_CHECK(g.sym_sizes() == expected, op, ": argument '", arg, "' must have the shape of ", what, " ", expected,
              ", got ", g.sym_sizes());
}

// Recurrent state: sum (B, E) float32 (float64 accepted) and count (B,) int64 for h (B, T, E).
inline void state(const char* op, const at::Tensor& h, const at::Tensor& sum, const at::Tensor& count) {
  same_device(op, "state_sum", sum, h);
  same_device(op, "count", count, h);
  TORCH_CHECK(sum.scalar_type() == at::kFloat || sum.scalar_type() == at::kDouble, op,
              ": argument 'state_sum' must be float32 (or float64), got ", sum.scalar_type());
  TORCH_CHECK(count.scalar_type() == at::kLong, op, ": argument 'count' must be int64, got ", count.scalar_type());
  rank(op, "state_sum", sum, 2, "(B, E)");
  rank(op, "count", count, 1, "(B,)");
  size_is(op, "state_sum", sum, 0, h.sym_size(0), "the batch B of 'h'");
  size_is(op, "state_sum", sum, 1, h.sym_size(2), "the width E of 'h'");
  size_is(op, "count", count, 0, h.sym_size(0), "the batch B of 'h'");
}


// ---- Whole-op argument checks: one per op, called by every backend (CPU, CUDA). ----

inline void eval_args(const char* op, const at::Tensor& h, const at::Tensor& c) {
  floating(op, "h", h);
  TORCH_CHECK(h.dim() >= 1, op, ": argument 'h' must have at least 1 dim (..., E), got a 0-D tensor");
  coeff(op, h, c);
}

inline void eval_backward_args(const char* op, const at::Tensor& grad_p, const at::Tensor& h, const at::Tensor& c) {
  eval_args(op, h, c);
  same_device(op, "grad_p", grad_p, h);
  same_shape(op, "grad_p", grad_p, h.sym_sizes(), "h");
}

inline void mean_args(const char* op, const at::Tensor& h, const at::Tensor& c, const c10::optional<at::Tensor>& w,
                      const c10::optional<at::Tensor>& cu) {
  h_and_layout(op, h, cu);
  coeff(op, h, c);
  if (w.has_value()) weight(op, h, *w, cu);
}

inline void mean_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h,
                               const at::Tensor& c, const c10::optional<at::Tensor>& w,
                               const c10::optional<at::Tensor>& cu, bool weight_grad) {
  mean_args(op, h, c, w, cu);
  TORCH_CHECK(!weight_grad || w.has_value(), op, ": 'weight_grad' is true but no 'weight' was given");
  const std::vector<c10::SymInt> BE{sym_batch_of(h, cu), h.sym_size(-1)};
  same_shape(op, "grad_H", grad_H, BE, "the output H (B, E)");
  same_shape(op, "H", H, BE, "the output H (B, E)");
  same_device(op, "grad_H", grad_H, h);
  same_device(op, "H", H, h);
}

inline void causal_args(const char* op, const at::Tensor& h, const at::Tensor& c, int64_t f,
                        const c10::optional<at::Tensor>& cu) {
  h_and_layout(op, h, cu);
  coeff(op, h, c);
  block_size(op, f);
}

inline void causal_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& c,
                                 int64_t f, const c10::optional<at::Tensor>& cu) {
  causal_args(op, h, c, f, cu);
  same_device(op, "grad_H", grad_H, h);
  same_shape(op, "grad_H", grad_H, h.sym_sizes(), "the output H");
}

inline void causal_weighted_args(const char* op, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w,
                                 int64_t f, const c10::optional<at::Tensor>& cu) {
  causal_args(op, h, c, f, cu);
  weight(op, h, w, cu);
}

inline void causal_weighted_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& H,
                                          const at::Tensor& h, const at::Tensor& c, const at::Tensor& w, int64_t f,
                                          const c10::optional<at::Tensor>& cu) {
  causal_weighted_args(op, h, c, w, f, cu);
  same_device(op, "grad_H", grad_H, h);
  same_device(op, "H", H, h);
  same_shape(op, "grad_H", grad_H, h.sym_sizes(), "the output H");
  same_shape(op, "H", H, h.sym_sizes(), "the output H");
}

// Gated causal: hs = [h | pre] holds E = coeff.size(0) context columns then S gate columns, S = E or a
// divisor of E (one gate per group of E / S channels); gate_bias: (S,).
inline void causal_gated_args(const char* op, const at::Tensor& hs, const at::Tensor& c,
                              const c10::optional<at::Tensor>& bias, int64_t f,
                              const c10::optional<at::Tensor>& cu) {
  h_and_layout(op, hs, cu, "hs");
  coeff_shape(op, hs, c, "hs");
  const c10::SymInt E = c.sym_size(0), S = hs.sym_size(-1) - E;
  TORCH_CHECK(E >= 1 && S >= 1 && E % S == 0, op, ": argument 'hs' must hold E + S columns, E = ", E,
              " context columns (the rows of 'coeff') then S gate columns with S = E or S dividing E, got ",
              hs.sym_size(-1), " columns (shape ", hs.sym_sizes(), ")");
  if (bias.has_value()) {
    floating(op, "gate_bias", *bias);
    same_device(op, "gate_bias", *bias, hs, "hs");
    rank(op, "gate_bias", *bias, 1, "(S,)");
    size_is(op, "gate_bias", *bias, 0, S, "the number of gate columns S of 'hs'");
  }
  block_size(op, f);
}

inline void causal_gated_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& hs,
                                       const at::Tensor& c, const c10::optional<at::Tensor>& bias, int64_t f,
                                       const c10::optional<at::Tensor>& cu) {
  causal_gated_args(op, hs, c, bias, f, cu);
  same_device(op, "grad_y", grad_y, hs, "hs");
  auto sizes = hs.sym_sizes().vec();
  sizes.back() = c.sym_size(0);
  same_shape(op, "grad_y", grad_y, sizes, "the output y");
}

inline void state_args(const char* op, const at::Tensor& h, const at::Tensor& c, const at::Tensor& sum,
                       const at::Tensor& count) {
  floating(op, "h", h);
  rank(op, "h", h, 3, "(B, T, E)");
  coeff(op, h, c);
  state(op, h, sum, count);
}

// The in-place decode step also needs a state it can write without a copy.
inline void state_step_args(const char* op, const at::Tensor& h, const at::Tensor& c, const at::Tensor& sum,
                            const at::Tensor& count) {
  state_args(op, h, c, sum, count);
  TORCH_CHECK(sum.is_contiguous() && count.is_contiguous(), op,
              ": arguments 'state_sum' and 'count' are updated in place and must be contiguous");
}

inline void state_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& grad_sum,
                                const at::Tensor& h, const at::Tensor& c, const at::Tensor& count) {
  floating(op, "h", h);
  rank(op, "h", h, 3, "(B, T, E)");
  coeff(op, h, c);
  const std::vector<c10::SymInt> BE{h.sym_size(0), h.sym_size(2)};
  same_shape(op, "grad_H", grad_H, BE, "the output H (B, E)");
  same_shape(op, "grad_state_sum", grad_sum, BE, "the state sum (B, E)");
  same_shape(op, "count", count, c10::SymIntArrayRef(BE.data(), 1), "the batch (B,)");
  same_device(op, "grad_H", grad_H, h);
  same_device(op, "grad_state_sum", grad_sum, h);
  same_device(op, "count", count, h);
}


// ---- Rotary positions (the rope ops) ----
// cos, sin: (L, P) floating tables, the rotation of every pair at positions 0..L-1. E = 2 P S: S sections of 2 P
// channels; in section s, pair i joins channels 2Ps + i and 2Ps + P + i. positions: integer, (N, S) or (B, N, S)
// for a dense h (B, N, E), (total, S) for a packed h; their values index the rows of the tables (checked by the
// kernels, which read them).
// (The gated op's features are the first E columns of hs: E given, h the whole tensor.)
// (h_arg: the name of h in the op's schema, for the messages.)
inline void rope(const char* op, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& pos, const c10::optional<at::Tensor>& cu, const c10::SymInt& E,
                 const char* h_arg = "h") {
  floating(op, "cos", cos);
  floating(op, "sin", sin);
  same_device(op, "cos", cos, h, h_arg);
  same_device(op, "sin", sin, h, h_arg);
  same_device(op, "positions", pos, h, h_arg);
  rank(op, "cos", cos, 2, "(L, P)");
  TORCH_CHECK(sin.sym_sizes() == cos.sym_sizes(), op, ": arguments 'cos' and 'sin' must have one shape, got ",
              cos.sym_sizes(), " and ", sin.sym_sizes());
  const c10::SymInt P = cos.sym_size(1);
  TORCH_CHECK(P >= 1 && E % (2 * P) == 0, op, ": argument 'cos' must be (L, P) with 2 P dividing the width E = ", E,
              " of the features (E / (2 P) rotation sections), got shape ", cos.sym_sizes());
  const c10::SymInt S = E / (2 * P);
  TORCH_CHECK(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt, op,
              ": argument 'positions' must be int64 or int32, got ", pos.scalar_type());
  const std::string of_h = std::string(" of '") + h_arg + "'";
  if (cu.has_value()) {
    rank(op, "positions", pos, 2, "(total, S) when 'cu_seqlens' is given");
    size_is(op, "positions", pos, 0, h.sym_size(0), ("the number of packed tokens" + of_h).c_str());
  } else {
    TORCH_CHECK(pos.dim() == 2 || pos.dim() == 3, op, ": argument 'positions' must be (N, S) or (B, N, S), got a ",
                pos.dim(), "-D tensor of shape ", pos.sym_sizes());
    if (pos.dim() == 3) size_is(op, "positions", pos, 0, h.sym_size(0), ("the batch B" + of_h).c_str());
    size_is(op, "positions", pos, pos.dim() - 2, h.sym_size(1), ("the length N" + of_h).c_str());
  }
  size_is(op, "positions", pos, pos.dim() - 1, S, "the number of rotation sections S = E / (2 P)");
}

inline void rope(const char* op, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& pos, const c10::optional<at::Tensor>& cu) {
  rope(op, h, cos, sin, pos, cu, h.sym_size(-1));
}

// The gated rope op: the E features of hs = [h | pre] turn by cos, sin at the positions; its S gates by gate_cos,
// gate_sin (L, Pg) at the same positions, in the features' sections: 2 Pg gates per section, gate j paired with
// gate j + Pg.
inline void gate_rope(const char* op, const at::Tensor& hs, const at::Tensor& c, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& gcos, const at::Tensor& gsin, const at::Tensor& pos,
                      const c10::optional<at::Tensor>& cu) {
  const c10::SymInt E = c.sym_size(0), S = hs.sym_size(-1) - E;
  rope(op, hs, cos, sin, pos, cu, E, "hs");
  floating(op, "gate_cos", gcos);
  floating(op, "gate_sin", gsin);
  same_device(op, "gate_cos", gcos, hs, "hs");
  same_device(op, "gate_sin", gsin, hs, "hs");
  rank(op, "gate_cos", gcos, 2, "(L, Pg)");
  TORCH_CHECK(gsin.sym_sizes() == gcos.sym_sizes(), op,
              ": arguments 'gate_cos' and 'gate_sin' must have one shape, got ", gcos.sym_sizes(), " and ",
              gsin.sym_sizes());
  size_is(op, "gate_cos", gcos, 0, cos.sym_size(0), "the number of rows L of 'cos'");
  const c10::SymInt sections = E / (2 * cos.sym_size(1));
  TORCH_CHECK(gcos.sym_size(1) * 2 * sections == S, op, ": argument 'gate_cos' must be (L, Pg) with 2 Pg gates in "
              "each of the ", sections, " rotation sections of the S = ", S,
              " gate columns of 'hs' (gate j paired with j + Pg), got shape ", gcos.sym_sizes());
}

inline void causal_gated_rope_args(const char* op, const at::Tensor& hs, const at::Tensor& c,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& cos,
                                   const at::Tensor& sin, const at::Tensor& gcos, const at::Tensor& gsin,
                                   const at::Tensor& pos, int64_t f, const c10::optional<at::Tensor>& cu) {
  causal_gated_args(op, hs, c, bias, f, cu);
  gate_rope(op, hs, c, cos, sin, gcos, gsin, pos, cu);
}

inline void causal_gated_rope_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& hs,
                                            const at::Tensor& c, const c10::optional<at::Tensor>& bias,
                                            const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& gcos,
                                            const at::Tensor& gsin, const at::Tensor& pos, int64_t f,
                                            const c10::optional<at::Tensor>& cu) {
  causal_gated_backward_args(op, grad_y, hs, c, bias, f, cu);
  gate_rope(op, hs, c, cos, sin, gcos, gsin, pos, cu);
}

// Position values, for backends that read them: every one a row of the (L, P) tables.
inline void rope_positions(const char* op, int64_t lo, int64_t hi, int64_t L) {
  TORCH_CHECK(lo >= 0 && hi < L, op, ": argument 'positions' must lie in [0, ", L,
              ") (the rows of the cos / sin tables), got values from ", lo, " to ", hi);
}

inline void mean_rope_args(const char* op, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& pos, const c10::optional<at::Tensor>& w,
                           const c10::optional<at::Tensor>& cu) {
  mean_args(op, h, c, w, cu);
  rope(op, h, cos, sin, pos, cu);
}

inline void mean_rope_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h,
                                    const at::Tensor& c, const at::Tensor& cos, const at::Tensor& sin,
                                    const at::Tensor& pos, const c10::optional<at::Tensor>& w,
                                    const c10::optional<at::Tensor>& cu, bool weight_grad) {
  mean_backward_args(op, grad_H, H, h, c, w, cu, weight_grad);
  rope(op, h, cos, sin, pos, cu);
}

inline void causal_rope_args(const char* op, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cos,
                             const at::Tensor& sin, const at::Tensor& pos, int64_t f,
                             const c10::optional<at::Tensor>& cu) {
  causal_args(op, h, c, f, cu);
  rope(op, h, cos, sin, pos, cu);
}

inline void causal_rope_backward_args(const char* op, const at::Tensor& grad_H, const at::Tensor& h,
                                      const at::Tensor& c, const at::Tensor& cos, const at::Tensor& sin,
                                      const at::Tensor& pos, int64_t f, const c10::optional<at::Tensor>& cu) {
  causal_backward_args(op, grad_H, h, c, f, cu);
  rope(op, h, cos, sin, pos, cu);
}

// causal_conv1d: x (B, T, D) floating; weight (D, K) floating with K >= 1; bias (D,) floating or none; all on the
// device of x.
inline void conv_args(const char* op, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  floating(op, "x", x);
  rank(op, "x", x, 3, "(B, T, D)");
  floating(op, "weight", w);
  same_device(op, "weight", w, x, "x");
  rank(op, "weight", w, 2, "(D, K)");
  size_is(op, "weight", w, 0, x.sym_size(2), "the channels D of 'x'");
  TORCH_CHECK(w.sym_size(1) >= 1, op, ": argument 'weight' must have K >= 1 taps, got shape ", w.sym_sizes());
  if (b.has_value()) {
    floating(op, "bias", *b);
    same_device(op, "bias", *b, x, "x");
    rank(op, "bias", *b, 1, "(D,)");
    size_is(op, "bias", *b, 0, x.sym_size(2), "the channels D of 'x'");
  }
}

inline void conv_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w,
                               const c10::optional<at::Tensor>& b) {
  conv_args(op, x, w, b);
  floating(op, "grad_y", grad_y);
  same_device(op, "grad_y", grad_y, x, "x");
  same_shape(op, "grad_y", grad_y, x.sym_sizes(), "the output (B, T, D)");
}

}  // namespace checks
}  // namespace pom_ext
