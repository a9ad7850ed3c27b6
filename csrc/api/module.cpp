// pom_ext::PoM: the computation of the Python layer pom_ext.PoM (pom_ext/layers.py),
// step for step, on the differentiable ops of ops.cpp.
#include "pom_ext/module.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/utils.h>

namespace pom_ext {

namespace F = torch::nn::functional;

// ---- state ----

PoMState PoMState::allocate(int64_t batch_size, int64_t width, at::Device device, at::ScalarType dtype) {
  return PoMState(at::zeros({batch_size, width}, at::TensorOptions().device(device).dtype(dtype)),
                  at::zeros({batch_size}, at::TensorOptions().device(device).dtype(at::kLong)));
}

at::Tensor PoMState::mean() const {
  at::Tensor c = count.to(sum.scalar_type()).unsqueeze(1);
  return at::where(c > 0, sum / c.clamp_min(1), at::zeros_like(sum));
}

PoMState& PoMState::reset_() {
  sum.zero_();
  count.zero_();
  return *this;
}

PoMState PoMState::clone() const { return PoMState(sum.clone(), count.clone()); }

// ---- module ----

namespace {

// Whether the library has a kernel of the fused gated rope op for x's device (the CPU, and CUDA in a CUDA build;
// elsewhere the layer turns its gate itself and runs the unfused path, as the Python layer does).
bool fused_gated_rope_for(const at::Tensor& x) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pom_ext::poly_causal_gated_rope", "");
  return op.hasKernelForDispatchKey(c10::computeDispatchKey(std::nullopt, std::nullopt, x.device()));
}

}  // namespace

PoMImpl::PoMImpl(const PoMOptions& options_) : options(options_) {
  ensure_registered();
  reset();
}

void PoMImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.dim() >= 1, "pom_ext.PoM: argument 'dim' must be an integer >= 1, got ", o.dim());
  TORCH_CHECK(o.degree() >= 1, "pom_ext.PoM: argument 'degree' must be an integer >= 1, got ", o.degree());
  TORCH_CHECK(o.expand() >= 1, "pom_ext.PoM: argument 'expand' must be an integer >= 1, got ", o.expand());
  TORCH_CHECK(o.n_groups() >= 1, "pom_ext.PoM: argument 'n_groups' must be an integer >= 1, got ", o.n_groups());
  TORCH_CHECK(o.n_sel_heads() >= 0, "pom_ext.PoM: argument 'n_sel_heads' must be an integer >= 0, got ",
              o.n_sel_heads());
  TORCH_CHECK(o.dim() % o.n_groups() == 0, "pom_ext.PoM: 'dim' (", o.dim(), ") must be divisible by 'n_groups' (",
              o.n_groups(), ")");
  const int64_t D = o.dim(), E = o.expand() * D;
  TORCH_CHECK(o.n_sel_heads() <= 1 || E % o.n_sel_heads() == 0, "pom_ext.PoM: 'n_sel_heads' (", o.n_sel_heads(),
              ") must divide 'expand' * 'dim' = ", E);
  state_width_ = E;
  gate_width_ = o.n_sel_heads() > 1 ? o.n_sel_heads() : E;
  // Creation and registration order of the Python layer (and of the reference).
  if (o.n_groups() > 1) {
    po_proj = register_module(
        "po_proj", torch::nn::Conv1d(torch::nn::Conv1dOptions(D, E, 1).groups(o.n_groups()).bias(o.bias())));
    se_proj = register_module("se_proj", torch::nn::Linear(torch::nn::LinearOptions(D, gate_width_).bias(true)));
  } else {
    qc_proj = register_module("qc_proj", torch::nn::Linear(torch::nn::LinearOptions(D, E + gate_width_).bias(false)));
    se_bias = register_parameter("se_bias", torch::zeros({gate_width_}));
  }
  po_coeff = register_parameter("po_coeff", torch::randn({E, o.degree()}).clamp(-1e-3, 1e-3));
  ag_proj = register_module("ag_proj", torch::nn::Linear(torch::nn::LinearOptions(E, D).bias(o.bias())));
  if (!has_rope()) return;
  // Rotary positions (pom_ext/rope.py): the reference's checks and float32 tables, computed as it computes them.
  const std::string& r = o.rope();
  TORCH_CHECK(r == "1d" || r == "2d", "pom_ext.PoM: argument 'rope' must be \"\", \"1d\" or \"2d\", got \"", r, "\"");
  const bool two = r == "2d";
  const int64_t split = two ? 4 : 2, G = o.n_sel_heads();
  TORCH_CHECK(E % split == 0, "pom_ext.PoMRoPE: arguments 'expand' * 'dim' = ", E, " must be divisible by ", split,
              " for ", r, " rotary positions");
  if (G > 1) {
    TORCH_CHECK(G % split == 0, "pom_ext.PoMRoPE: argument 'n_sel_heads' (", G, ") must be divisible by ", split,
                " for ", r, " rotary positions (the gates turn in pairs)");
    TORCH_CHECK(E / G >= split, "pom_ext.PoMRoPE: the head width 'expand' * 'dim' / 'n_sel_heads' = ", E / G,
                " must be >= ", split, " for ", r, " rotary positions");
  }
  TORCH_CHECK(o.max_seq_len() >= 1 && o.max_h() >= 1 && o.max_w() >= 1, "pom_ext.PoMRoPE: arguments 'max_seq_len' (",
              o.max_seq_len(), "), 'max_h' (", o.max_h(), ") and 'max_w' (", o.max_w(), ") must be >= 1");
  TORCH_CHECK(o.rope_base() > 0, "pom_ext.PoMRoPE: argument 'rope_base' must be > 0, got ", o.rope_base());
  const auto f32 = torch::TensorOptions().dtype(at::kFloat);
  auto tables = [&](int64_t width, int64_t length) {
    at::Tensor inv = 1.0 / at::pow(o.rope_base(), at::arange(0, width, f32) / static_cast<double>(width));
    at::Tensor angles = at::outer(at::arange(length, f32), inv);
    return std::make_pair(angles.cos(), angles.sin());
  };
  if (two) {
    auto [rc, rs] = tables(E / 4, o.max_h());
    auto [cc, cs] = tables(E / 4, o.max_w());
    row_cos = register_buffer("row_cos", rc);
    row_sin = register_buffer("row_sin", rs);
    col_cos = register_buffer("col_cos", cc);
    col_sin = register_buffer("col_sin", cs);
  } else {
    auto [fc, fs] = tables(E / 2, o.max_seq_len());
    freqs_cos = register_buffer("freqs_cos", fc);
    freqs_sin = register_buffer("freqs_sin", fs);
  }
}

// The rope ops' tables (positions filled in by the caller): 1-D the layer's (max_seq_len, E / 2) tables, 2-D the
// row tables then the column tables; the gate of G > 1 heads reads them at the reference's stride.
Rotation PoMImpl::rope_tables(bool gate) const {
  const int64_t G = options.n_sel_heads(), head = state_width_ / std::max<int64_t>(G, 1);
  auto strided = [&](const at::Tensor& t, int64_t step, int64_t count) {
    return t.slice(1, 0, t.size(1), step).narrow(1, 0, count);
  };
  Rotation r;
  if (options.rope() == "2d") {
    at::Tensor rc = row_cos, rs = row_sin, cc = col_cos, cs = col_sin;
    if (gate && G > 1) {
      rc = strided(rc, head, G / 4), rs = strided(rs, head, G / 4);
      cc = strided(cc, head, G / 4), cs = strided(cs, head, G / 4);
    }
    r.cos = at::cat({rc, cc}, 0);
    r.sin = at::cat({rs, cs}, 0);
  } else if (gate && G > 1) {
    r.cos = strided(freqs_cos, head / 2, G / 2);
    r.sin = strided(freqs_sin, head / 2, G / 2);
  } else {
    r.cos = freqs_cos;
    r.sin = freqs_sin;
  }
  return r;
}

