// Shared pieces of the CUDA kernels of pom_ext.
//
// Work split. Rows of h (dense (B, N, E) or packed (total, E) with cu_seqlens)
// are cut into chunks of R rows that never cross a sequence; channel tiles of
// blockDim.x * V channels (V elements = 16 bytes per thread) cover E. A block
// is one (chunk, tile) pair, so the grid fills the GPU even for B = 1.
//  - Reductions over rows (mean, state update, grad_coeff) write one partial
//    per (chunk, row lane) to a workspace; a second kernel reduces the partials
//    of each sequence (or of everything, for grad_coeff) in a fixed order.
//  - Scans (causal, block-causal) run in three passes: chunk totals, an
//    exclusive (or, backward, suffix) scan of the totals per sequence in fp64,
//    then every chunk rescans from its carry with a Kahan-compensated sum.
// Packed layouts find a chunk's sequence by binary search over per-sequence
// chunk offsets computed on the device (no host synchronisation).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "pom_ext/checks.h"
#include "pom_ext/dispatch.h"
#include "pom_ext/library.h"
#include "pom_ext/poly_math.h"
#include "plan.h"

namespace pom_ext {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The accumulation dtype of a tensor dtype: fp64 for fp64, fp32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Kernel variants: every floating dtype x degrees 1..4 and the generic degree. POM_CUDA_ONE_VARIANT (development
// only, for quick `-Xptxas -v` compile checks: about a tenth of the compile time) keeps bfloat16 with degree 4
// and the generic degree; setup.py and CMake never set it.
#ifdef POM_CUDA_ONE_VARIANT
#define POM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
template <typename F>
void cuda_dispatch_degree(int degree, F&& f) {
  if (degree == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}
#else
#define POM_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
template <typename F>
void cuda_dispatch_degree(int degree, F&& f) {
  dispatch_degree(degree, std::forward<F>(f));
}
#endif

// Elements per 16-byte vector.
template <typename scalar_t>
struct Vec {
  static constexpr int value = static_cast<int>(16 / sizeof(scalar_t));
};

// Element strides of a row-major view: sequence (dense batch), row, channel.
struct Strides {
  int64_t b = 0, n = 0, e = 1;
};

// Sequences and their chunks (plan.h: whole blocks of R rows, or F-blocks split into chunks of at most R rows).
struct Layout {
  int64_t B = 0;                        // sequences
  int64_t N = 0;                        // dense: rows per sequence
  const void* cu = nullptr;             // packed: offsets (B + 1), int32 or int64
  bool cu64 = false;
  const int64_t* chunk_off = nullptr;   // packed: first chunk of each sequence (B + 1)
  plan::ChunkPlan plan;
  int64_t ncps = 0;                     // dense: chunks per sequence
  int64_t nchunks = 0;                  // chunks in the grid (an upper bound when packed)

  __device__ __forceinline__ int64_t cu_at(int64_t i) const {
    return cu64 ? static_cast<const int64_t*>(cu)[i] : static_cast<int64_t>(static_cast<const int32_t*>(cu)[i]);
  }
  __device__ __forceinline__ int64_t base(int64_t b) const { return cu ? cu_at(b) : 0; }
  __device__ __forceinline__ int64_t len(int64_t b) const { return cu ? cu_at(b + 1) - cu_at(b) : N; }
  __device__ __forceinline__ int64_t off(const Strides& s, int64_t b, int64_t n) const {
    return b * s.b + (base(b) + n) * s.n;
  }
  // The first chunk of sequence b.
  __device__ __forceinline__ int64_t first_chunk(int64_t b) const { return cu ? chunk_off[b] : b * ncps; }
  // Sequence and rows [n0, n1) of chunk c (n0 == n1: an empty chunk); false for a chunk past the last one.
  __device__ __forceinline__ bool chunk(int64_t c, int64_t& b, int64_t& n0, int64_t& n1) const {
    if (!cu) {
      if (ncps == 0) return false;
      b = c / ncps;
      if (b >= B) return false;
    } else if (!plan::find_sequence(chunk_off, B, c, b)) {
      return false;
    }
    plan::chunk_rows(plan, len(b), c - first_chunk(b), n0, n1);
    return true;
  }
  __device__ __forceinline__ void chunks_of(int64_t b, int64_t& c0, int64_t& c1) const {
    c0 = first_chunk(b);
    c1 = cu ? chunk_off[b + 1] : c0 + ncps;
  }
  // Split blocks (plan.cpb > 0): the global index of the first and of the last chunk of the block holding chunk
  // c of sequence b, and that block's end row.
  __device__ __forceinline__ void block_chunks(int64_t b, int64_t c, int64_t& cf, int64_t& cl, int64_t& bend) const {
    const int64_t c0 = first_chunk(b), j = plan::block_of(plan, c - c0);
    cf = c0 + plan::first_chunk_of_block(plan, j);
    cl = c0 + plan::last_chunk_of_block(plan, j);
    bend = plan::block_end(plan, len(b), j);
  }
  // Sequence and position of a global row index (dense: b * N + n; packed: the packed row).
  __device__ __forceinline__ void row(int64_t r, int64_t& b, int64_t& n) const {
    if (!cu) {
      b = r / N;
      n = r - b * N;
      return;
    }
    int64_t lo = 0, hi = B;  // cu[lo] <= r < cu[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (cu_at(mid) <= r) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    b = lo;
    n = r - cu_at(lo);
  }
};

// Coefficients (E, K) of any floating dtype, read with strides. The generic
// degree (K == 0) reads a (deg, E) table in the accumulation type instead.
template <typename acc_t>
struct CoeffArg {
  const void* raw = nullptr;
  int64_t s_e = 0, s_k = 0;
  int dtype = 0;  // 0 float32, 1 float64, 2 float16, 3 bfloat16
  const acc_t* tab = nullptr;
  int64_t E = 0;
  int deg = 0;
  math::ActGrad<acc_t> act_grad;  // the activation's derivative under the installed torch's rule

  __device__ __forceinline__ acc_t get(int64_t e, int k) const {
    const int64_t i = e * s_e + k * s_k;
    switch (dtype) {
      case 0: return static_cast<acc_t>(static_cast<const float*>(raw)[i]);
      case 1: return static_cast<acc_t>(static_cast<const double*>(raw)[i]);
      case 2: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(raw)[i]));
      default: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(raw)[i]));
    }
  }
};

