// Gradient of the weights of poly_causal_weighted, from its output H and the features p; ATen ops only, so every
// backend computes it alike. Asked for only when the weights require a gradient (a padding mask does not).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace pom_ext {

// One dense batch, fp64: g, H, p (B, N, E), w (B, N). Row i reads H_i = sum_{n <= end(i)} w_n p_n / W_i with
// W_i = sum_{n <= end(i)} w_n (end(i) the last row of i's block of F rows), so
// dL/dw_j = sum over the rows i whose prefix holds j of g_i . (p_j - H_i) / W_i (terms with W_i = 0 are 0):
// for j in block k, those rows are the blocks k, k + 1, ...: suffix sums over blocks.
inline at::Tensor causal_weight_grad_dense(const at::Tensor& g, const at::Tensor& H, const at::Tensor& p,
                                           const at::Tensor& w, int64_t F) {
  const int64_t B = g.size(0), N = g.size(1);
  if (N == 0) return at::zeros({B, 0}, w.options());
  const int64_t nb = (N + F - 1) / F, pad = nb * F - N;
  const at::Tensor idx = at::arange(N, w.options().dtype(at::kLong));
  const at::Tensor end = at::clamp_max((at::floor_divide(idx, F) + 1) * F, N) - 1;
  const at::Tensor total = w.cumsum(1).index_select(1, end);
  const at::Tensor inv = at::where(total != 0, 1.0 / at::where(total != 0, total, at::ones_like(total)),
                                   at::zeros_like(total));
  // Per block: the sums of g_i / W_i and of g_i . H_i / W_i over its rows, then suffix sums over blocks.
  auto suffix = [&](const at::Tensor& t) {  // t: (B, N, C) -> (B, nb, C)
    const at::Tensor blocks = at::constant_pad_nd(t, {0, 0, 0, pad}).view({B, nb, F, t.size(2)}).sum(2);
    return blocks.flip(1).cumsum(1).flip(1);
  };
  const at::Tensor blk = at::floor_divide(idx, F);
  const at::Tensor A = suffix(g * inv.unsqueeze(2)).index_select(1, blk);                       // (B, N, E)
  const at::Tensor c = suffix(((g * H).sum(2) * inv).unsqueeze(2)).index_select(1, blk).squeeze(2);  // (B, N)
  return (p * A).sum(2) - c;
}

// grad_H, H, p: (B, N, E), or (total, E) with cu_seqlens; weight: (B, N) or (total,). Returns the weight's
// gradient in its dtype (h's dtype for a bool mask).
inline at::Tensor causal_weight_grad(const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& p,
                                     const at::Tensor& weight, int64_t F, const c10::optional<at::Tensor>& cu) {
  const auto out_dtype = weight.scalar_type() == at::kBool ? H.scalar_type() : weight.scalar_type();
  const at::Tensor g = grad_H.to(at::kDouble), Hd = H.to(at::kDouble), pd = p.to(at::kDouble);
  const at::Tensor w = weight.to(at::kDouble);
  if (!cu.has_value()) return causal_weight_grad_dense(g, Hd, pd, w, F).to(out_dtype);
  const at::Tensor c = cu->to(at::kCPU, at::kLong).contiguous();
  const int64_t* o = c.data_ptr<int64_t>();
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b + 1 < c.numel(); ++b) {
    const int64_t a = o[b], len = o[b + 1] - o[b];
    parts.push_back(causal_weight_grad_dense(g.narrow(0, a, len).unsqueeze(0), Hd.narrow(0, a, len).unsqueeze(0),
                                             pd.narrow(0, a, len).unsqueeze(0), w.narrow(0, a, len).unsqueeze(0), F)
                        .squeeze(0));
  }
  return (parts.empty() ? at::zeros({0}, w.options()) : at::cat(parts)).to(out_dtype);
}

}  // namespace pom_ext
