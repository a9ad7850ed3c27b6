// Autograd of the pom_ext ops, registered with the dispatcher (DispatchKey::Autograd), so every caller gets the
// gradients: the C++ API, Python, and TorchScript or exported models run from C++ alone (torchvision's model).
//
// Each differentiable op is a torch::autograd::Function whose forward calls the op below autograd and whose
// backward calls the op's *_backward op through the dispatcher. The backward ops are differentiable functions too,
// whose own backward raises: a gradient of a gradient (double backward) is not supported, and says so in every
// language rather than returning zeros. The in-place decode step has no gradient (autograd's not-implemented
// fallback: it raises if one is needed).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>

#include "pom_ext/library.h"

namespace pom_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor or_undefined(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }
OptT as_opt(const at::Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// A call of the op below autograd (inside a Function's forward).
template <typename Sig, typename... Args>
auto below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

#define POM_OP(var, name, ...) \
  static const auto var = detail::op_handle<__VA_ARGS__>("pom_ext::" name)

// ---- the backward ops: computed below autograd, and not differentiable themselves ----

[[noreturn]] void no_double_backward(const char* op) {
  TORCH_CHECK(false, "pom_ext::", op, ": double backward (a gradient of a gradient) is not supported");
}

struct EvalBackwardFn : torch::autograd::Function<EvalBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& h, const at::Tensor& c) {
    POM_OP(op, "poly_eval_backward", T2(const at::Tensor&, const at::Tensor&, const at::Tensor&));
    auto [gh, gc] = below_autograd(op, g, h, c);
    return {gh, gc};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("poly_eval_backward"); }
};

struct MeanBackwardFn : torch::autograd::Function<MeanBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& H, const at::Tensor& h,
                               const at::Tensor& c, const OptT& w, const OptT& cu, bool weight_grad) {
    POM_OP(op, "poly_mean_backward", T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const OptT&, const OptT&, bool));
    auto [gh, gc, gw] = below_autograd(op, g, H, h, c, w, cu, weight_grad);
    if (!weight_grad) ctx->mark_non_differentiable({gw});
    return {gh, gc, gw};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("poly_mean_backward"); }
};

struct CausalBackwardFn : torch::autograd::Function<CausalBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& h, const at::Tensor& c,
                               int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_backward",
           T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    auto [gh, gc] = below_autograd(op, g, h, c, block_size, cu);
    return {gh, gc};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("poly_causal_backward"); }
};

struct CausalWeightedBackwardFn : torch::autograd::Function<CausalWeightedBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& H, const at::Tensor& h,
                               const at::Tensor& c, const at::Tensor& w, int64_t block_size, const OptT& cu,
                               bool weight_grad) {
    POM_OP(op, "poly_causal_weighted_backward",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
              const OptT&, bool));
    auto [gh, gc, gw] = below_autograd(op, g, H, h, c, w, block_size, cu, weight_grad);
    if (!weight_grad) ctx->mark_non_differentiable({gw});
    return {gh, gc, gw};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("poly_causal_weighted_backward");
  }
};

struct GatedBackwardFn : torch::autograd::Function<GatedBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c,
                               const OptT& bias, int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_gated_backward",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, int64_t, const OptT&));
    auto [ghs, gc, gb] = below_autograd(op, g, hs, c, bias, block_size, cu);
    return {ghs, gc, gb};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("poly_causal_gated_backward");
  }
};

struct StateBackwardFn : torch::autograd::Function<StateBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& gH, const at::Tensor& gs, const at::Tensor& h,
                               const at::Tensor& c, const at::Tensor& count) {
    POM_OP(op, "poly_state_update_backward",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&));
    auto [gh, gc, gsum] = below_autograd(op, gH, gs, h, c, count);
    return {gh, gc, gsum};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("poly_state_update_backward");
  }
};

struct MeanRopeBackwardFn : torch::autograd::Function<MeanRopeBackwardFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& H, const at::Tensor& h,
                               const at::Tensor& c, const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& pos,
                               const OptT& w, const OptT& cu, bool weight_grad) {
    POM_OP(op, "poly_mean_rope_backward",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, bool));
    auto [gh, gc, gw] = below_autograd(op, g, H, h, c, cs, sn, pos, w, cu, weight_grad);
    if (!weight_grad) ctx->mark_non_differentiable({gw});
    return {gh, gc, gw};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("poly_mean_rope_backward"); }
};

