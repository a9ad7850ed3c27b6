// A bounded pool of freed CPU output buffers.
//
// Every large op output used to be a fresh allocation: the system allocator maps new pages for it and the
// kernel zeroes each page on first touch, which costs about as much as writing the output itself. A training
// step frees its outputs and asks for the same sizes again, so the ops take large outputs from this pool:
// a freed output returns here (up to POM_EXT_CPU_POOL_MB megabytes, default 1024; 0 turns the pool off)
// and the next request of the same size class reuses the most recently freed one, already mapped.
#include "output_pool.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace pom_ext {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller outputs come from torch's allocator as before
constexpr size_t kClass = size_t(2) << 20;     // sizes round up to whole 2 MiB (huge-page) classes

size_t cap_bytes() {
  const char* v = std::getenv("POM_EXT_CPU_POOL_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  try {
    const long long mb = std::stoll(v);
    return mb <= 0 ? 0 : static_cast<size_t>(mb) << 20;
  } catch (...) {
    TORCH_WARN_ONCE("pom_ext: POM_EXT_CPU_POOL_MB=", v, " is not a number of megabytes; using 1024");
    return size_t(1024) << 20;
  }
}

struct Pool {
  std::mutex mu;
  std::map<size_t, std::vector<c10::DataPtr>> free;  // size class -> buffers, the last freed last
  size_t held = 0;                           // bytes in `free`
  const size_t cap = cap_bytes();
};

// Never destroyed: outputs may be freed while the process exits.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// What an output's storage owns: the buffer, which goes back to the pool when the output is freed.
struct Lease {
  c10::DataPtr buf;
  size_t bytes;
};

void give_back(void* ctx) {
  std::unique_ptr<Lease> lease(static_cast<Lease*>(ctx));
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  if (p.held + lease->bytes > p.cap) return;  // over the cap: the buffer is freed
  p.held += lease->bytes;
  p.free[lease->bytes].push_back(std::move(lease->buf));
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t need = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  Pool& p = pool();
  if (need < kMinBytes || p.cap == 0 || options.device().type() != c10::DeviceType::CPU) {
    return at::empty(sizes, options);
  }
  const size_t bytes = (need + kClass - 1) / kClass * kClass;
  auto lease = std::make_unique<Lease>();
  lease->bytes = bytes;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free.find(bytes);
    if (it != p.free.end() && !it->second.empty()) {  // the most recently freed: its lines may still be cached
      lease->buf = std::move(it->second.back());
      it->second.pop_back();
      p.held -= bytes;
    }
  }
  if (!lease->buf) lease->buf = c10::GetCPUAllocator()->allocate(bytes);
  void* data = lease->buf.get();
  c10::DataPtr ptr(data, lease.release(), &give_back, c10::Device(c10::DeviceType::CPU));
  c10::Storage storage(c10::Storage::use_byte_size_t(), need, std::move(ptr), /*allocator=*/nullptr,
                       /*resizable=*/false);
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                    options.dtype());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

}  // namespace cpu
}  // namespace pom_ext
