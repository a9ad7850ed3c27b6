// C++ entry points of the pom_ext ops: dispatcher calls (whichever backend the inputs live on; autograd is
// registered with the dispatcher, csrc/api/autograd.cpp), aggregation by mask and selection (the formulas of
// pom_ext/functional.py).
#include "pom_ext/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <sstream>

#include "pom_ext/library.h"
#include "pom_ext/version.h"

namespace pom_ext {

using ops::OptTensor;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const char* ensure_registered() {
  TORCH_CHECK(detail::registration_error().empty(), detail::registration_error());
  TORCH_CHECK(c10::Dispatcher::singleton().findSchema({"pom_ext::build_info", ""}).has_value(),
              "pom_ext: the pom_ext ops are not registered; the library libpom_ext was not loaded (link it through "
              "the CMake target pom_ext::pom_ext, which keeps it linked)");
  return POM_EXT_VERSION;
}

std::string cpu_isa() {
  static const auto op = detail::op_handle<std::string()>("pom_ext::cpu_isa");
  return op.call();
}

namespace {

// The op through the dispatcher, with autograd (differentiable) or below it (no autograd: the ops:: functions).
template <bool kAutograd, typename Sig, typename... Args>
auto call(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if constexpr (kAutograd) {
    return op.call(std::forward<Args>(args)...);
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(std::forward<Args>(args)...);
  }
}

using EvalSig = at::Tensor(const at::Tensor&, const at::Tensor&);
using EvalBwdSig = T2(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using MeanSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&);
using MeanBwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                      const OptTensor&, bool);
using CausalSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&);
using CausalBwdSig = T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&);
using WeightedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&);
using WeightedBwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t, const OptTensor&, bool);
using GatedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, const OptTensor&);
using GatedBwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                       const OptTensor&);
using StateSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using StateBwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using StepSig = at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&);
using MeanRopeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const OptTensor&, const OptTensor&);
using CausalRopeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, int64_t, const OptTensor&);
using GatedRopeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                const OptTensor&);
using ConvSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&);
using ConvBwdSig = T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&);

#define POM_HANDLE(fn, Sig, name)                                                \
  const c10::TypedOperatorHandle<Sig>& fn() {                                    \
    static const auto h = detail::op_handle<Sig>("pom_ext::" name);             \
    return h;                                                                    \
  }
POM_HANDLE(eval_op, EvalSig, "poly_eval")
POM_HANDLE(eval_bwd_op, EvalBwdSig, "poly_eval_backward")
POM_HANDLE(mean_op, MeanSig, "poly_mean")
POM_HANDLE(mean_bwd_op, MeanBwdSig, "poly_mean_backward")
POM_HANDLE(causal_op, CausalSig, "poly_causal")
POM_HANDLE(causal_bwd_op, CausalBwdSig, "poly_causal_backward")
POM_HANDLE(weighted_op, WeightedSig, "poly_causal_weighted")
POM_HANDLE(weighted_bwd_op, WeightedBwdSig, "poly_causal_weighted_backward")
POM_HANDLE(gated_op, GatedSig, "poly_causal_gated")
POM_HANDLE(gated_bwd_op, GatedBwdSig, "poly_causal_gated_backward")
POM_HANDLE(state_op, StateSig, "poly_state_update")
POM_HANDLE(state_bwd_op, StateBwdSig, "poly_state_update_backward")
POM_HANDLE(step_op, StepSig, "poly_state_step_")
POM_HANDLE(mean_rope_op, MeanRopeSig, "poly_mean_rope")
POM_HANDLE(causal_rope_op, CausalRopeSig, "poly_causal_rope")
POM_HANDLE(gated_rope_op, GatedRopeSig, "poly_causal_gated_rope")
POM_HANDLE(conv_op, ConvSig, "causal_conv1d")
POM_HANDLE(conv_bwd_op, ConvBwdSig, "causal_conv1d_backward")
#undef POM_HANDLE

}  // namespace

// ---- without autograd ----

namespace ops {

at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff) { return call<false>(eval_op(), h, coeff); }

T2 poly_eval_backward(const at::Tensor& grad_p, const at::Tensor& h, const at::Tensor& coeff) {
  return call<false>(eval_bwd_op(), grad_p, h, coeff);
}

at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const OptTensor& weight,
                     const OptTensor& cu_seqlens) {
  return call<false>(mean_op(), h, coeff, weight, cu_seqlens);
}

T3 poly_mean_backward(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
                      const OptTensor& weight, const OptTensor& cu_seqlens, bool weight_grad) {
  return call<false>(mean_bwd_op(), grad_H, H, h, coeff, weight, cu_seqlens, weight_grad);
}

at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                       const OptTensor& cu_seqlens) {
  return call<false>(causal_op(), h, coeff, block_size, cu_seqlens);
}