// A user's positions as the rope ops take them ((N, S), (B, N, S) or packed (total, S)), checked against the tables;
// undefined: 0..N-1 (1-D), restarting in every packed sequence.
at::Tensor PoMImpl::rope_positions(const char* arg, const at::Tensor& pos, int64_t B, int64_t N,
                                   const at::Tensor& cu) const {
  const bool two = options.rope() == "2d", packed = cu.defined();
  const at::Device dev = po_coeff.device();
  const int64_t L = options.max_seq_len();
  if (!pos.defined()) {
    TORCH_CHECK(!two, "pom_ext.PoMRoPE: argument '", arg, "' must be given for 2-D rotary positions: (N, 2) or "
                "(B, N, 2) (row, column)");
    if (!packed) {
      TORCH_CHECK(N <= L, "pom_ext.PoMRoPE: argument '", arg, "' must be given, or sequences of at most max_seq_len "
                  "= ", L, " tokens (build the layer with a larger max_seq_len), got a sequence of ", N, " tokens");
      return at::arange(N, at::TensorOptions().device(dev).dtype(at::kLong)).unsqueeze(1);
    }
    const at::Tensor c = cu.to(at::kLong);
    const at::Tensor lengths = c.narrow(0, 1, c.size(0) - 1) - c.narrow(0, 0, c.size(0) - 1);
    if (lengths.numel() && dev.is_cpu()) {
      const int64_t longest = lengths.max().item<int64_t>();
      TORCH_CHECK(longest <= L, "pom_ext.PoMRoPE: argument '", arg, "' must be given, or sequences of at most "
                  "max_seq_len = ", L, " tokens, got a sequence of ", longest, " tokens");
    }
    const at::Tensor starts = c.narrow(0, 0, c.size(0) - 1).repeat_interleave(lengths, 0, N);
    return (at::arange(N, c.options()) - starts).unsqueeze(1);
  }
  TORCH_CHECK(!pos.is_floating_point() && !pos.is_complex() && pos.scalar_type() != at::kBool,
              "pom_ext.PoMRoPE: argument '", arg, "' must be an integer tensor, got ", pos.scalar_type());
  TORCH_CHECK(pos.device() == dev, "pom_ext.PoMRoPE: argument '", arg, "' must be on ", dev, " like the input, got ",
              pos.device());
  const int64_t lead = two ? 1 : 0;  // trailing (row, column) dim of 2-D positions
  const bool ok = pos.dim() >= 1 + lead && (!two || pos.size(-1) == 2) && pos.size(-1 - lead) == N &&
                  (pos.dim() == 1 + lead || (pos.dim() == 2 + lead && !packed && pos.size(0) == B));
  TORCH_CHECK(ok, "pom_ext.PoMRoPE: argument '", arg, "' must be ",
              two ? (packed ? "(total, 2)" : "(N, 2) or (B, N, 2)") : (packed ? "(total,)" : "(N,) or (B, N)"),
              " with N = ", N, " tokens", packed ? "" : " and B = " + std::to_string(B), ", got shape ", pos.sizes());
  at::Tensor p = pos.to(at::kLong);
  if (p.numel() && dev.is_cpu()) {
    if (two) {
      const at::Tensor rows = p.select(-1, 0), cols = p.select(-1, 1);
      TORCH_CHECK(rows.min().item<int64_t>() >= 0 && cols.min().item<int64_t>() >= 0 &&
                  rows.max().item<int64_t>() < options.max_h() && cols.max().item<int64_t>() < options.max_w(),
                  "pom_ext.PoMRoPE: argument '", arg, "' must hold rows in [0, max_h = ", options.max_h(),
                  ") and columns in [0, max_w = ", options.max_w(), ") (build the layer with larger max_h / max_w)");
    } else {
      const int64_t lo = p.min().item<int64_t>(), hi = p.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < L, "pom_ext.PoMRoPE: argument '", arg, "' must be in [0, max_seq_len = ", L,
                  ") (build the layer with a larger max_seq_len), got values ", lo, "..", hi);
    }
  }
  if (two) return at::stack({p.select(-1, 0), p.select(-1, 1) + row_cos.size(0)}, -1);
  return p.unsqueeze(-1);
}