// Host: the coefficient argument; `keep` holds the generic-degree table alive.
template <typename acc_t>
CoeffArg<acc_t> coeff_arg(const at::Tensor& coeff, at::Tensor& keep) {
  CoeffArg<acc_t> a;
  a.raw = coeff.data_ptr();
  a.s_e = coeff.stride(0);
  a.s_k = coeff.stride(1);
  const auto t = coeff.scalar_type();
  a.dtype = t == at::kFloat ? 0 : t == at::kDouble ? 1 : t == at::kHalf ? 2 : 3;
  a.E = coeff.size(0);
  a.deg = static_cast<int>(coeff.size(1));
  a.act_grad = math::act_grad_rule<acc_t>();
  if (a.deg > 4) {
    keep = coeff.to(c10::CppTypeToScalarType<acc_t>::value).t().contiguous();
    a.tab = keep.data_ptr<acc_t>();
  }
  return a;
}

// The coefficients of V consecutive channels e0 .. e0 + nv - 1 of one thread.
template <int K, int V, typename acc_t>
struct ChanCoeff {
  acc_t c[K > 0 ? K * V : 1];
  const acc_t* tab;
  int64_t E, e0;
  int nv, deg;

  __device__ __forceinline__ void load(const CoeffArg<acc_t>& a, int64_t e0_, int nv_) {
    tab = a.tab;
    E = a.E;
    e0 = e0_;
    nv = nv_;
    deg = a.deg;
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j) c[k * V + j] = j < nv ? a.get(e0 + j, k) : acc_t(0);
    }
  }
  __device__ __forceinline__ int degree() const { return K > 0 ? K : deg; }
  __device__ __forceinline__ acc_t poly(int j, acc_t x) const {
    if constexpr (K > 0) {
      return math::poly<K>(x, c + j, V, K);
    } else {
      return j < nv ? math::poly<0>(x, tab + e0 + j, E, deg) : acc_t(0);
    }
  }
  __device__ __forceinline__ void poly_and_slope(int j, acc_t x, acc_t& p, acc_t& dp) const {
    if constexpr (K > 0) {
      math::poly_and_slope<K>(x, c + j, V, K, p, dp);
    } else if (j < nv) {
      math::poly_and_slope<0>(x, tab + e0 + j, E, deg, p, dp);
    } else {
      p = acc_t(0);
      dp = acc_t(0);
    }
  }
};

