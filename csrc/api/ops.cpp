// C++ entry points of the pom_ext ops: dispatcher calls (whichever backend the inputs
// live on), their autograd (the formulas of pom_ext/ops.py, backward passes being ops
// too), aggregation by mask and selection (the formulas of pom_ext/functional.py).
#include "pom_ext/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>

#include "pom_ext/version.h"

namespace pom_ext {

using ops::OptTensor;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

const char* ensure_registered() {
  static const bool found = [] {
    for (const char* name : {"pom_ext::poly_eval", "pom_ext::poly_mean", "pom_ext::poly_causal",
                             "pom_ext::poly_state_update", "pom_ext::poly_state_step_"}) {
      TORCH_CHECK(c10::Dispatcher::singleton().findSchema({name, ""}).has_value(), "pom_ext: the op ", name,
                  " is not registered; the library libpom_ext was not loaded (link it with --no-as-needed, "
                  "or use the CMake target pom_ext::pom_ext which does)");
    }
    return true;
  }();
  (void)found;
  return POM_EXT_VERSION;
}

// ---- dispatcher calls ----

namespace ops {

at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff) {
  static auto o = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("pom_ext::poly_eval");
  return o.call(h, coeff);
}

T2 poly_eval_backward(const at::Tensor& grad_p, const at::Tensor& h, const at::Tensor& coeff) {
  static auto o = op<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("pom_ext::poly_eval_backward");
  return o.call(grad_p, h, coeff);
}

at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const OptTensor& weight,
                     const OptTensor& cu_seqlens) {
  static auto o = op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&)>(
      "pom_ext::poly_mean");
  return o.call(h, coeff, weight, cu_seqlens);
}

T3 poly_mean_backward(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
                      const OptTensor& weight, const OptTensor& cu_seqlens, bool weight_grad) {
  static auto o = op<T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptTensor&, const OptTensor&, bool)>("pom_ext::poly_mean_backward");
  return o.call(grad_H, H, h, coeff, weight, cu_seqlens, weight_grad);
}

at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                       const OptTensor& cu_seqlens) {
  static auto o =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>("pom_ext::poly_causal");
  return o.call(h, coeff, block_size, cu_seqlens);
}

T2 poly_causal_backward(const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                        const OptTensor& cu_seqlens) {
  static auto o = op<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>(
      "pom_ext::poly_causal_backward");
  return o.call(grad_H, h, coeff, block_size, cu_seqlens);
}

T3 poly_state_update(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum,
                     const at::Tensor& count) {
  static auto o = op<T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "pom_ext::poly_state_update");
  return o.call(h, coeff, state_sum, count);
}

T3 poly_state_update_backward(const at::Tensor& grad_H, const at::Tensor& grad_state_sum, const at::Tensor& h,
                              const at::Tensor& coeff, const at::Tensor& count) {
  static auto o = op<T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&)>("pom_ext::poly_state_update_backward");
  return o.call(grad_H, grad_state_sum, h, coeff, count);
}

at::Tensor poly_state_step_(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum, at::Tensor& count) {
  static auto o =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&)>("pom_ext::poly_state_step_");
  return o.call(h, coeff, state_sum, count);
}

}  // namespace ops

// ---- autograd ----

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor as_opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

struct PolyEvalFn : torch::autograd::Function<PolyEvalFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& coeff) {
    ctx->save_for_backward({h, coeff});
    return ops::poly_eval(h, coeff);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [gh, gc] = ops::poly_eval_backward(grads[0], saved[0], saved[1]);
    return {gh, gc};
  }
};

struct PolyMeanFn : torch::autograd::Function<PolyMeanFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& coeff,
                            const OptTensor& weight, const OptTensor& cu_seqlens) {
    at::Tensor H = ops::poly_mean(h, coeff, weight, cu_seqlens);
    ctx->save_for_backward({h, coeff, or_undefined(weight), or_undefined(cu_seqlens), H});
    return H;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[2];
    const bool weight_grad = weight.defined() && ctx->needs_input_grad(2);
    auto [gh, gc, gw] = ops::poly_mean_backward(grads[0], saved[4], saved[0], saved[1], as_opt(weight),
                                                as_opt(saved[3]), weight_grad);
    return {gh, gc, weight_grad ? gw : at::Tensor(), at::Tensor()};
  }
};