at::Tensor PoMImpl::turn_gate(const at::Tensor& s, const at::Tensor& pos) const {
  const Rotation r = rope_tables(/*gate=*/true);
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return rotate(s.to(acc), r.cos, r.sin, pos).to(s.scalar_type());
}

void PoMImpl::pretty_print(std::ostream& stream) const {
  stream << "pom_ext::PoM(dim=" << options.dim() << ", degree=" << options.degree() << ", expand=" << options.expand()
         << ", n_groups=" << options.n_groups() << ", n_sel_heads=" << options.n_sel_heads()
         << ", bias=" << (options.bias() ? "true" : "false");
  if (has_rope()) {
    stream << ", rope=" << options.rope();
    if (options.rope() == "2d") {
      stream << ", max_h=" << options.max_h() << ", max_w=" << options.max_w();
    } else {
      stream << ", max_seq_len=" << options.max_seq_len();
    }
  }
  stream << ")";
}

void PoMImpl::check_x(const char* name, const at::Tensor& x, bool packed) const {
  TORCH_CHECK(x.defined(), "pom_ext.PoM: argument '", name, "' must be a tensor, got an undefined tensor");
  const int64_t want = packed ? 2 : 3;
  const char* layout = packed ? "(total, D)" : (std::string(name) == "xc" ? "(B, N, D)" : "(B, T, D)");
  TORCH_CHECK(x.dim() == want && x.size(-1) == options.dim(), "pom_ext.PoM: argument '", name, "' must be a ", want,
              "-D tensor ", layout, " with D = ", options.dim(), ", got shape ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), "pom_ext.PoM: argument '", name, "' must be floating point, got ",
              x.scalar_type());
  const at::Tensor& param = po_coeff;
  TORCH_CHECK(x.device() == param.device(), "pom_ext.PoM: argument '", name, "' is on ", x.device(),
              " but the layer's parameters are on ", param.device(), "; move both to one device");
  TORCH_CHECK(x.scalar_type() == param.scalar_type() || at::autocast::is_autocast_enabled(x.device().type()),
              "pom_ext.PoM: argument '", name, "' is ", x.scalar_type(), " but the layer's parameters are ",
              param.scalar_type(), "; convert one of them (or run under autocast)");
}

at::Tensor PoMImpl::context(const at::Tensor& xc) {
  const int64_t E = state_width_;
  if (options.n_groups() > 1) {
    const int64_t g = options.n_groups(), D = options.dim();
    at::Tensor w = po_proj->weight.view({g, E / g, D / g});
    at::Tensor h = at::einsum("...gd,ged->...ge", {xc.unflatten(-1, {g, D / g}), w}).flatten(-2);
    return po_proj->bias.defined() ? h + po_proj->bias : h;
  }
  return F::linear(xc, qc_proj->weight.narrow(0, 0, E));
}

at::Tensor PoMImpl::gate(const at::Tensor& xq) {
  if (options.n_groups() > 1) return at::hardsigmoid(se_proj->forward(xq));
  return at::hardsigmoid(F::linear(xq, qc_proj->weight.narrow(0, state_width_, gate_width_)) + se_bias);
}

std::tuple<at::Tensor, at::Tensor> PoMImpl::project(const at::Tensor& xq, const at::Tensor& xc) {
  if (!xc.defined() && options.n_groups() == 1) {
    // One GEMM for context and gate; h is a strided view.
    at::Tensor z = F::linear(xq, qc_proj->weight);
    const int64_t E = state_width_;
    return {z.narrow(-1, 0, E), at::hardsigmoid(z.narrow(-1, E, gate_width_) + se_bias)};
  }
  return {context(xc.defined() ? xc : xq), gate(xq)};
}