struct CausalRopeBackwardFn : torch::autograd::Function<CausalRopeBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& pos, int64_t block_size,
                               const OptT& cu) {
    POM_OP(op, "poly_causal_rope_backward",
           T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, const OptT&));
    auto [gh, gc] = below_autograd(op, g, h, c, cs, sn, pos, block_size, cu);
    return {gh, gc};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("poly_causal_rope_backward");
  }
};

struct GatedRopeBackwardFn : torch::autograd::Function<GatedRopeBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c,
                               const OptT& bias, const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& gcs,
                               const at::Tensor& gsn, const at::Tensor& pos, int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_gated_rope_backward",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    auto [ghs, gc, gb] = below_autograd(op, g, hs, c, bias, cs, sn, gcs, gsn, pos, block_size, cu);
    return {ghs, gc, gb};
  }
  static variable_list backward(AutogradContext*, variable_list) {
    no_double_backward("poly_causal_gated_rope_backward");
  }
};

struct ConvBackwardFn : torch::autograd::Function<ConvBackwardFn> {
  static variable_list forward(AutogradContext*, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                               const OptT& b) {
    POM_OP(op, "causal_conv1d_backward", T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&));
    auto [gx, gw, gb] = below_autograd(op, g, x, w, b);
    return {gx, gw, gb};
  }
  static variable_list backward(AutogradContext*, variable_list) { no_double_backward("causal_conv1d_backward"); }
};

// ---- the differentiable ops ----

struct EvalFn : torch::autograd::Function<EvalFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c) {
    POM_OP(op, "poly_eval", at::Tensor(const at::Tensor&, const at::Tensor&));
    ctx->save_for_backward({h, c});
    return below_autograd(op, h, c);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return EvalBackwardFn::apply(grads[0], saved[0], saved[1]);
  }
};

struct MeanFn : torch::autograd::Function<MeanFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c, const OptT& w,
                            const OptT& cu) {
    POM_OP(op, "poly_mean", at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const OptT&));
    at::Tensor H = below_autograd(op, h, c, w, cu);
    ctx->save_for_backward({h, c, or_undefined(w), or_undefined(cu), H});
    return H;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // needs_input_grad counts the tensors given: h, coeff, then the weight when there is one.
    const bool weight_grad = saved[2].defined() && ctx->needs_input_grad(2);
    auto g = MeanBackwardFn::apply(grads[0], saved[4], saved[0], saved[1], as_opt(saved[2]), as_opt(saved[3]),
                                   weight_grad);
    return {g[0], g[1], weight_grad ? g[2] : at::Tensor(), at::Tensor()};
  }
};

struct CausalFn : torch::autograd::Function<CausalFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c, int64_t block_size,
                            const OptT& cu) {
    POM_OP(op, "poly_causal", at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({h, c, or_undefined(cu)});
    return below_autograd(op, h, c, block_size, cu);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto g = CausalBackwardFn::apply(grads[0], saved[0], saved[1], ctx->saved_data["block_size"].toInt(),
                                     as_opt(saved[2]));
    return {g[0], g[1], at::Tensor(), at::Tensor()};
  }
};

struct CausalWeightedFn : torch::autograd::Function<CausalWeightedFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w,
                            int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_weighted",
           at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    at::Tensor H = below_autograd(op, h, c, w, block_size, cu);
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({h, c, w, or_undefined(cu), H});
    return H;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool weight_grad = ctx->needs_input_grad(2);
    auto g = CausalWeightedBackwardFn::apply(grads[0], saved[4], saved[0], saved[1], saved[2],
                                             ctx->saved_data["block_size"].toInt(), as_opt(saved[3]), weight_grad);
    return {g[0], g[1], weight_grad ? g[2] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct GatedFn : torch::autograd::Function<GatedFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hs, const at::Tensor& c, const OptT& bias,
                            int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_gated",
           at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, int64_t, const OptT&));
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({hs, c, or_undefined(bias), or_undefined(cu)});
    return below_autograd(op, hs, c, bias, block_size, cu);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto g = GatedBackwardFn::apply(grads[0], saved[0], saved[1], as_opt(saved[2]),
                                    ctx->saved_data["block_size"].toInt(), as_opt(saved[3]));
    return {g[0], g[1], saved[2].defined() ? g[2] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct StateFn : torch::autograd::Function<StateFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& state_sum, const at::Tensor& count) {
    POM_OP(op, "poly_state_update",
           T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&));
    auto [H, new_sum, new_count] = below_autograd(op, h, c, state_sum, count);
    ctx->save_for_backward({h, c, count});
    ctx->mark_non_differentiable({new_count});
    return {H, new_sum, new_count};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    // Gradients of unused outputs arrive as zeros (materialized grads).
    auto g = StateBackwardFn::apply(grads[0], grads[1], saved[0], saved[1], saved[2]);
    return {g[0], g[1], g[2], at::Tensor()};
  }
};

