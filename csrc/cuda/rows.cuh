// Row reductions of mean.cu that the recurrent state (state.cu) reuses.
#pragma once

#include "common.cuh"

namespace pom_ext {
namespace cuda {

// Partial sums over the chunks of every sequence: S (nslots, E) = sum_n w p, W (nslots,) = sum_n w (fp64),
// one slot per (chunk, row lane); slots of sequence b are [c0 * lanes, c1 * lanes) for its chunks [c0, c1).
struct RowPartials {
  at::Tensor S, W;
  Layout L;
  LayoutKeep keep;
  int lanes = 1;
};

// weight: null, or an accumulation-dtype tensor laid out like the rows of h.
// When cnt_ws is given, the block of a sequence's first chunk copies count_in[b] into cnt_ws[b].
RowPartials row_partials(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                         const c10::optional<at::Tensor>& cu, const int64_t* count_in, int64_t count_stride,
                         int64_t* cnt_ws, cudaStream_t stream);

// grad_h = gbar[b] * w * dp/dh into gh (laid out like h, contiguous), and grad_coeff (E, K) in coeff's dtype.
// gbar: (B, E) contiguous in the accumulation dtype.
at::Tensor row_backward(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor* weight,
                        const c10::optional<at::Tensor>& cu, const at::Tensor& gbar, at::Tensor& gh,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace pom_ext