// grad_coeff partials of V channels: registers for a fixed degree, the
// thread's own workspace slot (deg rows of stride E) for the generic degree.
template <int K, int V, typename acc_t>
struct CoeffGradAcc {
  acc_t r[K > 0 ? K * V : 1];
  acc_t* dst;
  int64_t E;
  int nv, deg;

  __device__ __forceinline__ void init(acc_t* dst_, int64_t E_, int nv_, int deg_) {
    dst = dst_;
    E = E_;
    nv = nv_;
    deg = deg_;
    if constexpr (K > 0) {
#pragma unroll
      for (int i = 0; i < K * V; ++i) r[i] = acc_t(0);
    } else {
      for (int k = 0; k < deg; ++k)
        for (int j = 0; j < nv; ++j) dst[k * E + j] = acc_t(0);
    }
  }
  // Adds s * a^(k+1) for k < degree.
  __device__ __forceinline__ void add_powers(int j, acc_t s, acc_t a) {
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        s *= a;
        r[k * V + j] += s;
      }
    } else if (j < nv) {
      for (int k = 0; k < deg; ++k) {
        s *= a;
        dst[k * E + j] += s;
      }
    }
  }
  __device__ __forceinline__ void finish() {
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (j < nv) dst[k * E + j] = r[k * V + j];
    }
  }
};

// The channel tile of this block: blockIdx.y + blockIdx.z * gridDim.y (grid_of: tiles past the y limit of
// 65535 continue in z).
__device__ __forceinline__ int64_t channel_tile() {
  return static_cast<int64_t>(blockIdx.y) + static_cast<int64_t>(blockIdx.z) * gridDim.y;
}

// This thread's V channels [e0, e0 + nv) in its block's channel tile of a width-E row; false past the last one.
template <int V>
__device__ __forceinline__ bool thread_channels(int64_t E, int64_t& e0, int& nv) {
  e0 = (channel_tile() * blockDim.x + threadIdx.x) * V;
  if (e0 >= E) return false;
  nv = E - e0 < V ? static_cast<int>(E - e0) : V;
  return true;
}

// 16 bytes as the V values of one vector, converted with bit operations on the four 32-bit words (never
// through the address of a local, which would put the vector on the stack and split its store).
template <typename scalar_t>
struct Pack;

template <>
struct Pack<float> {
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[4]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[4]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3]));
  }
};

