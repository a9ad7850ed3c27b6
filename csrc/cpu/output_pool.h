// Large outputs of the CPU ops, from a bounded pool of freed buffers (output_pool.cpp).
#pragma once

#include <ATen/ATen.h>

namespace pom_ext {
namespace cpu {

// An uninitialized contiguous tensor like at::empty(sizes, options); outputs of 1 MiB and more reuse a
// freed output of the same size class when the pool holds one.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace pom_ext