struct PolyCausalFn : torch::autograd::Function<PolyCausalFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                            const OptTensor& cu_seqlens) {
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({h, coeff, or_undefined(cu_seqlens)});
    return ops::poly_causal(h, coeff, block_size, cu_seqlens);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [gh, gc] = ops::poly_causal_backward(grads[0], saved[0], saved[1], ctx->saved_data["block_size"].toInt(),
                                              as_opt(saved[2]));
    return {gh, gc, at::Tensor(), at::Tensor()};
  }
};

struct PolyStateUpdateFn : torch::autograd::Function<PolyStateUpdateFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& coeff,
                               const at::Tensor& state_sum, const at::Tensor& count) {
    auto [H, new_sum, new_count] = ops::poly_state_update(h, coeff, state_sum, count);
    ctx->save_for_backward({h, coeff, count});
    ctx->mark_non_differentiable({new_count});
    return {H, new_sum, new_count};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    // Gradients of unused outputs arrive as zeros (materialized grads).
    auto [gh, gc, gs] = ops::poly_state_update_backward(grads[0], grads[1], saved[0], saved[1], saved[2]);
    return {gh, gc, gs, at::Tensor()};
  }
};

}  // namespace

at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff) { return PolyEvalFn::apply(h, coeff); }

at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const OptTensor& weight,
                     const OptTensor& cu_seqlens) {
  return PolyMeanFn::apply(h, coeff, weight, cu_seqlens);
}

at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                       const OptTensor& cu_seqlens) {
  return PolyCausalFn::apply(h, coeff, block_size, cu_seqlens);
}

T3 poly_state_update(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum,
                     const at::Tensor& count) {
  auto out = PolyStateUpdateFn::apply(h, coeff, state_sum, count);
  return {out[0], out[1], out[2]};
}

// ---- masks, aggregation, selection ----

Mask::Mask(at::Tensor mask) : kind_(mask.defined() ? Kind::Tensor : Kind::None), tensor_(std::move(mask)) {}

Mask::Mask(const char* name) : Mask(std::string(name ? name : "")) {}

Mask::Mask(const std::string& name) : kind_(Kind::Causal) {
  TORCH_CHECK(name == "causal", "pom_ext: argument 'mask' must be none, \"causal\", a (B, N) or a (B, T, N) tensor, "
              "got the string \"", name, "\"");
}

Mask Mask::causal(int64_t block_size) {
  TORCH_CHECK(block_size >= 1, "pom_ext: argument 'block_size' must be an integer >= 1, got ", block_size);
  Mask m;
  m.kind_ = Kind::Causal;
  m.block_size_ = block_size;
  return m;
}

std::string Mask::repr() const {
  switch (kind_) {
    case Kind::None: return "none";
    case Kind::Causal: return "causal(block_size=" + std::to_string(block_size_) + ")";
    default: return "a tensor of shape " + c10::str(tensor_.sizes());
  }
}

namespace {

void check_cu_seqlens(const at::Tensor& cu, int64_t total, const at::Tensor& h) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, "pom_ext: argument 'cu_seqlens' must be a 1-D tensor (B + 1,) of "
              "offsets, got shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
              "pom_ext: argument 'cu_seqlens' must be int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == h.device(), "pom_ext: argument 'cu_seqlens' must be on ", h.device(), " like the input, "
              "got ", cu.device());
  if (cu.device().is_cpu()) {
    const at::Tensor c = cu.to(at::kLong).contiguous();
    const int64_t* v = c.data_ptr<int64_t>();
    bool ok = v[0] == 0 && v[c.numel() - 1] == total;
    for (int64_t i = 1; i < c.numel(); ++i) ok = ok && v[i] >= v[i - 1];
    TORCH_CHECK(ok, "pom_ext: argument 'cu_seqlens' must hold non-decreasing offsets from 0 to ", total,
                " (the number of packed tokens), got ", c);
  }
}

}  // namespace