template <>
struct Pack<double> {
  __device__ __forceinline__ static void unpack(const uint4& r, double (&x)[2]) {
    x[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    x[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  __device__ __forceinline__ static uint4 pack(const double (&x)[2]) {
    return make_uint4(static_cast<unsigned>(__double2loint(x[0])), static_cast<unsigned>(__double2hiint(x[0])),
                      static_cast<unsigned>(__double2loint(x[1])), static_cast<unsigned>(__double2hiint(x[1])));
  }
};

// Two 16-bit values per word, the first in the low half; the conversions of c10::Half and c10::BFloat16 on
// the device (round to nearest even; NaN stays NaN).
template <typename scalar_t>
struct Pack16 {
  __device__ __forceinline__ static float to_float(unsigned bits) {
    return static_cast<float>(scalar_t(static_cast<uint16_t>(bits), scalar_t::from_bits()));
  }
  __device__ __forceinline__ static unsigned to_bits(float v) { return static_cast<unsigned>(scalar_t(v).x); }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = to_float(w[i] & 0xffffu);
      x[2 * i + 1] = to_float(w[i] >> 16);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&x)[8]) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = to_bits(x[2 * i]) | (to_bits(x[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Pack<c10::Half> : Pack16<c10::Half> {};
template <>
struct Pack<c10::BFloat16> : Pack16<c10::BFloat16> {};

// The 16 bytes at channel e0 of a row (an aligned vector: `vectorizable`).
template <typename scalar_t>
__device__ __forceinline__ uint4 load_vec(const scalar_t* __restrict__ row, int64_t e0) {
  return *reinterpret_cast<const uint4*>(row + e0);
}

// V elements of one row at channel e0: one 16-byte load when `vec`, else strided scalar loads.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, int64_t e0, int64_t sE, int nv, bool vec,
                                         acc_t (&x)[V]) {
  if (vec) {
    Pack<scalar_t>::unpack(load_vec(row, e0), x);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) x[j] = j < nv ? static_cast<acc_t>(row[(e0 + j) * sE]) : acc_t(0);
  }
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ row, int64_t e0, int64_t sE, int nv, bool vec,
                                          const acc_t (&x)[V]) {
  if (vec) {
    // __stwb (st.global.wb.v4): a plain assignment of the uint4 was split into four 4-byte stores in the scans.
    __stwb(reinterpret_cast<uint4*>(row + e0), Pack<scalar_t>::pack(x));
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (j < nv) row[(e0 + j) * sE] = static_cast<scalar_t>(x[j]);
  }
}

// fn(n, x) for rows n = first, first + step, ... below end, x the V channels at e0 of row(n) (a pointer to the
// row). Vectorizable rows are loaded U at a time, kept packed (16 bytes each) until their turn, so U loads are in
// flight per thread; strided rows one at a time.
template <int V, int U, typename scalar_t, typename acc_t, typename RowPtr, typename Fn>
__device__ __forceinline__ void for_rows_step(RowPtr&& row, int64_t first, int64_t end, int64_t step, int64_t e0,
                                              int64_t sE, int nv, bool vec, Fn&& fn) {
  int64_t n = first;
  if (vec) {
    for (; n + (U - 1) * step < end; n += U * step) {
      uint4 r[U];
#pragma unroll
      for (int u = 0; u < U; ++u) r[u] = load_vec<scalar_t>(row(n + u * step), e0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        acc_t x[V];
        Pack<scalar_t>::unpack(r[u], x);
        fn(n + u * step, x);
      }
    }
  }
  for (; n < end; n += step) {
    acc_t x[V];
    load_row<V>(row(n), e0, sE, nv, vec, x);
    fn(n, x);
  }
}

// ---- host helpers ----

inline Strides strides_of(const at::Tensor& t, bool packed) {
  Strides s;
  if (packed) {
    s.b = 0;
    s.n = t.stride(0);
    s.e = t.dim() > 1 ? t.stride(1) : 1;
  } else {
    s.b = t.stride(0);
    s.n = t.stride(1);
    s.e = t.dim() > 2 ? t.stride(2) : 1;
  }
  return s;
}

// 16-byte vector access is valid: channels contiguous, every row start aligned.
template <typename scalar_t>
bool vectorizable(const void* ptr, const Strides& s, int64_t E) {
  constexpr int V = Vec<scalar_t>::value;
  return s.e == 1 && E % V == 0 && s.n % V == 0 && s.b % V == 0 &&
         reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

int sm_count(int device);

// Grid of `blocks` x `tiles` channel tiles (channel_tile()): tiles in y up to 65535, then in z.
inline dim3 grid_of(int64_t blocks, int64_t tiles) {
  const int64_t y = std::min<int64_t>(std::max<int64_t>(tiles, 1), 65535);
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(y), static_cast<unsigned>(ceil_div(tiles, y)));
}

// Threads across channels for a width of E channels at V per thread (32..max_tx).
inline int threads_x(int64_t E, int V, int max_tx) {
  const int64_t need = ceil_div(ceil_div(E, V), 32) * 32;
  return static_cast<int>(std::max<int64_t>(32, std::min<int64_t>(max_tx, need)));
}

// Rows per chunk: enough chunks that tiles x chunks fill about one wave of
// `blocks_per_sm` blocks on every SM; at least min_rows, a multiple of `multiple`,
// and at most max_rows (rounded down to a multiple, never below one multiple) so
// that fp32 partial sums stay short.
inline int64_t rows_per_chunk(int64_t avg_len, int64_t B, int64_t tiles, int64_t min_rows, int64_t multiple,
                              int device, int blocks_per_sm, int64_t max_rows) {
  const int64_t target = static_cast<int64_t>(sm_count(device)) * blocks_per_sm;
  const int64_t want = std::max<int64_t>(1, target / std::max<int64_t>(1, B * tiles));
  int64_t R = std::max<int64_t>(min_rows, ceil_div(std::max<int64_t>(avg_len, 1), want));
  R = std::min(R, max_rows);
  return std::max<int64_t>(multiple, R / multiple * multiple);
}

// Device buffers a packed Layout points into.
struct LayoutKeep {
  at::Tensor off, cu;
};

// Checks the values of cu_seqlens (0 first, non-decreasing, `total` last) with an ordinary error naming the
// argument, never a device assert (which would leave the process's CUDA context unusable). Costs one copy of the
// B + 1 offsets to the host, a synchronization, the first time a cu_seqlens tensor is seen (and after an in-place
// change); later calls with the same tensor (every layer of a model, the backward) cost nothing.
void validate_offsets(const char* op, const c10::optional<at::Tensor>& cu, int64_t total);

// Layout of h (dense or packed) cut into the chunks of plan `pl` (chunks of R rows: plan::ChunkPlan{R}). For
// packed inputs this launches a kernel computing the per-sequence chunk offsets into `keep`.
Layout make_layout(const at::Tensor& h, const c10::optional<at::Tensor>& cu, const plan::ChunkPlan& pl,
                   LayoutKeep& keep, cudaStream_t stream);

// carry[c] (nchunks x E, fp64) = sum of tot over the chunks before c in its sequence
// (after c when reverse). tot of the last (first, when reverse) chunk of a sequence is never read.
void launch_chunk_scan(const double* tot, double* carry, const Layout& L, int64_t E, bool reverse,
                       cudaStream_t stream);

// grad_coeff (E, deg) in coeff's dtype from partials (nslots, deg, E) of the accumulation
// type, summed over the slots in order.
at::Tensor reduce_coeff_grad(const at::Tensor& part, int64_t nslots, int deg, int64_t E, const at::Tensor& coeff,
                             cudaStream_t stream);

// Sum over slots [s0, s1) of v[s * stride] in fp64, by a (32, 8) block: lane y sums
// a contiguous segment, then the segments are added in order. Valid in threadIdx.y == 0.
template <typename T>
__device__ __forceinline__ double sum_slots(const T* __restrict__ v, int64_t stride, int64_t s0, int64_t s1, bool active,
                                            double (*sh)[33]) {
  const int64_t n = s1 - s0;
  const int64_t seg = (n + blockDim.y - 1) / blockDim.y;
  const int64_t a = s0 + threadIdx.y * seg;
  const int64_t b = a + seg < s1 ? a + seg : s1;
  double s = 0.0;
  if (active)
    for (int64_t i = a; i < b; ++i) s += static_cast<double>(v[i * stride]);
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.y == 0)
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) t += sh[y][threadIdx.x];
  __syncthreads();
  return t;
}

}  // namespace cuda
}  // namespace pom_ext