// The rope ops: no gradient for the tables (constants of the layer) nor the positions.
struct MeanRopeFn : torch::autograd::Function<MeanRopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs,
                            const at::Tensor& sn, const at::Tensor& pos, const OptT& w, const OptT& cu) {
    POM_OP(op, "poly_mean_rope", at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const OptT&, const OptT&));
    at::Tensor H = below_autograd(op, h, c, cs, sn, pos, w, cu);
    ctx->save_for_backward({h, c, cs, sn, pos, or_undefined(w), or_undefined(cu), H});
    return H;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // needs_input_grad counts the tensors given: h, coeff, cos, sin, positions, then the weight when there is one.
    const bool weight_grad = s[5].defined() && ctx->needs_input_grad(5);
    auto g = MeanRopeBackwardFn::apply(grads[0], s[7], s[0], s[1], s[2], s[3], s[4], as_opt(s[5]), as_opt(s[6]),
                                       weight_grad);
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor(), weight_grad ? g[2] : at::Tensor(), at::Tensor()};
  }
};

struct CausalRopeFn : torch::autograd::Function<CausalRopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs,
                            const at::Tensor& sn, const at::Tensor& pos, int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_rope", at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({h, c, cs, sn, pos, or_undefined(cu)});
    return below_autograd(op, h, c, cs, sn, pos, block_size, cu);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto g = CausalRopeBackwardFn::apply(grads[0], s[0], s[1], s[2], s[3], s[4],
                                         ctx->saved_data["block_size"].toInt(), as_opt(s[5]));
    return {g[0], g[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct GatedRopeFn : torch::autograd::Function<GatedRopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hs, const at::Tensor& c, const OptT& bias,
                            const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& gcs, const at::Tensor& gsn,
                            const at::Tensor& pos, int64_t block_size, const OptT& cu) {
    POM_OP(op, "poly_causal_gated_rope",
           at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&));
    ctx->saved_data["block_size"] = block_size;
    ctx->save_for_backward({hs, c, or_undefined(bias), cs, sn, gcs, gsn, pos, or_undefined(cu)});
    return below_autograd(op, hs, c, bias, cs, sn, gcs, gsn, pos, block_size, cu);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto g = GatedRopeBackwardFn::apply(grads[0], s[0], s[1], as_opt(s[2]), s[3], s[4], s[5], s[6], s[7],
                                        ctx->saved_data["block_size"].toInt(), as_opt(s[8]));
    return {g[0], g[1], s[2].defined() ? g[2] : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ConvFn : torch::autograd::Function<ConvFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const OptT& b) {
    POM_OP(op, "causal_conv1d", at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&));
    ctx->save_for_backward({x, w, or_undefined(b)});
    return below_autograd(op, x, w, b);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const OptT b = as_opt(saved[2]);
    auto r = ConvBackwardFn::apply(grads[0], saved[0], saved[1], b);
    return {r[0], r[1], b ? r[2] : at::Tensor()};
  }
};

#undef POM_OP

// ---- kernels for DispatchKey::Autograd ----

at::Tensor eval(const at::Tensor& h, const at::Tensor& c) { return EvalFn::apply(h, c); }

T2 eval_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c) {
  auto r = EvalBackwardFn::apply(g, h, c);
  return {r[0], r[1]};
}

at::Tensor mean(const at::Tensor& h, const at::Tensor& c, const OptT& w, const OptT& cu) {
  return MeanFn::apply(h, c, w, cu);
}

T3 mean_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c, const OptT& w,
            const OptT& cu, bool weight_grad) {
  auto r = MeanBackwardFn::apply(g, H, h, c, w, cu, weight_grad);
  return {r[0], r[1], r[2]};
}

at::Tensor causal(const at::Tensor& h, const at::Tensor& c, int64_t block_size, const OptT& cu) {
  return CausalFn::apply(h, c, block_size, cu);
}

