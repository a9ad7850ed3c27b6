// Kernels shared by every op family: chunk offsets of packed sequences, the
// scan of chunk totals, and the fixed-order reduction of grad_coeff partials.
#include "common.cuh"

#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <vector>

namespace pom_ext {
namespace cuda {

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

namespace {

constexpr int kOffThreads = 1024;

// The offsets as the kernels read them, safe[i] = min(max(cu[0..i]), total) with safe[0] = 0: non-decreasing and
// within [0, total] whatever cu holds, so no kernel indexes a row outside the tensor. For offsets that passed
// validate_offsets (0 first, non-decreasing, total last) safe == cu; a write that bypassed its cache (see there)
// gives wrong rows, never an access out of bounds. Then off[b] = sum_{j < b} of the chunks of sequence j (of the
// safe offsets), off[B] = the number of chunks. One block; thread t owns offsets [t * per, (t + 1) * per).
__global__ void __launch_bounds__(kOffThreads) chunk_offsets_kernel(const void* cu, bool cu64, int64_t B,
                                                                    int64_t total, plan::ChunkPlan pl,
                                                                    int64_t* __restrict__ safe,
                                                                    int64_t* __restrict__ off) {
  __shared__ int64_t part[kOffThreads];
  auto at = [&](int64_t i) -> int64_t {
    return cu64 ? static_cast<const int64_t*>(cu)[i] : static_cast<int64_t>(static_cast<const int32_t*>(cu)[i]);
  };
  const int t = threadIdx.x;
  const int64_t per = (B + 1 + kOffThreads - 1) / kOffThreads;
  const int64_t lo = t * per;
  const int64_t hi = lo + per < B + 1 ? lo + per : B + 1;
  int64_t m = 0;  // the running maximum of this thread's offsets (0: safe[0])
  for (int64_t i = lo; i < hi; ++i) m = max(m, at(i));
  part[t] = m;
  __syncthreads();
  if (t == 0) {  // exclusive prefix maxima of the threads' maxima
    int64_t run = 0;
    for (int i = 0; i < kOffThreads; ++i) {
      const int64_t v = part[i];
      part[i] = run;
      run = max(run, v);
    }
  }
  __syncthreads();
  m = part[t];
  for (int64_t i = lo; i < hi; ++i) {
    m = max(m, i == 0 ? int64_t(0) : at(i));
    safe[i] = min(m, total);
  }
  __syncthreads();  // safe complete (global memory, visible to the block after the barrier)
  const int64_t per_b = (B + kOffThreads - 1) / kOffThreads;
  const int64_t b0 = t * per_b;
  const int64_t b1 = b0 + per_b < B ? b0 + per_b : B;
  int64_t local = 0;
  for (int64_t b = b0; b < b1; ++b) local += plan::chunks_of_len(pl, safe[b + 1] - safe[b]);
  part[t] = local;  // every thread read its part[t] before the barrier above
  __syncthreads();
  if (t == 0) {
    int64_t run = 0;
    for (int i = 0; i < kOffThreads; ++i) {
      const int64_t v = part[i];
      part[i] = run;
      run += v;
    }
    off[B] = run;
  }
  __syncthreads();
  int64_t run = part[t];
  for (int64_t b = b0; b < b1; ++b) {
    off[b] = run;
    run += plan::chunks_of_len(pl, safe[b + 1] - safe[b]);
  }
}

// Per sequence and channel: carries of the chunk totals. Block (32, 16): lane y
// owns a contiguous run of chunks.
__global__ void __launch_bounds__(512)
    chunk_scan_kernel(const double* __restrict__ tot, double* __restrict__ carry, Layout L, int64_t E, bool reverse) {
  __shared__ double sh[16][33];
  const int64_t eblocks = (E + 31) / 32;
  const int64_t b = blockIdx.x / eblocks;
  const int64_t e = (blockIdx.x - b * eblocks) * 32 + threadIdx.x;
  const bool active = e < E;
  int64_t c0, c1;
  L.chunks_of(b, c0, c1);
  const int64_t n = c1 - c0;
  const int64_t seg = (n + 15) / 16;
  // Lane y's chunks in scan order are positions [y * seg, (y + 1) * seg) of the sequence's chunks,
  // counted from the first chunk (forward) or from the last (reverse).
  const int64_t p0 = threadIdx.y * seg;
  const int64_t p1 = p0 + seg < n ? p0 + seg : n;
  auto chunk_at = [&](int64_t p) { return reverse ? c1 - 1 - p : c0 + p; };
  double s = 0.0;
  if (active)
    for (int64_t p = p0; p < p1 && p < n - 1; ++p) s += tot[chunk_at(p) * E + e];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  double run = 0.0;
  for (int y = 0; y < static_cast<int>(threadIdx.y); ++y) run += sh[y][threadIdx.x];
  if (active)
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = chunk_at(p);
      carry[c * E + e] = run;
      if (p < n - 1) run += tot[c * E + e];
    }
}

// out[e, k] = sum over slots of part[slot, k, e], in slot order (fp64).
template <typename acc_t>
__global__ void __launch_bounds__(256)
    reduce_coeff_kernel(const acc_t* __restrict__ part, int64_t nslots, int deg, int64_t E, double* __restrict__ out) {
  __shared__ double sh[8][33];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;  // k * E + e
  const bool active = i < deg * E;
  const double s = sum_slots(part + (active ? i : 0), static_cast<int64_t>(deg) * E, 0, nslots, active, sh);
  if (threadIdx.y == 0 && active) {
    const int64_t k = i / E, e = i - k * E;
    out[e * deg + k] = s;
  }
}

}  // namespace

void validate_offsets(const char* op, const c10::optional<at::Tensor>& cu, int64_t total) {
  if (!cu.has_value()) return;
  // The tensors validated lately, held weakly (the weak reference keeps a freed tensor's TensorImpl from being
  // deleted, so a new tensor never has its address) with the version they had (an in-place change is validated
  // again). Inference tensors keep no version counter (reading it raises): they are validated at every call. Not
  // seen: writes that bypass the version counter (`.data`, NumPy or DLPack aliases, a collective into the buffer);
  // the kernels read the offsets made safe by make_layout, so such a write gives wrong rows, never an access out of
  // bounds.
  struct Seen {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl;
    uint32_t version;
    int64_t total;
  };
  static std::mutex mu;
  static std::vector<Seen> seen;
  constexpr size_t kSeen = 16;
  const at::Tensor& c = *cu;
  c10::TensorImpl* impl = c.unsafeGetTensorImpl();
  const bool tracked = !c.is_inference();
  const uint32_t version = tracked ? impl->version_counter().current_version() : 0;
  if (tracked) {
    std::lock_guard<std::mutex> lock(mu);
    for (const Seen& s : seen) {
      // The address compare is safe: the entry pins its TensorImpl, and the caller holds c (no lock(), which could
      // take the GIL under the mutex).
      if (s.version == version && s.total == total && !s.impl.expired() && s.impl._unsafe_get_target() == impl)
        return;
    }
  }
  // One copy of the B + 1 offsets to the host (and so a synchronization), once per tensor.
  const at::Tensor host = c.to(at::kCPU, at::kLong).contiguous();
  checks::cu_values(op, host.data_ptr<int64_t>(), host.numel(), total);
  if (!tracked) return;
  std::lock_guard<std::mutex> lock(mu);
  if (seen.size() == kSeen) seen.erase(seen.begin());
  seen.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(c.getIntrusivePtr()), version, total});
}