at::Tensor aggregate(const at::Tensor& h, const at::Tensor& coeff, const Mask& mask, const at::Tensor& cu_seqlens) {
  const bool packed = cu_seqlens.defined();
  TORCH_CHECK(h.defined() && h.is_floating_point(), "pom_ext: argument 'h' must be a floating-point tensor");
  TORCH_CHECK(h.dim() == (packed ? 2 : 3), "pom_ext: argument 'h' must be ",
              packed ? "a 2-D tensor (total, E) with cu_seqlens" : "a 3-D tensor (B, N, E)", ", got shape ",
              h.sizes());
  TORCH_CHECK(coeff.dim() == 2 && coeff.size(0) == h.size(-1) && coeff.size(1) >= 1,
              "pom_ext: argument 'coeff' must be (E, K) with E = ", h.size(-1), " (the width of h) and K >= 1, got "
              "shape ", coeff.sizes());
  if (packed) {
    check_cu_seqlens(cu_seqlens, h.size(0), h);
    if (mask.is_none()) return poly_mean(h, coeff, std::nullopt, cu_seqlens);
    TORCH_CHECK(mask.is_causal(), "pom_ext: argument 'mask' must be none or causal when cu_seqlens is given, got ",
                mask.repr());
    return poly_causal(h, coeff, mask.block_size(), cu_seqlens);
  }
  const int64_t B = h.size(0), N = h.size(1);
  if (mask.is_none()) return poly_mean(h, coeff).unsqueeze(1);
  if (mask.is_causal()) return poly_causal(h, coeff, mask.block_size());
  const at::Tensor& m = mask.tensor();
  TORCH_CHECK(m.device() == h.device(), "pom_ext: argument 'mask' must be on ", h.device(), " like the input, got ",
              m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.is_floating_point(),
              "pom_ext: argument 'mask' must be bool or floating point, got ", m.scalar_type());
  if (m.dim() == 2) {
    TORCH_CHECK(m.size(0) == B && m.size(1) == N, "pom_ext: argument 'mask' must be (B, N) = (", B, ", ", N,
                ") for a padding/weight mask, got shape ", m.sizes());
    return poly_mean(h, coeff, m).unsqueeze(1);
  }
  TORCH_CHECK(m.dim() == 3, "pom_ext: argument 'mask' must be none, causal, a (B, N) or a (B, T, N) tensor, got "
              "shape ", m.sizes());
  TORCH_CHECK(m.size(0) == B && m.size(2) == N, "pom_ext: argument 'mask' must be (B, T, N) with B = ", B, ", N = ",
              N, ", got shape ", m.sizes());
  // O(T N E): p once, then a batched matrix product accumulated in fp32 at least.
  at::Tensor p = poly_eval(h, coeff);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mf = m.to(acc);
  at::Tensor den = mf.sum(-1, /*keepdim=*/true);
  return (at::bmm(mf, p.to(acc)) / at::where(den == 0, at::ones_like(den), den)).to(h.scalar_type());
}

at::Tensor select(const at::Tensor& s, const at::Tensor& H, int64_t n_sel_heads) {
  if (n_sel_heads <= 1) {
    TORCH_CHECK(s.size(-1) == H.size(-1), "pom_ext: argument 's' must be (..., E) with E = ", H.size(-1),
                " (the width of H), got shape ", s.sizes());
    return s * H;
  }
  const int64_t G = n_sel_heads, E = H.size(-1);
  TORCH_CHECK(s.size(-1) == G && E % G == 0, "pom_ext: argument 's' must be (..., ", G, ") gates for n_sel_heads=",
              G, " over a width divisible by ", G, ", got s ", s.sizes(), ", H ", H.sizes());
  std::vector<int64_t> shape = at::infer_size(s.sizes().slice(0, s.dim() - 1), H.sizes().slice(0, H.dim() - 1));
  shape.push_back(E);
  return (s.unsqueeze(-1) * H.unflatten(-1, {G, E / G})).reshape(shape);
}

}  // namespace pom_ext