T2 causal_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c, int64_t block_size, const OptT& cu) {
  auto r = CausalBackwardFn::apply(g, h, c, block_size, cu);
  return {r[0], r[1]};
}

at::Tensor causal_weighted(const at::Tensor& h, const at::Tensor& c, const at::Tensor& w, int64_t block_size,
                           const OptT& cu) {
  return CausalWeightedFn::apply(h, c, w, block_size, cu);
}

T3 causal_weighted_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c,
                       const at::Tensor& w, int64_t block_size, const OptT& cu, bool weight_grad) {
  auto r = CausalWeightedBackwardFn::apply(g, H, h, c, w, block_size, cu, weight_grad);
  return {r[0], r[1], r[2]};
}

at::Tensor causal_gated(const at::Tensor& hs, const at::Tensor& c, const OptT& bias, int64_t block_size,
                        const OptT& cu) {
  return GatedFn::apply(hs, c, bias, block_size, cu);
}

T3 causal_gated_bwd(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c, const OptT& bias,
                    int64_t block_size, const OptT& cu) {
  auto r = GatedBackwardFn::apply(g, hs, c, bias, block_size, cu);
  return {r[0], r[1], r[2]};
}

T3 state_update(const at::Tensor& h, const at::Tensor& c, const at::Tensor& s, const at::Tensor& n) {
  auto r = StateFn::apply(h, c, s, n);
  return {r[0], r[1], r[2]};
}

T3 state_update_bwd(const at::Tensor& gH, const at::Tensor& gs, const at::Tensor& h, const at::Tensor& c,
                    const at::Tensor& n) {
  auto r = StateBackwardFn::apply(gH, gs, h, c, n);
  return {r[0], r[1], r[2]};
}

at::Tensor mean_rope(const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs, const at::Tensor& sn,
                     const at::Tensor& pos, const OptT& w, const OptT& cu) {
  return MeanRopeFn::apply(h, c, cs, sn, pos, w, cu);
}

T3 mean_rope_bwd(const at::Tensor& g, const at::Tensor& H, const at::Tensor& h, const at::Tensor& c,
                 const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& pos, const OptT& w, const OptT& cu,
                 bool weight_grad) {
  auto r = MeanRopeBackwardFn::apply(g, H, h, c, cs, sn, pos, w, cu, weight_grad);
  return {r[0], r[1], r[2]};
}

at::Tensor causal_rope(const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs, const at::Tensor& sn,
                       const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  return CausalRopeFn::apply(h, c, cs, sn, pos, block_size, cu);
}

T2 causal_rope_bwd(const at::Tensor& g, const at::Tensor& h, const at::Tensor& c, const at::Tensor& cs,
                   const at::Tensor& sn, const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  auto r = CausalRopeBackwardFn::apply(g, h, c, cs, sn, pos, block_size, cu);
  return {r[0], r[1]};
}

at::Tensor causal_gated_rope(const at::Tensor& hs, const at::Tensor& c, const OptT& bias, const at::Tensor& cs,
                             const at::Tensor& sn, const at::Tensor& gcs, const at::Tensor& gsn, const at::Tensor& pos,
                             int64_t block_size, const OptT& cu) {
  return GatedRopeFn::apply(hs, c, bias, cs, sn, gcs, gsn, pos, block_size, cu);
}

T3 causal_gated_rope_bwd(const at::Tensor& g, const at::Tensor& hs, const at::Tensor& c, const OptT& bias,
                         const at::Tensor& cs, const at::Tensor& sn, const at::Tensor& gcs, const at::Tensor& gsn,
                         const at::Tensor& pos, int64_t block_size, const OptT& cu) {
  auto r = GatedRopeBackwardFn::apply(g, hs, c, bias, cs, sn, gcs, gsn, pos, block_size, cu);
  return {r[0], r[1], r[2]};
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const OptT& b) { return ConvFn::apply(x, w, b); }

T3 conv_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  auto r = ConvBackwardFn::apply(g, x, w, b);
  return {r[0], r[1], r[2]};
}

}  // namespace

namespace detail {

void register_autograd(torch::Library& m) {
  POM_EXT_IMPL_OPS(m);
  m.impl("poly_state_step_", torch::autograd::autogradNotImplementedFallback());
}

void register_inplace_or_view(torch::Library& m) {
  m.impl("poly_state_step_", torch::autograd::autogradNotImplementedInplaceOrViewFallback());
}

}  // namespace detail
}  // namespace pom_ext