Layout make_layout(const at::Tensor& h, const c10::optional<at::Tensor>& cu, const plan::ChunkPlan& pl,
                   LayoutKeep& keep, cudaStream_t stream) {
  Layout L;
  L.plan = pl;
  if (!cu.has_value()) {
    L.B = h.size(0);
    L.N = h.size(1);
    L.ncps = plan::chunks_of_len(pl, L.N);
    L.nchunks = L.B * L.ncps;
    return L;
  }
  const at::Tensor raw = cu->contiguous();
  const int64_t total = h.size(0);
  L.B = raw.size(0) - 1;
  // An upper bound of the chunks (each sequence adds at most one partial chunk, or one partial block's worth).
  L.nchunks = pl.cpb == 0 ? ceil_div(total, pl.R) + L.B : (ceil_div(total, pl.F) + L.B) * pl.cpb;
  // The kernels read the offsets made safe (chunk_offsets_kernel), int64, and the chunk offsets.
  keep.cu = at::empty({L.B + 1}, h.options().dtype(at::kLong));
  keep.off = at::empty({L.B + 1}, h.options().dtype(at::kLong));
  chunk_offsets_kernel<<<1, kOffThreads, 0, stream>>>(raw.data_ptr(), raw.scalar_type() == at::kLong, L.B, total,
                                                      pl, keep.cu.data_ptr<int64_t>(), keep.off.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  L.cu = keep.cu.data_ptr();
  L.cu64 = true;
  L.chunk_off = keep.off.data_ptr<int64_t>();
  return L;
}

void launch_chunk_scan(const double* tot, double* carry, const Layout& L, int64_t E, bool reverse,
                       cudaStream_t stream) {
  if (L.B == 0 || E == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(E, 32) * L.B));
  chunk_scan_kernel<<<grid, dim3(32, 16), 0, stream>>>(tot, carry, L, E, reverse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor reduce_coeff_grad(const at::Tensor& part, int64_t nslots, int deg, int64_t E, const at::Tensor& coeff,
                             cudaStream_t stream) {
  auto out = at::empty({E, deg}, coeff.options().dtype(at::kDouble));
  if (E > 0) {
    const dim3 grid(static_cast<unsigned>(ceil_div(static_cast<int64_t>(deg) * E, 32)));
    if (part.scalar_type() == at::kDouble) {
      reduce_coeff_kernel<double><<<grid, dim3(32, 8), 0, stream>>>(part.data_ptr<double>(), nslots, deg, E,
                                                                   out.data_ptr<double>());
    } else {
      reduce_coeff_kernel<float><<<grid, dim3(32, 8), 0, stream>>>(part.data_ptr<float>(), nslots, deg, E,
                                                                  out.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(coeff.scalar_type());
}

}  // namespace cuda
}  // namespace pom_ext