// ag_proj(select(s, H)) for H (B, E) shared by all T queries of s (B, T, S) (SPEC §3).
at::Tensor PoMImpl::out_shared(const at::Tensor& s, const at::Tensor& H_) {
  const at::Tensor& W = ag_proj->weight;
  const at::Tensor& b = ag_proj->bias;
  const int64_t B = s.size(0), T = s.size(1);
  const int64_t G = options.n_sel_heads(), E = state_width_, D = options.dim();
  at::Tensor H = H_.to(s.scalar_type());
  at::Tensor out;
  if (G > 1) {
    // Gamma_g = sum_{e in g} W[:, e] H[e]: out = s @ Gamma^T.
    at::Tensor gamma = at::einsum("dgj,bgj->bgd", {W.view({D, G, E / G}), H.view({B, G, E / G})});
    out = at::bmm(s, gamma);
  } else if (T > D) {
    // W diag(H) applied to s: y = s * H is never formed.
    out = at::bmm(s, (W.unsqueeze(0) * H.unsqueeze(1)).transpose(1, 2));
  } else {
    return F::linear(s * H.unsqueeze(1), W, b);
  }
  return b.defined() ? out + b : out;
}

at::Tensor PoMImpl::forward(const at::Tensor& xq, const at::Tensor& xc_in, const Mask& mask,
                            const at::Tensor& cu_seqlens, const at::Tensor& positions,
                            const at::Tensor& ctx_positions) {
  const bool packed = cu_seqlens.defined();
  check_x("xq", xq, packed);
  at::Tensor xc = xc_in;
  if (xc.defined() && xc.is_same(xq)) xc = at::Tensor();
  if (xc.defined()) {
    check_x("xc", xc, packed);
    TORCH_CHECK(xc.size(0) == xq.size(0), "pom_ext.PoM: 'xc' and 'xq' must have the same ",
                packed ? "packed tokens" : "batch size", ", got ", xc.size(0), " and ", xq.size(0));
  }
  if (mask.is_causal() && !packed) {
    const int64_t n = xc.defined() ? xc.size(1) : xq.size(1);
    TORCH_CHECK(xq.size(1) == n, "pom_ext.PoM: with mask='causal', argument 'xq' must have as many tokens as 'xc', "
                "got T = ", xq.size(1), " and N = ", n);
  }
  if (mask.is_tensor() && mask.tensor().dim() == 3 && !packed) {
    const at::Tensor& m = mask.tensor();
    const int64_t B = xq.size(0), T = xq.size(1), N = xc.defined() ? xc.size(1) : T;
    TORCH_CHECK(m.size(0) == B && m.size(1) == T && m.size(2) == N, "pom_ext.PoM: argument 'mask' must be (B, T, N) "
                "= (", B, ", ", T, ", ", N, ") for a (B, T, N) mask (T query tokens of 'xq', N context tokens), got "
                "shape ", m.sizes());
  }
  TORCH_CHECK(has_rope() || (!positions.defined() && !ctx_positions.defined()),
              "pom_ext.PoM: arguments 'positions' / 'ctx_positions' apply to rotary layers (PoMOptions.rope)");
  if (has_rope() && mask.is_causal() && !xc.defined() && !ctx_positions.defined() && fused_gated_rope_for(xq)) {
    // Causal self-mixing at one set of positions: the fused gated rope op (h and the gate read once, turned inside
    // the op, y written once), as the Python layer does.
    const int64_t B = packed ? 0 : xq.size(0), T = packed ? xq.size(0) : xq.size(1);
    const Rotation rot = rope_tables(/*gate=*/false), gate_rot = rope_tables(/*gate=*/true);
    const at::Tensor pos = rope_positions("positions", positions, B, T, cu_seqlens);
    at::Tensor hs;
    ops::OptTensor bias;
    if (options.n_groups() == 1) {
      hs = F::linear(xq, qc_proj->weight);
      bias = se_bias;
    } else {
      hs = at::cat({context(xq), se_proj->forward(xq)}, -1);  // the gate's bias inside its projection
    }
    return ag_proj->forward(poly_causal_gated_rope(hs, po_coeff, bias, rot.cos, rot.sin, gate_rot.cos, gate_rot.sin,
                                                   pos, mask.block_size(),
                                                   cu_seqlens.defined() ? ops::OptTensor(cu_seqlens)
                                                                        : ops::OptTensor()));
  }
  auto [h, s] = project(xq, xc);
  Rotation rot;
  if (has_rope()) {
    const int64_t B = packed ? 0 : xq.size(0), T = packed ? xq.size(0) : xq.size(1);
    const int64_t N = xc.defined() ? (packed ? xc.size(0) : xc.size(1)) : T;
    // Self-mixing: one set of positions for context and queries unless ctx_positions is given.
    const bool shared = !xc.defined() && !ctx_positions.defined();
    rot = rope_tables(/*gate=*/false);
    rot.positions = rope_positions(shared ? "positions" : "ctx_positions", shared ? positions : ctx_positions, B, N,
                                   cu_seqlens);
    s = turn_gate(s, shared ? rot.positions : rope_positions("positions", positions, B, T, cu_seqlens));
  }
  if (!packed && (mask.is_none() || (mask.is_tensor() && mask.tensor().dim() == 2)))
    return out_shared(s, aggregate(h, po_coeff, mask, {}, rot).select(1, 0));
  at::Tensor H = aggregate(h, po_coeff, mask, cu_seqlens, rot);
  if (packed && mask.is_none()) {
    at::Tensor lengths = (cu_seqlens.narrow(0, 1, cu_seqlens.size(0) - 1) -
                          cu_seqlens.narrow(0, 0, cu_seqlens.size(0) - 1)).to(at::kLong);
    H = H.repeat_interleave(lengths, 0, h.size(0));
  }
  return ag_proj->forward(select(s, H, options.n_sel_heads()));
}

