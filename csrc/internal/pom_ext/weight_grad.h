// The weights of poly_causal_weighted: the inverse of the weight each row sees, and the weights' gradient from the
// op's output H and the features p. ATen ops only, so every backend computes them alike.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace pom_ext {

// 1 / t, 0 where t is 0.
inline at::Tensor inverse_or_zero(const at::Tensor& t) {
  return at::where(t != 0, 1.0 / at::where(t != 0, t, at::ones_like(t)), at::zeros_like(t));
}

// One dense batch: inv_n = 1 / (the sum of w over rows 0 .. end(n)), 0 where that sum is 0, end(n) the last row of
// n's block of F rows; w (B, N) -> (B, N) in w's dtype (the sums in w's dtype: pass fp64 for fp64 sums).
inline at::Tensor inverse_prefix_weights_dense(const at::Tensor& w, int64_t F) {
  const int64_t N = w.size(1);
  if (N == 0) return at::zeros_like(w);
  const at::Tensor idx = at::arange(N, w.options().dtype(at::kLong));
  const at::Tensor end = at::clamp_max((at::floor_divide(idx, F) + 1) * F, N) - 1;
  const at::Tensor total = w.cumsum(1).index_select(1, end);
  return inverse_or_zero(total);
}

// fn of every sequence as a dense batch of one: a (B, ...) tensor per argument, or with cu_seqlens the packed rows
// of each sequence (offsets read on the host), the results concatenated back.
inline at::Tensor per_sequence(const std::vector<at::Tensor>& args, const c10::optional<at::Tensor>& cu,
                               const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn) {
  if (!cu.has_value()) return fn(args);
  const at::Tensor c = cu->to(at::kCPU, at::kLong).contiguous();
  const int64_t* o = c.data_ptr<int64_t>();
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b + 1 < c.numel(); ++b) {
    std::vector<at::Tensor> one;
    for (const at::Tensor& a : args) one.push_back(a.narrow(0, o[b], o[b + 1] - o[b]).unsqueeze(0));
    parts.push_back(fn(one).squeeze(0));
  }
  return parts.empty() ? at::zeros({0}, args.at(0).options()) : at::cat(parts);
}

// w: (B, N), or (total,) with cu_seqlens -> inv of the same shape, fp64. Packed rows take their totals from one
// prefix sum over all rows (differences of it at each sequence's start and each row's block end), so any number of
// sequences costs a few ops and no copy of the offsets to the host.
inline at::Tensor inverse_prefix_weights(const at::Tensor& w, int64_t F, const c10::optional<at::Tensor>& cu) {
  const at::Tensor wd = w.to(at::kDouble);
  if (!cu.has_value()) return inverse_prefix_weights_dense(wd, F);
  const int64_t T = wd.size(0);
  if (T == 0) return at::zeros_like(wd);
  const at::Tensor c = cu->to(wd.device(), at::kLong);
  const at::Tensor idx = at::arange(T, c.options());
  // The sequence of row t: the first one that ends after t (empty sequences are stepped over).
  const at::Tensor seq = at::searchsorted(c.narrow(0, 1, c.numel() - 1), idx, /*out_int32=*/false, /*right=*/true);
  const at::Tensor start = c.index_select(0, seq), stop = c.index_select(0, seq + 1);
  const at::Tensor end = at::minimum(start + (at::floor_divide(idx - start, F) + 1) * F, stop);
  const at::Tensor S = at::constant_pad_nd(wd.cumsum(0), {1, 0});  // S[k] = w_0 + ... + w_{k-1}
  const at::Tensor total = S.index_select(0, end) - S.index_select(0, start);
  return inverse_or_zero(total);
}

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
  const at::Tensor inv = inverse_prefix_weights_dense(w, F);
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
  return per_sequence({grad_H.to(at::kDouble), H.to(at::kDouble), p.to(at::kDouble), weight.to(at::kDouble)}, cu,
                      [F](const std::vector<at::Tensor>& a) {
                        return causal_weight_grad_dense(a[0], a[1], a[2], a[3], F);
                      })
      .to(out_dtype);
}

}  // namespace pom_ext
