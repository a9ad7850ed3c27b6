// pom_ext::PoM, the Polynomial Mixer as a torch::nn module (SPEC §1), and its
// constant-memory recurrent state (SPEC §2).
//
// Parameter names, shapes and registration order are those of the Python layer
// pom_ext.PoM, so state dicts map 1:1:
//   n_groups == 1: qc_proj.weight (E + S, D), se_bias (S,)
//   n_groups  > 1: po_proj.weight (E, D / n_groups, 1) [po_proj.bias (E,)], se_proj.weight (S, D), se_proj.bias (S,)
//   always:        po_coeff (E, K), ag_proj.weight (D, E) [ag_proj.bias (D,)]
// with E = expand * dim and S = n_sel_heads if n_sel_heads > 1, else E. With rotary positions (rope "1d" / "2d",
// the Python layer pom_ext.PoMRoPE) also the buffers freqs_cos, freqs_sin (max_seq_len, E / 2), or row_cos,
// row_sin (max_h, E / 4) and col_cos, col_sin (max_w, E / 4).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <optional>
#include <ostream>
#include <string>
#include <tuple>

#include "pom_ext/export.h"
#include "pom_ext/ops.h"

namespace pom_ext {

// PoMOptions(dim, degree, expand).n_groups(g).n_sel_heads(G).bias(b), as the Python
// constructor PoM(dim, degree, expand, n_groups=1, n_sel_heads=1, bias=False).
// .rope("1d") / .rope("2d") with .max_seq_len, .max_h, .max_w, .rope_base: rotary positions, as the Python
// PoMRoPE(dim, degree, expand, n_groups, n_sel_heads, bias, max_seq_len, max_h, max_w, rope_base, rope_2d).
struct POM_EXT_API PoMOptions {
  PoMOptions(int64_t dim, int64_t degree, int64_t expand) : dim_(dim), degree_(degree), expand_(expand) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, degree);
  TORCH_ARG(int64_t, expand);
  TORCH_ARG(int64_t, n_groups) = 1;
  TORCH_ARG(int64_t, n_sel_heads) = 1;
  TORCH_ARG(bool, bias) = false;
  TORCH_ARG(std::string, rope) = "";  // "" (none), "1d" or "2d"
  TORCH_ARG(int64_t, max_seq_len) = 4096;
  TORCH_ARG(int64_t, max_h) = 64;
  TORCH_ARG(int64_t, max_w) = 64;
  TORCH_ARG(double, rope_base) = 10000.0;
};

// Recurrent state of one layer: running sum (B, E) fp32 (fp64 for a float64 layer) and token count (B,) int64.
struct POM_EXT_API PoMState {
  at::Tensor sum;
  at::Tensor count;

  PoMState() = default;
  PoMState(at::Tensor sum_, at::Tensor count_) : sum(std::move(sum_)), count(std::move(count_)) {}
  static PoMState allocate(int64_t batch_size, int64_t width, at::Device device = at::kCPU,
                           at::ScalarType dtype = at::kFloat);
  // H = sum / count, 0 where count == 0: (B, E).
  at::Tensor mean() const;
  PoMState& reset_();
  PoMState clone() const;
  int64_t batch_size() const { return sum.size(0); }
};

class POM_EXT_API PoMImpl : public torch::nn::Cloneable<PoMImpl> {
 public:
  PoMImpl(int64_t dim, int64_t degree, int64_t expand) : PoMImpl(PoMOptions(dim, degree, expand)) {}
  explicit PoMImpl(const PoMOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // xq (B, T, D), xc (B, N, D) or undefined (self-mixing) -> (B, T, D).
  // mask: none, "causal" / Mask::causal(F), (B, N) weights, (B, T, N). Packed sequences:
  // xq (total, D) [xc (total, D)] with cu_seqlens (B + 1,) and mask none or causal.
  // Rotary layers: positions of the queries and ctx_positions of the context, 1-D (T,) / (B, T) integers (default
  // 0..T-1, restarting in every packed sequence; self-mixing: one set), 2-D (T, 2) / (B, T, 2) (row, column),
  // required; every value must index the tables (0 <= pos < max_seq_len; rows < max_h, columns < max_w).
  at::Tensor forward(const at::Tensor& xq, const at::Tensor& xc = {}, const Mask& mask = {},
                     const at::Tensor& cu_seqlens = {}, const at::Tensor& positions = {},
                     const at::Tensor& ctx_positions = {});

  // (h (B, N, E), s (B, T, S)): the context projection and the gate hardsigmoid(.).
  std::tuple<at::Tensor, at::Tensor> project(const at::Tensor& xq, const at::Tensor& xc = {});

  // A zero state for step(), on the layer's device unless given; its sum is float64 for a float64 layer, else
  // float32, unless a dtype is given.
  PoMState allocate_state(int64_t batch_size, std::optional<at::Device> device = std::nullopt,
                          std::optional<at::ScalarType> dtype = std::nullopt) const;

  // Appends a chunk (every token sees the state including the whole chunk) and reads it;
  // the state is not modified, autograd flows through it. Returns (out (B, T, D), new state).
  // An empty state (the default) starts from nothing; xc undefined: self-mixing.
  // Rotary layers: the chunk at `positions` (default, 1-D: the state's count onwards; 2-D: required).
  std::tuple<at::Tensor, PoMState> state_forward(const at::Tensor& xq, const at::Tensor& xc = {},
                                                 const PoMState& state = {}, const at::Tensor& positions = {});

  // Decoding: x (B, T, D) (usually T = 1) appended to `state`, updated in place (without
  // autograd; when gradients are recorded the state's tensors are replaced instead).
  at::Tensor step(const at::Tensor& x, PoMState& state, const at::Tensor& positions = {});

  int64_t state_width() const { return state_width_; }
  int64_t gate_width() const { return gate_width_; }

  PoMOptions options;

  // n_groups == 1
  torch::nn::Linear qc_proj{nullptr};
  at::Tensor se_bias;
  // n_groups > 1
  torch::nn::Conv1d po_proj{nullptr};
  torch::nn::Linear se_proj{nullptr};
  // always
  at::Tensor po_coeff;
  torch::nn::Linear ag_proj{nullptr};
  // rotary tables (rope "1d": freqs_*; "2d": row_*, col_*)
  at::Tensor freqs_cos, freqs_sin, row_cos, row_sin, col_cos, col_sin;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(at::Tensor())}, {2, torch::nn::AnyValue(Mask())},
                           {3, torch::nn::AnyValue(at::Tensor())}, {4, torch::nn::AnyValue(at::Tensor())},
                           {5, torch::nn::AnyValue(at::Tensor())})

 private:
  void check_x(const char* name, const at::Tensor& x, bool packed) const;
  at::Tensor context(const at::Tensor& xc);
  at::Tensor gate(const at::Tensor& xq);
  at::Tensor out_shared(const at::Tensor& s, const at::Tensor& H);
  bool has_rope() const { return !options.rope().empty(); }
  Rotation rope_tables(bool gate) const;
  at::Tensor rope_positions(const char* arg, const at::Tensor& pos, int64_t B, int64_t N,
                            const at::Tensor& cu_seqlens) const;
  at::Tensor turn_gate(const at::Tensor& s, const at::Tensor& pos) const;
  at::Tensor chunk_positions(const PoMState& st, const at::Tensor& x, const at::Tensor& positions) const;
  std::tuple<at::Tensor, at::Tensor> append_rotated(const at::Tensor& h, const PoMState& st, const at::Tensor& pos);

  int64_t state_width_ = 0;
  int64_t gate_width_ = 0;
};

TORCH_MODULE(PoM);

}  // namespace pom_ext
