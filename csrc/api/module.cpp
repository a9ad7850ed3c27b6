// pom_ext::PoM: the computation of the Python layer pom_ext.PoM (pom_ext/layers.py),
// step for step, on the differentiable ops of ops.cpp.
#include "pom_ext/module.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
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
              ") must divide expand * dim = ", E);
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
}

void PoMImpl::pretty_print(std::ostream& stream) const {
  stream << "pom_ext::PoM(dim=" << options.dim() << ", degree=" << options.degree() << ", expand=" << options.expand()
         << ", n_groups=" << options.n_groups() << ", n_sel_heads=" << options.n_sel_heads()
         << ", bias=" << (options.bias() ? "true" : "false") << ")";
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
                            const at::Tensor& cu_seqlens) {
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
  auto [h, s] = project(xq, xc);
  if (!packed && (mask.is_none() || (mask.is_tensor() && mask.tensor().dim() == 2)))
    return out_shared(s, aggregate(h, po_coeff, mask).select(1, 0));
  at::Tensor H = aggregate(h, po_coeff, mask, cu_seqlens);
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

std::tuple<at::Tensor, PoMState> PoMImpl::state_forward(const at::Tensor& xq, const at::Tensor& xc,
                                                        const PoMState& state) {
  check_x("xq", xq, false);
  if (xc.defined()) check_x("xc", xc, false);
  const PoMState st = state.sum.defined() ? state : allocate_state(xq.size(0), xq.device());
  check_state(st, xq.size(0), state_width_, xq);
  auto [h, s] = project(xq, xc);
  auto [H, new_sum, new_count] = poly_state_update(h, po_coeff, st.sum, st.count);
  return {out_shared(s, H), PoMState(new_sum, new_count)};
}

at::Tensor PoMImpl::step(const at::Tensor& x, PoMState& state) {
  check_x("x", x, false);
  check_state(state, x.size(0), state_width_, x);
  auto [h, s] = project(x);
  at::Tensor H;
  if (at::GradMode::is_enabled() && (h.requires_grad() || state.sum.requires_grad())) {
    std::tie(H, state.sum, state.count) = poly_state_update(h, po_coeff, state.sum, state.count);
  } else {
    H = ops::poly_state_step_(h, po_coeff, state.sum, state.count);
  }
  return out_shared(s, H);
}

}  // namespace pom_ext