T2 poly_causal_backward(const at::Tensor& grad_H, const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                        const OptTensor& cu_seqlens) {
  return call<false>(causal_bwd_op(), grad_H, h, coeff, block_size, cu_seqlens);
}

at::Tensor poly_causal_weighted(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                int64_t block_size, const OptTensor& cu_seqlens) {
  return call<false>(weighted_op(), h, coeff, weight, block_size, cu_seqlens);
}

T3 poly_causal_weighted_backward(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h,
                                 const at::Tensor& coeff, const at::Tensor& weight, int64_t block_size,
                                 const OptTensor& cu_seqlens, bool weight_grad) {
  return call<false>(weighted_bwd_op(), grad_H, H, h, coeff, weight, block_size, cu_seqlens, weight_grad);
}

at::Tensor poly_causal_gated(const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
                             int64_t block_size, const OptTensor& cu_seqlens) {
  return call<false>(gated_op(), hs, coeff, gate_bias, block_size, cu_seqlens);
}

T3 poly_causal_gated_backward(const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,
                              const OptTensor& gate_bias, int64_t block_size, const OptTensor& cu_seqlens) {
  return call<false>(gated_bwd_op(), grad_y, hs, coeff, gate_bias, block_size, cu_seqlens);
}

T3 poly_state_update(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum,
                     const at::Tensor& count) {
  return call<false>(state_op(), h, coeff, state_sum, count);
}

T3 poly_state_update_backward(const at::Tensor& grad_H, const at::Tensor& grad_state_sum, const at::Tensor& h,
                              const at::Tensor& coeff, const at::Tensor& count) {
  return call<false>(state_bwd_op(), grad_H, grad_state_sum, h, coeff, count);
}

at::Tensor poly_state_step_(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum, at::Tensor& count) {
  return call<false>(step_op(), h, coeff, state_sum, count);
}

at::Tensor poly_mean_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, const OptTensor& weight, const OptTensor& cu_seqlens) {
  return call<false>(mean_rope_op(), h, coeff, cos, sin, positions, weight, cu_seqlens);
}

at::Tensor poly_causal_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,
                            const OptTensor& cu_seqlens) {
  return call<false>(causal_rope_op(), h, coeff, cos, sin, positions, block_size, cu_seqlens);
}

at::Tensor poly_causal_gated_rope(const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
                                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& gate_cos,
                                  const at::Tensor& gate_sin, const at::Tensor& positions, int64_t block_size,
                                  const OptTensor& cu_seqlens) {
  return call<false>(gated_rope_op(), hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions, block_size,
                     cu_seqlens);
}

at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  return call<false>(conv_op(), x, weight, bias);
}

T3 causal_conv1d_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const OptTensor& bias) {
  return call<false>(conv_bwd_op(), grad_y, x, weight, bias);
}

}  // namespace ops

// ---- differentiable ----

at::Tensor causal_conv1d(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias) {
  return call<true>(conv_op(), x, weight, bias);
}

at::Tensor poly_eval(const at::Tensor& h, const at::Tensor& coeff) { return call<true>(eval_op(), h, coeff); }

at::Tensor poly_mean(const at::Tensor& h, const at::Tensor& coeff, const OptTensor& weight,
                     const OptTensor& cu_seqlens) {
  return call<true>(mean_op(), h, coeff, weight, cu_seqlens);
}

at::Tensor poly_causal(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                       const OptTensor& cu_seqlens) {
  return call<true>(causal_op(), h, coeff, block_size, cu_seqlens);
}

at::Tensor poly_causal_weighted(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                int64_t block_size, const OptTensor& cu_seqlens) {
  return call<true>(weighted_op(), h, coeff, weight, block_size, cu_seqlens);
}

at::Tensor poly_causal_gated(const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
                             int64_t block_size, const OptTensor& cu_seqlens) {
  return call<true>(gated_op(), hs, coeff, gate_bias, block_size, cu_seqlens);
}

T3 poly_state_update(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& state_sum,
                     const at::Tensor& count) {
  return call<true>(state_op(), h, coeff, state_sum, count);
}

at::Tensor poly_mean_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, const OptTensor& weight, const OptTensor& cu_seqlens) {
  return call<true>(mean_rope_op(), h, coeff, cos, sin, positions, weight, cu_seqlens);
}

at::Tensor poly_causal_rope(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,
                            const OptTensor& cu_seqlens) {
  return call<true>(causal_rope_op(), h, coeff, cos, sin, positions, block_size, cu_seqlens);
}