PoMState PoMImpl::allocate_state(int64_t batch_size, std::optional<at::Device> device,
                                 std::optional<at::ScalarType> dtype) const {
  TORCH_CHECK(batch_size >= 0, "pom_ext.PoM: argument 'batch_size' must be >= 0, got ", batch_size);
  const at::ScalarType sum_dtype = dtype.value_or(po_coeff.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  TORCH_CHECK(sum_dtype == at::kFloat || sum_dtype == at::kDouble,
              "pom_ext.PoM: argument 'dtype' of the state must be float32 or float64, got ", sum_dtype);
  return PoMState::allocate(batch_size, state_width_, device.value_or(po_coeff.device()), sum_dtype);
}

namespace {

void check_state(const PoMState& st, int64_t B, int64_t E, const at::Tensor& x) {
  TORCH_CHECK(st.sum.defined() && st.count.defined(),
              "pom_ext.PoM: argument 'state' is empty; create it with allocate_state(batch_size)");
  TORCH_CHECK(st.sum.dim() == 2 && st.sum.size(0) == B && st.sum.size(1) == E, "pom_ext.PoM: argument 'state' "
              "holds a sum of shape ", st.sum.sizes(), ", expected (B, E) = (", B, ", ", E, ")");
  TORCH_CHECK(st.sum.scalar_type() == at::kFloat || st.sum.scalar_type() == at::kDouble,
              "pom_ext.PoM: the state sum must be float32 (or float64), got ", st.sum.scalar_type());
  TORCH_CHECK(st.count.dim() == 1 && st.count.size(0) == B && st.count.scalar_type() == at::kLong,
              "pom_ext.PoM: the state count must be an int64 tensor of shape (B,) = (", B, ",), got shape ",
              st.count.sizes(), ", ", st.count.scalar_type());
  TORCH_CHECK(st.sum.device() == x.device() && st.count.device() == x.device(), "pom_ext.PoM: the state must be on ",
              x.device(), " like the input, got ", st.sum.device());
  // Counts are read where that costs no device synchronization.
  if (st.count.device().is_cpu()) {
    TORCH_CHECK(!(st.count < 0).any().item<bool>(), "pom_ext.PoM: the state count must be >= 0, got ",
                st.count.min().item<int64_t>());
  }
}

}  // namespace

// Rotary layers: the positions of an appended chunk, given or (1-D) count + 0..T-1 per batch row.
at::Tensor PoMImpl::chunk_positions(const PoMState& st, const at::Tensor& x, const at::Tensor& positions) const {
  const int64_t B = x.size(0), T = x.size(1);
  if (positions.defined() || options.rope() == "2d") return rope_positions("positions", positions, B, T, {});
  return rope_positions("positions", st.count.unsqueeze(1) + at::arange(T, st.count.options()), B, T, {});
}

// (H, new_sum): the chunk's rotated features added to the running sum, in the state's dtype.
std::tuple<at::Tensor, at::Tensor> PoMImpl::append_rotated(const at::Tensor& h, const PoMState& st,
                                                           const at::Tensor& pos) {
  const int64_t T = h.size(1);
  const bool wide = h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble;
  const Rotation r = rope_tables(/*gate=*/false);
  at::Tensor chunk = poly_mean_rope(wide ? h : h.to(at::kFloat), po_coeff, r.cos, r.sin, pos).to(st.sum.scalar_type());
  at::Tensor new_sum = st.sum + chunk * static_cast<double>(T);
  at::Tensor cnt = (st.count + T).to(new_sum.scalar_type()).unsqueeze(1);
  return {at::where(cnt > 0, new_sum / cnt.clamp_min(1), at::zeros_like(new_sum)), new_sum};
}

std::tuple<at::Tensor, PoMState> PoMImpl::state_forward(const at::Tensor& xq, const at::Tensor& xc,
                                                        const PoMState& state, const at::Tensor& positions) {
  check_x("xq", xq, false);
  if (xc.defined()) check_x("xc", xc, false);
  const PoMState st = state.sum.defined() ? state : allocate_state(xq.size(0), xq.device());
  check_state(st, xq.size(0), state_width_, xq);
  TORCH_CHECK(has_rope() || !positions.defined(), "pom_ext.PoM: argument 'positions' applies to rotary layers");
  auto [h, s] = project(xq, xc);
  if (has_rope()) {
    TORCH_CHECK(!xc.defined() || (xc.size(0) == xq.size(0) && xc.size(1) == xq.size(1)), "pom_ext.PoMRoPE: argument "
                "'xc' must be (B, T, D) like 'xq' (the chunk's context and queries share positions), got shape ",
                xc.sizes());
    const at::Tensor pos = chunk_positions(st, xq, positions);
    auto [H, new_sum] = append_rotated(h, st, pos);
    return {out_shared(turn_gate(s, pos), H), PoMState(new_sum, st.count + xq.size(1))};
  }
  auto [H, new_sum, new_count] = poly_state_update(h, po_coeff, st.sum, st.count);
  return {out_shared(s, H), PoMState(new_sum, new_count)};
}

at::Tensor PoMImpl::step(const at::Tensor& x, PoMState& state, const at::Tensor& positions) {
  check_x("x", x, false);
  check_state(state, x.size(0), state_width_, x);
  TORCH_CHECK(has_rope() || !positions.defined(), "pom_ext.PoM: argument 'positions' applies to rotary layers");
  auto [h, s] = project(x);
  at::Tensor H;
  if (has_rope()) {
    const at::Tensor pos = chunk_positions(state, x, positions);
    at::Tensor new_sum;
    std::tie(H, new_sum) = append_rotated(h, state, pos);
    if (at::GradMode::is_enabled() && new_sum.requires_grad()) {
      state.sum = new_sum;
      state.count = state.count + x.size(1);
    } else {
      state.sum.copy_(new_sum);
      state.count.add_(x.size(1));
    }
    return out_shared(turn_gate(s, pos), H);
  }
  if (at::GradMode::is_enabled() && (h.requires_grad() || state.sum.requires_grad())) {
    std::tie(H, state.sum, state.count) = poly_state_update(h, po_coeff, state.sum, state.count);
  } else {
    H = ops::poly_state_step_(h, po_coeff, state.sum, state.count);
  }
  return out_shared(s, H);
}

}  // namespace pom_ext
