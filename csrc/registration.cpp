// Op schemas of pom_ext. Every backend registers its kernels under these names
// (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); Python adds fake tensors and
// autograd in pom_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pom_ext, m) {
  // p = poly(act(h)) element-wise; h: (..., E), coeff: (E, K).
  m.def("poly_eval(Tensor h, Tensor coeff) -> Tensor");
  m.def("poly_eval_backward(Tensor grad_p, Tensor h, Tensor coeff) -> (Tensor, Tensor)");
  // H = sum_n w p / sum_n w  (w = 1 without weight); h: (B, N, E) or (total, E) with cu_seqlens -> (B, E).
  m.def("poly_mean(Tensor h, Tensor coeff, Tensor? weight=None, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_mean_backward(Tensor grad_H, Tensor H, Tensor h, Tensor coeff, Tensor? weight, Tensor? cu_seqlens, "
      "bool weight_grad) -> (Tensor, Tensor, Tensor)");
  // Block-causal prefix mean (block_size 1: token-causal); output has the layout of h.
  m.def("poly_causal(Tensor h, Tensor coeff, int block_size=1, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_backward(Tensor grad_H, Tensor h, Tensor coeff, int block_size, Tensor? cu_seqlens) "
      "-> (Tensor, Tensor)");
  // Gated block-causal mixer: hs = [h | pre] (E + S columns, E = coeff.size(0)); y = hardsigmoid(pre + gate_bias)
  // * H, one gate per channel (S = E) or per group of E / S channels; y has E columns. The backward returns the
  // gradient of hs as one tensor (h and pre columns), of coeff and of gate_bias.
  m.def("poly_causal_gated(Tensor hs, Tensor coeff, Tensor? gate_bias=None, int block_size=1, "
        "Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "poly_causal_gated_backward(Tensor grad_y, Tensor hs, Tensor coeff, Tensor? gate_bias, int block_size, "
      "Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor)");
  // Recurrent state: append a chunk h (B, T, E) to (state_sum (B, E) fp32, count (B,) int64);
  // returns H (B, E) seen by every token of the chunk, and the new state.
  m.def("poly_state_update(Tensor h, Tensor coeff, Tensor state_sum, Tensor count) -> (Tensor, Tensor, Tensor)");
  m.def(
      "poly_state_update_backward(Tensor grad_H, Tensor grad_state_sum, Tensor h, Tensor coeff, Tensor count) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("poly_state_step_(Tensor h, Tensor coeff, Tensor(a!) state_sum, Tensor(b!) count) -> Tensor");
}