at::Tensor poly_causal_gated_rope(const at::Tensor& hs, const at::Tensor& coeff, const OptTensor& gate_bias,
                                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& gate_cos,
                                  const at::Tensor& gate_sin, const at::Tensor& positions, int64_t block_size,
                                  const OptTensor& cu_seqlens) {
  return call<true>(gated_rope_op(), hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions, block_size,
                    cu_seqlens);
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  const int64_t P = cos.size(1), E = x.size(-1);
  TORCH_CHECK(P >= 1 && E % (2 * P) == 0, "pom_ext: argument 'cos' must be (L, P) with 2 P dividing the width E = ",
              E, ", got shape ", cos.sizes());
  const int64_t S = E / (2 * P);
  const at::Tensor pos = positions.to(at::kLong);
  auto shape = pos.sizes().vec();  // (..., N, S, P)
  shape.push_back(P);
  const at::Tensor c = cos.index_select(0, pos.flatten()).view(shape).to(x.scalar_type());
  const at::Tensor sn = sin.index_select(0, pos.flatten()).view(shape).to(x.scalar_type());
  const at::Tensor q = x.unflatten(-1, {S, 2, P});
  const at::Tensor a = q.select(-2, 0), b = q.select(-2, 1);
  return at::stack({a * c - b * sn, b * c + a * sn}, -2).flatten(-3);
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

// The offsets on one line: all of them up to 8, else the first 4 and the last 2.
std::string offsets_repr(const at::Tensor& c) {
  const int64_t n = c.numel();
  const int64_t* v = c.data_ptr<int64_t>();
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < n; ++i) {
    if (n > 8 && i == 4) {
      os << ", ...";
      i = n - 2;
    }
    os << (i ? ", " : "") << v[i];
  }
  os << "] (" << n << " offsets)";
  return os.str();
}

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
                " (the number of packed tokens), got ", offsets_repr(c));
  }
}

}  // namespace

at::Tensor aggregate(const at::Tensor& h, const at::Tensor& coeff, const Mask& mask, const at::Tensor& cu_seqlens,
                     const Rotation& rot) {
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
    if (mask.is_none()) {
      return rot.defined() ? poly_mean_rope(h, coeff, rot.cos, rot.sin, rot.positions, std::nullopt, cu_seqlens)
                           : poly_mean(h, coeff, std::nullopt, cu_seqlens);
    }
    TORCH_CHECK(mask.is_causal(), "pom_ext: argument 'mask' must be none or causal when cu_seqlens is given, got ",
                mask.repr());
    return rot.defined()
               ? poly_causal_rope(h, coeff, rot.cos, rot.sin, rot.positions, mask.block_size(), cu_seqlens)
               : poly_causal(h, coeff, mask.block_size(), cu_seqlens);
  }
  const int64_t B = h.size(0), N = h.size(1);
  if (mask.is_none()) {
    return (rot.defined() ? poly_mean_rope(h, coeff, rot.cos, rot.sin, rot.positions) : poly_mean(h, coeff))
        .unsqueeze(1);
  }
  if (mask.is_causal()) {
    return rot.defined() ? poly_causal_rope(h, coeff, rot.cos, rot.sin, rot.positions, mask.block_size())
                         : poly_causal(h, coeff, mask.block_size());
  }
  const at::Tensor& m = mask.tensor();
  TORCH_CHECK(m.device() == h.device(), "pom_ext: argument 'mask' must be on ", h.device(), " like the input, got ",
              m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.is_floating_point(),
              "pom_ext: argument 'mask' must be bool or floating point, got ", m.scalar_type());
  if (m.dim() == 2) {
    TORCH_CHECK(m.size(0) == B && m.size(1) == N, "pom_ext: argument 'mask' must be (B, N) = (", B, ", ", N,
                ") for a padding/weight mask, got shape ", m.sizes());
    return (rot.defined() ? poly_mean_rope(h, coeff, rot.cos, rot.sin, rot.positions, m) : poly_mean(h, coeff, m))
        .unsqueeze(1);
  }
  TORCH_CHECK(m.dim() == 3, "pom_ext: argument 'mask' must be none, causal, a (B, N) or a (B, T, N) tensor, got "
              "shape ", m.sizes());
  TORCH_CHECK(m.size(0) == B && m.size(2) == N, "pom_ext: argument 'mask' must be (B, T, N) with B = ", B, ", N = ",
              N, ", got shape ", m.sizes());
  // O(T N E): p once, then a batched matrix product accumulated in fp32 at least.
  at::Tensor p = poly_eval(h, coeff);
  const auto acc = p.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rot.defined()) p = rotate(p.to(acc), rot.cos, rot.sin, rot.positions);
  at::Tensor mf = m.to(acc);
  at::Tensor den = mf.sum(-1, /*keepdim=*/true);
  // A row of zeros divides by 1 (its sum is 0): den + (den == 0), which the meta device runs too.
  return (at::bmm(mf, p.to(acc)) / (den + (den == 0).to(acc))).to(h.scalar_type());
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
