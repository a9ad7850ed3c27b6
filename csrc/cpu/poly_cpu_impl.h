// CPU kernels of the pom_ext ops, written once and compiled once per instruction
// set (poly_cpu_isa_base.h, poly_cpu_isa_avx2.h, poly_cpu_isa_avx512.h) into the namespace POM_CPU_ARCH;
// register_cpu.cpp picks one at run time. Include only after every header it
// needs, so that the instruction-set pragma of a TU applies to this code alone.
//
// Each instruction set's kernels are compiled in four translation units (poly_cpu_<isa>_<part>.cpp), so that a
// build compiles them in parallel (the one unit they were took 5-8 minutes of one core per instruction set).
// POM_CPU_PART says which entry points a unit defines; the ops that share a scan template are in the same part, so
// no template is instantiated twice. Everything else here is a template, inline or internal, so each part may hold
// a copy.
//   1  eval_mean        poly_eval, poly_mean, poly_mean_rope, the state ops (and their backwards)
//   2  causal           the causal forwards: plain, weighted, gated, rope, gated rope
//   3  causal_backward  the causal backwards: plain, weighted, gated
//   4  rope_backward    the rope causal backwards: plain, gated
//
// Layout: every op walks rows of h, either dense (B, N, E) or packed (total, E)
// with per-sequence offsets, through one `Rows` descriptor that carries element
// strides, so strided views run without copies. Each row is loaded into an
// fp32 (fp64 for double) buffer and the channel loops compile to vector code.
//
// Work split (results are bitwise reproducible run to run at a fixed thread count):
//  - mean-type reductions (mean, weighted mean, state update): tasks are
//    (sequence, chunk of rows) over all channels; each writes fp64 partial sums
//    that are reduced in task order (a two-stage reduction, no atomics);
//  - causal and block-causal: tasks are (sequence, block of channels) and walk the sequence with a
//    Kahan-compensated running sum. A block is the whole row (up to kEBWhole channels) when the sequences alone
//    share the rows evenly among the threads (task_channels): a task that reads part of each row restarts the
//    hardware prefetchers at every row (1 x 8192 x 1024 fp32, one thread: causal forward 4.95 ms in blocks of
//    512, 2.05 ms whole, about as fast per byte as 1 x 16384 x 512). Else blocks of kEB channels give the
//    threads more tasks, and when there are still fewer tasks than threads the sequence is cut into chunks
//    (aligned to the block size): a first pass sums each chunk, the carries are prefix-summed in fp64, and a
//    second pass runs every chunk from its carry.
//    The backward pass is the same scan in reverse.
//  - grad_coeff is accumulated per task (fp32 for kFlushRows rows, then fp64)
//    and reduced in task order.
// Forward passes read rows in memory order with no software prefetch: the hardware prefetchers follow these
// streams, and explicit prefetching of the rows ahead measured slower (causal forward 4.2 vs 6-8 ms at
// 2x16384x512). The token-causal backward walks rows from the end: it prefetches the rows kPrefetchRows ahead
// in its walk, inputs and output (2x16384x512 fp32, AVX-512 Xeon: 12.3 -> 10.4 ms; gated 40 -> 35 ms).
#ifndef POM_CPU_ARCH
#error "define POM_CPU_ARCH before including poly_cpu_impl.h"
#endif
#if !defined(POM_CPU_PART) || POM_CPU_PART < 1 || POM_CPU_PART > 4
#error "define POM_CPU_PART (1-4) before including poly_cpu_impl.h"
#endif

namespace pom_ext {
namespace cpu {
namespace POM_CPU_ARCH {

constexpr int64_t kEB = 512;             // channels per causal task, unless task_channels walks whole rows
constexpr int64_t kEBWhole = 4096;       // the widest rows walked whole
constexpr int64_t kMinSplitRows = 2048;  // never cut a sequence into chunks shorter than this
constexpr int64_t kFlushRows = 256;      // fp32 partial sums are flushed into fp64 this often
constexpr int64_t kMaxRowChunks = 64;    // row chunks per sequence for mean-type reductions
constexpr int64_t kMinChunkRows = 64;
constexpr int kScanRows = 4;             // rows per fused pass of the token-causal backward scan
constexpr int64_t kPrefetchRows = 16;    // how far ahead the token-causal backward scan prefetches rows

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread scratch: `count` rows of at least `width` values (zeroed), each starting on a 64-byte cache line,
// rows one line more apart than their width. A std::vector is only 16-byte aligned: a buffer that is not
// line-aligned splits every 64-byte vector access of the channel loops across two lines; and rows a power of two
// apart put the same channel of every buffer at the same offset within a 4 KiB page, where the loads of one
// buffer wait on the stores to another (AVX-512 EPYC, token-causal rope forward, 1 x 16384 x 512 fp32: 5.3 ms
// with a vector, depending on where malloc put it, 3.4 ms aligned and staggered).
template <typename acc_t>
struct RowBufs {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(acc_t));
  int64_t W;  // the row stride: width rounded up to whole lines, plus one line
  std::vector<acc_t> mem;
  acc_t* base;
  RowBufs(int count, int64_t width)
      : W((ceil_div(std::max<int64_t>(width, 1), kLine) + 1) * kLine), mem(static_cast<size_t>(count * W + kLine)) {
    const auto addr = reinterpret_cast<uintptr_t>(mem.data());
    base = mem.data() + (64 - addr % 64) % 64 / sizeof(acc_t);
  }
  acc_t* operator[](int i) { return base + i * W; }
};

// Rows of a dense (B, N, ...) tensor, or of a packed (total, ...) tensor with offsets cu.
struct Rows {
  int64_t sB = 0, sN = 0, sE = 1, N = 0;
  const int64_t* cu = nullptr;
  int64_t start(int64_t b) const { return cu ? cu[b] : 0; }
  int64_t len(int64_t b) const { return cu ? cu[b + 1] - cu[b] : N; }
  int64_t off(int64_t b, int64_t n) const { return b * sB + (start(b) + n) * sN; }
};

inline Rows rows_of(const at::Tensor& t, const int64_t* cu) {
  Rows r;
  r.cu = cu;
  const int64_t d = cu ? 0 : 1;  // dim of the sequence index
  if (!cu) {
    r.sB = t.stride(0);
    r.N = t.size(1);
  }
  r.sN = t.stride(d);
  r.sE = t.dim() > d + 1 ? t.stride(d + 1) : 1;
  return r;
}

// Rotary positions of the rope ops (checks::rope): E = 2 P S channels in S sections; pair i of section s joins
// channels 2Ps + i and 2Ps + P + i and turns by the angle of the tables' row pos(b, n, s), column i.
template <typename acc_t>
inline void turn(acc_t* __restrict a, acc_t* __restrict b, const acc_t* __restrict c, const acc_t* __restrict s,
                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = a[i], y = b[i];
    a[i] = x * c[i] - y * s[i];
    b[i] = y * c[i] + x * s[i];
  }
}

// The transposed turn (the gradient of turn): (oa, ob) = R^T (a, b).
template <typename acc_t>
inline void turn_back(const acc_t* __restrict a, const acc_t* __restrict b, acc_t* __restrict oa,
                      acc_t* __restrict ob, const acc_t* __restrict c, const acc_t* __restrict s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    oa[i] = a[i] * c[i] + b[i] * s[i];
    ob[i] = b[i] * c[i] - a[i] * s[i];
  }
}

template <typename acc_t>
struct Rotation {
  const acc_t* cos = nullptr;
  const acc_t* sin = nullptr;
  int64_t P = 0, S = 0;
  const int64_t* pos = nullptr;
  Rows pr;  // rows of the positions
  // Offset of the table row of (sequence b, row n, section s).
  int64_t row(int64_t b, int64_t n, int64_t s) const { return pos[pr.off(b, n) + s * pr.sE] * P; }
  // p = R p over a whole row of E channels.
  void apply(int64_t b, int64_t n, acc_t* p) const {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = row(b, n, s);
      turn(p + 2 * P * s, p + 2 * P * s + P, cos + r, sin + r, P);
    }
  }
  // out = R^T g over a whole row.
  void apply_back(int64_t b, int64_t n, const acc_t* g, acc_t* out) const {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = row(b, n, s), o = 2 * P * s;
      turn_back(g + o, g + o + P, out + o, out + o + P, cos + r, sin + r, P);
    }
  }
};

template <typename scalar_t, typename acc_t>
inline void load(const scalar_t* __restrict p, int64_t s, int64_t n, acc_t* __restrict out) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(p[i * s]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict p, int64_t n, const acc_t* __restrict in) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(in[i]);
}

// A row as acc_t values: the tensor's memory itself when it already is (contiguous, same type),
// else `buf` filled by a converting load.
template <typename scalar_t, typename acc_t>
inline const acc_t* in_row(const scalar_t* p, int64_t s, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (s == 1) return p;
  }
  load(p, s, n, buf);
  return buf;
}

// Where to compute an output row (always contiguous): in place when the types agree, else in
// `buf`, which commit_row then converts into the tensor.
template <typename scalar_t, typename acc_t>
inline acc_t* out_row(scalar_t* p, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    return buf;
  }
}

template <typename scalar_t, typename acc_t>
inline void commit_row(scalar_t* p, int64_t n, const acc_t* buf) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) store(p, n, buf);
}

template <typename acc_t>
inline void flush(acc_t* __restrict f, double* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    d[i] += static_cast<double>(f[i]);
    f[i] = acc_t(0);
  }
}

// Prefetch the cache lines of n contiguous elements at p into L2 (prefetcht1). Used by the reverse scan,
// which walks rows from the end of a sequence to its start: the hardware prefetchers follow ascending streams
// within a page and fall behind a descending walk of rows. Rows about to be written are fetched the same way,
// ahead of the read that a store to a missing line makes.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// (E, K) coefficients of any floating dtype -> (K, E) table in the accumulation type.
template <typename acc_t>
std::vector<acc_t> coeff_table(const at::Tensor& coeff) {
  at::Tensor t = coeff.detach().to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).t().contiguous();
  return std::vector<acc_t>(t.data_ptr<acc_t>(), t.data_ptr<acc_t>() + t.numel());
}

// p = poly(act(x)) for one row of n channels starting at channel e0.
template <int K, typename acc_t>
inline void poly_row(const acc_t* __restrict x, acc_t* __restrict p, const acc_t* __restrict cT, int64_t E,
                     int64_t e0, int64_t n, int deg) {
  for (int64_t e = 0; e < n; ++e) p[e] = math::poly<K>(math::act(x[e]), cT + e0 + e, E, deg);
}

// One row of a forward scan: (run, comp) += p(x) (Kahan), w * p(x) when WEIGHTED; with OUT also
// o = (run - comp) * inv.
template <int K, bool OUT, bool WEIGHTED = false, typename acc_t>
inline void scan_row(const acc_t* __restrict x, acc_t* __restrict run, acc_t* __restrict comp, acc_t* __restrict o,
                     acc_t inv, const acc_t* __restrict cT, int64_t E, int64_t e0, int64_t n, int deg,
                     acc_t w = acc_t(1)) {
  for (int64_t e = 0; e < n; ++e) {
    const acc_t pv = math::poly<K>(math::act(x[e]), cT + e0 + e, E, deg);
    math::kahan_add(run[e], comp[e], WEIGHTED ? w * pv : pv);
    if (OUT) o[e] = (run[e] - comp[e]) * inv;
  }
}

// Backward of one row of n channels: gx = g * s * dp/dh and f[k] += (g if G_IN_F else 1) * s * act^(k+1);
// with WANT_P, p receives poly(act(x)).
template <int K, bool G_IN_F, bool WANT_P, typename acc_t>
inline void poly_row_backward(const acc_t* __restrict x, const acc_t* __restrict g, acc_t s, acc_t* __restrict gx,
                              acc_t* __restrict f, acc_t* __restrict p, const acc_t* __restrict cT, int64_t E,
                              int64_t e0, int64_t n, int deg, math::ActGrad<acc_t> ag) {
  for (int64_t e = 0; e < n; ++e) {
    const acc_t u = x[e];
    const acc_t a = math::act(u);
    acc_t pv, dp;
    math::poly_and_slope<K>(a, cT + e0 + e, E, deg, pv, dp);
    gx[e] = g[e] * s * ag(u) * dp;
    acc_t pw = G_IN_F ? g[e] * s : s;
    POM_UNROLL
    for (int k = 0; k < math::degree_of<K>(deg); ++k) {
      pw *= a;
      f[k * n + e] += pw;
    }
    if (WANT_P) p[e] = pv;
  }
}

// R consecutive rows of the reverse scan of a token-causal backward, fused, rows in scan order (row i is
// the one before row i - 1 in the sequence): ghat_i = g_i (* s_i when GATED) * inv_i enters the Kahan suffix
// sum (run, comp), and the element backward runs with the sum (times the row's weight w_i when WEIGHTED):
// gx_i = (run - comp) * dp/dh(x_i), f[k] += sum_i (run - comp)_i * act(x_i)^(k+1). The running sums and f are
// read and written once per R rows (R = 1: one row).
template <int K, bool GATED, int R, bool WEIGHTED, typename acc_t>
inline void scan_rows_backward(const acc_t* const* x, const acc_t* const* g, const acc_t* const* s,
                               const acc_t* inv, const acc_t* w, acc_t* __restrict run, acc_t* __restrict comp,
                               acc_t* const* gx, acc_t* __restrict f, const acc_t* __restrict cT, int64_t E,
                               int64_t e0, int64_t n, int deg, math::ActGrad<acc_t> ag) {
#pragma GCC ivdep
  for (int64_t e = 0; e < n; ++e) {
    acc_t r = run[e], c = comp[e];
    acc_t gb[R], a[R];
    for (int i = 0; i < R; ++i) {
      acc_t ge = g[i][e];
      if constexpr (GATED) ge *= s[i][e];
      math::kahan_add(r, c, ge * inv[i]);
      gb[i] = r - c;
      if constexpr (WEIGHTED) gb[i] *= w[i];
      const acc_t u = x[i][e];
      a[i] = math::act(u);
      acc_t pv, dp;
      math::poly_and_slope<K>(a[i], cT + e0 + e, E, deg, pv, dp);
      gx[i][e] = gb[i] * ag(u) * dp;
    }
    run[e] = r;
    comp[e] = c;
    POM_UNROLL
    for (int k = 0; k < math::degree_of<K>(deg); ++k) {
      acc_t sum = acc_t(0);
      for (int i = 0; i < R; ++i) {
        gb[i] *= a[i];
        sum += gb[i];
      }
      f[k * n + e] += sum;
    }
  }
}

// Sum of grad_coeff partials (tasks x deg x width, fp64) in task order into (E, K).
inline at::Tensor reduce_coeff_grad(const std::vector<double>& part, const std::vector<int64_t>& e0s,
                                    const std::vector<int64_t>& widths, int deg, int64_t E, const at::Tensor& coeff) {
  std::vector<double> acc(static_cast<size_t>(E) * deg, 0.0);
  size_t pos = 0;
  for (size_t i = 0; i < e0s.size(); ++i) {
    const int64_t w = widths[i];
    for (int k = 0; k < deg; ++k)
      for (int64_t e = 0; e < w; ++e) acc[(e0s[i] + e) * deg + k] += part[pos + k * w + e];
    pos += static_cast<size_t>(deg) * w;
  }
  auto out = at::empty({E, deg}, coeff.options().dtype(at::kDouble).device(at::kCPU));
  std::copy(acc.begin(), acc.end(), out.data_ptr<double>());
  return out.to(coeff.options());
}

// Packed offsets as a host int64 vector, validated.
inline std::vector<int64_t> host_offsets(const char* op, const c10::optional<at::Tensor>& cu, int64_t total) {
  if (!cu.has_value()) return {};
  auto c = cu->to(at::kLong).contiguous();
  std::vector<int64_t> v(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  checks::cu_values(op, v.data(), static_cast<int64_t>(v.size()), total);
  return v;
}

// ---------------------------------------------------------------------------
// poly_eval: element-wise p = poly(act(h)).
// ---------------------------------------------------------------------------

// Rows of (..., E) flattened to (M, E); the row stride is kept when the leading
// dims collapse, otherwise the input is made contiguous (this op is not on a hot path).
inline at::Tensor as_matrix(const at::Tensor& t) {
  const int64_t E = t.size(-1);
  const int64_t M = E == 0 ? 0 : t.numel() / E;
  if (t.dim() == 1) return t.view({1, E});
  auto m = t.reshape({M, E});
  return m;
}

template <typename scalar_t, int K>
void eval_forward(const at::Tensor& h2, const std::vector<at::opmath_type<scalar_t>>& cT, int deg, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h2.size(0), E = h2.size(1);
  const scalar_t* h = h2.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t sM = h2.stride(0), sE = h2.stride(1);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(E, 1)), [&](int64_t m0, int64_t m1) {
    RowBufs<acc_t> buf(2, E);
    acc_t *x = buf[0], *p = buf[1];
    for (int64_t m = m0; m < m1; ++m) {
      acc_t* pr = out_row(o + m * E, p);
      poly_row<K>(in_row(h + m * sM, sE, E, x), pr, cT.data(), E, 0, E, deg);
      commit_row(o + m * E, E, pr);
    }
  });
}

template <typename scalar_t, int K>
void eval_backward(const at::Tensor& g2, const at::Tensor& h2, const std::vector<at::opmath_type<scalar_t>>& cT,
                   int deg, at::Tensor& gh, std::vector<double>& part, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const math::ActGrad<acc_t> ag = math::act_grad_rule<acc_t>();
  const int64_t M = h2.size(0), E = h2.size(1);
  const int64_t R = ceil_div(M, chunks);
  const scalar_t* hp = h2.data_ptr<scalar_t>();
  const scalar_t* gp = g2.data_ptr<scalar_t>();
  scalar_t* ghp = gh.data_ptr<scalar_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    RowBufs<acc_t> buf(3, E), fbuf(1, deg * E);
    acc_t *x = buf[0], *g = buf[1], *gx = buf[2], *f = fbuf[0];
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(f, f + deg * E, acc_t(0));
      double* d = part.data() + static_cast<size_t>(c) * deg * E;
      const int64_t m1 = std::min(M, (c + 1) * R);
      for (int64_t m = c * R; m < m1; ++m) {
        const acc_t* xr = in_row(hp + m * h2.stride(0), h2.stride(1), E, x);
        const acc_t* gr = in_row(gp + m * g2.stride(0), g2.stride(1), E, g);
        acc_t* gxr = out_row(ghp + m * E, gx);
        poly_row_backward<K, true, false, acc_t>(xr, gr, acc_t(1), gxr, f, nullptr, cT.data(), E, 0, E, deg, ag);
        commit_row(ghp + m * E, E, gxr);
        if ((m - c * R + 1) % kFlushRows == 0) flush(f, d, deg * E);
      }
      flush(f, d, deg * E);
    }
  });
}

#if POM_CPU_PART == 1
at::Tensor poly_eval_cpu(const at::Tensor& h, const at::Tensor& coeff) {
  checks::eval_args("pom_ext::poly_eval", h, coeff);
  const int deg = static_cast<int>(coeff.size(1));
  auto h2 = as_matrix(h);
  auto out = pooled_empty(h2.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_eval_cpu", [&] {
    auto cT = coeff_table<at::opmath_type<scalar_t>>(coeff);
    dispatch_degree(deg, [&](auto Kc) { eval_forward<scalar_t, decltype(Kc)::value>(h2, cT, deg, out); });
  });
  return out.view(h.sizes());
}

std::tuple<at::Tensor, at::Tensor> poly_eval_backward_cpu(const at::Tensor& grad_p, const at::Tensor& h,
                                                          const at::Tensor& coeff) {
  checks::eval_backward_args("pom_ext::poly_eval_backward", grad_p, h, coeff);
  const int deg = static_cast<int>(coeff.size(1));
  auto h2 = as_matrix(h);
  auto g2 = as_matrix(grad_p.to(h.scalar_type()));
  auto gh = pooled_empty(h2.sizes(), h.options());
  const int64_t M = h2.size(0), E = h2.size(1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxRowChunks, ceil_div(M, kMinChunkRows)));
  std::vector<double> part(static_cast<size_t>(chunks) * deg * E, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_eval_backward_cpu", [&] {
    auto cT = coeff_table<at::opmath_type<scalar_t>>(coeff);
    dispatch_degree(deg, [&](auto Kc) {
      eval_backward<scalar_t, decltype(Kc)::value>(g2, h2, cT, deg, gh, part, chunks);
    });
  });
  std::vector<int64_t> e0s(chunks, 0), widths(chunks, E);
  return {gh.view(h.sizes()), reduce_coeff_grad(part, e0s, widths, deg, E, coeff)};
}
#endif

// ---------------------------------------------------------------------------
// Mean-type reductions: weighted/unweighted mean over a sequence, state update.
// ---------------------------------------------------------------------------

struct RowChunk {
  int64_t b, n0, n1;
};

// Every sequence gets at least one (possibly empty) chunk; first[b] indexes its first.
inline std::vector<RowChunk> row_chunks(const Rows& r, int64_t B, std::vector<int64_t>& first) {
  std::vector<RowChunk> out;
  first.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    first[b] = static_cast<int64_t>(out.size());
    const int64_t L = r.len(b);
    const int64_t nc = std::max<int64_t>(1, std::min<int64_t>(kMaxRowChunks, ceil_div(L, kMinChunkRows)));
    const int64_t R = std::max<int64_t>(1, ceil_div(L, nc));
    for (int64_t n0 = 0; n0 < std::max<int64_t>(L, 1); n0 += R) out.push_back({b, n0, std::min(L, n0 + R)});
  }
  first[B] = static_cast<int64_t>(out.size());
  return out;
}

// Partial sums S[c] = sum_n w p (fp64, chunks x E) and W[c] = sum_n w; with rot, of the rotated p.
template <typename scalar_t, int K>
void mean_partials(const scalar_t* h, const Rows& hr, int64_t E, const std::vector<at::opmath_type<scalar_t>>& cT,
                   int deg, const at::opmath_type<scalar_t>* w, const Rows& wr, const std::vector<RowChunk>& chunks,
                   std::vector<double>& S, std::vector<double>& W,
                   const Rotation<at::opmath_type<scalar_t>>* rot = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  S.assign(chunks.size() * E, 0.0);
  W.assign(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    RowBufs<acc_t> buf(3, E);
    acc_t *x = buf[0], *p = buf[1], *f = buf[2];
    for (int64_t c = c0; c < c1; ++c) {
      const RowChunk& ch = chunks[c];
      std::fill(f, f + E, acc_t(0));
      double* s = S.data() + c * E;
      double wsum = 0;
      for (int64_t n = ch.n0; n < ch.n1; ++n) {
        const acc_t wn = w ? w[wr.off(ch.b, n)] : acc_t(1);
        poly_row<K>(in_row(h + hr.off(ch.b, n), hr.sE, E, x), p, cT.data(), E, 0, E, deg);
        if (rot) rot->apply(ch.b, n, p);
        for (int64_t e = 0; e < E; ++e) f[e] += wn * p[e];
        wsum += wn;
        if ((n - ch.n0 + 1) % kFlushRows == 0) flush(f, s, E);
      }
      flush(f, s, E);
      W[c] = wsum;
    }
  });
}

// grad_h = gbar[b] * w * dp/dh over all rows; grad_coeff partials; optional grad_w.
// gdotH[b] = sum_e gbar[b, e] H[b, e] (only read when grad_w is requested). With rot, gbar is the gradient
// reaching the rotated p: each row takes R^T gbar.
template <typename scalar_t, int K>
void mean_backward(const scalar_t* h, const Rows& hr, int64_t E, const std::vector<at::opmath_type<scalar_t>>& cT,
                   int deg, const at::opmath_type<scalar_t>* w, const Rows& wr,
                   const std::vector<RowChunk>& chunks, const std::vector<at::opmath_type<scalar_t>>& gbar,
                   const std::vector<at::opmath_type<scalar_t>>& gdotH, scalar_t* gh, const Rows& ghr,
                   at::opmath_type<scalar_t>* gw, std::vector<double>& part,
                   const Rotation<at::opmath_type<scalar_t>>* rot = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const math::ActGrad<acc_t> ag = math::act_grad_rule<acc_t>();
  part.assign(chunks.size() * deg * E, 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    RowBufs<acc_t> buf(4, E), fbuf(1, deg * E);
    acc_t *x = buf[0], *gx = buf[1], *p = buf[2], *gt = buf[3], *f = fbuf[0];
    for (int64_t c = c0; c < c1; ++c) {
      const RowChunk& ch = chunks[c];
      const acc_t* g = gbar.data() + ch.b * E;
      double* d = part.data() + static_cast<size_t>(c) * deg * E;
      std::fill(f, f + deg * E, acc_t(0));
      auto drain = [&] {
        if (rot) {  // f holds the gradient itself (it varies by row)
          flush(f, d, deg * E);
          return;
        }
        for (int k = 0; k < deg; ++k)
          for (int64_t e = 0; e < E; ++e) {
            d[k * E + e] += static_cast<double>(f[k * E + e]) * static_cast<double>(g[e]);
            f[k * E + e] = acc_t(0);
          }
      };
      for (int64_t n = ch.n0; n < ch.n1; ++n) {
        const acc_t wn = w ? w[wr.off(ch.b, n)] : acc_t(1);
        const acc_t* xr = in_row(h + hr.off(ch.b, n), hr.sE, E, x);
        acc_t* gxr = out_row(gh + ghr.off(ch.b, n), gx);
        if (rot) {
          rot->apply_back(ch.b, n, g, gt);
          if (gw) {
            poly_row_backward<K, true, true, acc_t>(xr, gt, wn, gxr, f, p, cT.data(), E, 0, E, deg, ag);
            rot->apply(ch.b, n, p);
          } else {
            poly_row_backward<K, true, false, acc_t>(xr, gt, wn, gxr, f, nullptr, cT.data(), E, 0, E, deg, ag);
          }
        } else if (gw) {
          poly_row_backward<K, false, true, acc_t>(xr, g, wn, gxr, f, p, cT.data(), E, 0, E, deg, ag);
        } else {
          poly_row_backward<K, false, false, acc_t>(xr, g, wn, gxr, f, nullptr, cT.data(), E, 0, E, deg, ag);
        }
        commit_row(gh + ghr.off(ch.b, n), E, gxr);
        if (gw) {
          acc_t dot = 0;
          for (int64_t e = 0; e < E; ++e) dot += g[e] * p[e];
          gw[wr.off(ch.b, n)] = dot - gdotH[ch.b];
        }
        if ((n - ch.n0 + 1) % kFlushRows == 0) drain();
      }
      drain();
    }
  });
}

// Weights converted once to the accumulation dtype (a (B, N) tensor, not on the hot path).
inline at::Tensor weight_as(const c10::optional<at::Tensor>& weight, at::ScalarType acc) {
  return weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
}

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The arguments of the rope ops as the kernels read them: the tables in the accumulation dtype, contiguous,
// and the positions as int64 (B, N, S) (a broadcast view when given as (N, S)) or (total, S), every value checked.
struct RopeTensors {
  at::Tensor cos, sin, pos;
  at::Tensor gate_cos, gate_sin;  // the gated rope op's gate tables (L, Pg), when set by gate()
  int64_t P = 0, S = 0;
  at::ScalarType acc;
  RopeTensors(const char* op, const at::Tensor& h, const at::Tensor& cos_, const at::Tensor& sin_,
              const at::Tensor& positions, const c10::optional<at::Tensor>& cu)
      : acc(h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) {
    cos = cos_.to(acc).contiguous();
    sin = sin_.to(acc).contiguous();
    P = cos.size(1);
    S = h.size(-1) / (2 * P);
    pos = positions.to(at::kLong);
    if (!cu.has_value() && pos.dim() == 2) pos = pos.unsqueeze(0).expand({h.size(0), h.size(1), S});
    if (pos.numel() > 0) {
      auto mm = at::aminmax(pos);
      checks::rope_positions(op, std::get<0>(mm).item<int64_t>(), std::get<1>(mm).item<int64_t>(), cos.size(0));
    }
  }
  void gate(const at::Tensor& c, const at::Tensor& s) {
    gate_cos = c.to(acc).contiguous();
    gate_sin = s.to(acc).contiguous();
  }
  // The rotation by cos, sin (or, with gate, by the gate tables) at the positions.
  template <typename acc_t>
  Rotation<acc_t> rotation(const int64_t* cu, bool gate = false) const {
    const at::Tensor& c = gate ? gate_cos : cos;
    Rotation<acc_t> r;
    r.cos = c.data_ptr<acc_t>();
    r.sin = (gate ? gate_sin : sin).data_ptr<acc_t>();
    r.P = c.size(1);
    r.S = S;
    r.pos = pos.data_ptr<int64_t>();
    r.pr = rows_of(pos, cu);
    return r;
  }
};

inline at::Tensor mean_op(const char* op, const at::Tensor& h, const at::Tensor& coeff,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens,
                          const RopeTensors* rope) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  auto cu = host_offsets(op, cu_seqlens, h.size(0));
  const Rows hr = rows_of(h, cu_seqlens ? cu.data() : nullptr);
  auto wt = weight_as(weight, acc_type_of(h.scalar_type()));
  const Rows wr = weight.has_value() ? rows_of(wt, cu_seqlens ? cu.data() : nullptr) : Rows{};
  std::vector<int64_t> first;
  auto chunks = row_chunks(hr, B, first);
  auto H = at::empty({B, E}, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_mean_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    std::vector<double> S, W;
    const acc_t* w = weight.has_value() ? wt.data_ptr<acc_t>() : nullptr;
    Rotation<acc_t> rot;
    if (rope) rot = rope->rotation<acc_t>(cu_seqlens ? cu.data() : nullptr);
    dispatch_degree(deg, [&](auto Kc) {
      mean_partials<scalar_t, decltype(Kc)::value>(h.data_ptr<scalar_t>(), hr, E, cT, deg, w, wr, chunks, S, W,
                                                   rope ? &rot : nullptr);
    });
    scalar_t* o = H.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      double wsum = 0;
      std::vector<double> s(E, 0.0);
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        wsum += W[c];
        for (int64_t e = 0; e < E; ++e) s[e] += S[c * E + e];
      }
      for (int64_t e = 0; e < E; ++e) o[b * E + e] = static_cast<scalar_t>(wsum != 0 ? s[e] / wsum : 0.0);
    }
  });
  return H;
}

#if POM_CPU_PART == 1
at::Tensor poly_mean_cpu(const at::Tensor& h, const at::Tensor& coeff, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_mean";
  checks::mean_args(op, h, coeff, weight, cu_seqlens);
  return mean_op(op, h, coeff, weight, cu_seqlens, nullptr);
}
#endif

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> mean_backward_op(
    const char* op, const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad,
    const RopeTensors* rope) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  auto cu = host_offsets(op, cu_seqlens, h.size(0));
  const int64_t* cup = cu_seqlens ? cu.data() : nullptr;
  const Rows hr = rows_of(h, cup);
  const at::ScalarType acc = acc_type_of(h.scalar_type());
  auto wt = weight_as(weight, acc);
  const Rows wr = weight.has_value() ? rows_of(wt, cup) : Rows{};
  std::vector<int64_t> first;
  auto chunks = row_chunks(hr, B, first);
  auto gh = pooled_empty(h.sizes(), h.options());
  const Rows ghr = rows_of(gh, cup);
  at::Tensor gw = weight_grad ? at::empty(wt.sizes(), wt.options()) : at::empty({0}, h.options());
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_mean_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const acc_t* w = weight.has_value() ? wt.data_ptr<acc_t>() : nullptr;
    auto gH = grad_H.to(acc).contiguous();
    auto Hc = H.to(acc).contiguous();
    std::vector<acc_t> gbar(B * E), gdotH(B, acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      double wsum = 0;
      if (w) {
        for (int64_t n = 0; n < hr.len(b); ++n) wsum += w[wr.off(b, n)];
      } else {
        wsum = static_cast<double>(hr.len(b));
      }
      const double inv = wsum != 0 ? 1.0 / wsum : 0.0;
      for (int64_t e = 0; e < E; ++e) {
        gbar[b * E + e] = static_cast<acc_t>(gH.data_ptr<acc_t>()[b * E + e] * inv);
        gdotH[b] += gbar[b * E + e] * Hc.data_ptr<acc_t>()[b * E + e];
      }
    }
    std::vector<double> part;
    Rotation<acc_t> rot;
    if (rope) rot = rope->rotation<acc_t>(cup);
    dispatch_degree(deg, [&](auto Kc) {
      mean_backward<scalar_t, decltype(Kc)::value>(h.data_ptr<scalar_t>(), hr, E, cT, deg, w, wr, chunks, gbar,
                                                   gdotH, gh.data_ptr<scalar_t>(), ghr,
                                                   weight_grad ? gw.data_ptr<acc_t>() : nullptr, part,
                                                   rope ? &rot : nullptr);
    });
    std::vector<int64_t> e0s(chunks.size(), 0), widths(chunks.size(), E);
    gc = reduce_coeff_grad(part, e0s, widths, deg, E, coeff);
  });
  if (weight_grad) gw = gw.to(weight->scalar_type() == at::kBool ? h.scalar_type() : weight->scalar_type());
  return {gh, gc, gw};
}

#if POM_CPU_PART == 1
std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_backward_cpu(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_mean_backward";
  checks::mean_backward_args(op, grad_H, H, h, coeff, weight, cu_seqlens, weight_grad);
  return mean_backward_op(op, grad_H, H, h, coeff, weight, cu_seqlens, weight_grad, nullptr);
}
#endif

// ---------------------------------------------------------------------------
// Recurrent state: append a chunk of T tokens to (sum, count).
// ---------------------------------------------------------------------------

// H = (sum + S) / (count + T) and the new state; the outputs may alias the inputs.
template <typename scalar_t, typename sum_t>
void state_finish(int64_t B, int64_t E, int64_t T, const std::vector<double>& S, const std::vector<int64_t>& first,
                  const sum_t* sum_in, const int64_t* count_in, scalar_t* H, sum_t* sum_out, int64_t* count_out) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t cnt = count_in[b] + T;
    const double inv = cnt > 0 ? 1.0 / static_cast<double>(cnt) : 0.0;
    for (int64_t e = 0; e < E; ++e) {
      double s = sum_in[b * E + e];
      for (int64_t c = first[b]; c < first[b + 1]; ++c) s += S[c * E + e];
      H[b * E + e] = static_cast<scalar_t>(s * inv);
      sum_out[b * E + e] = static_cast<sum_t>(s);
    }
    count_out[b] = cnt;
  }
}

inline void state_update_into(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& sum_in,
                              const at::Tensor& count_in, at::Tensor& H, at::Tensor& sum_out, at::Tensor& count_out) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t B = h.size(0), T = h.size(1), E = h.size(2);
  const Rows hr = rows_of(h, nullptr);
  std::vector<int64_t> first;
  auto chunks = row_chunks(hr, B, first);
  auto sum_c = sum_in.contiguous();
  auto count_c = count_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_state_update_cpu", [&] {
    auto cT = coeff_table<at::opmath_type<scalar_t>>(coeff);
    std::vector<double> S, W;
    dispatch_degree(deg, [&](auto Kc) {
      mean_partials<scalar_t, decltype(Kc)::value>(h.data_ptr<scalar_t>(), hr, E, cT, deg, nullptr, Rows{}, chunks,
                                                   S, W);
    });
    if (sum_c.scalar_type() == at::kDouble) {
      state_finish<scalar_t, double>(B, E, T, S, first, sum_c.data_ptr<double>(), count_c.data_ptr<int64_t>(),
                                     H.data_ptr<scalar_t>(), sum_out.data_ptr<double>(), count_out.data_ptr<int64_t>());
    } else {
      state_finish<scalar_t, float>(B, E, T, S, first, sum_c.data_ptr<float>(), count_c.data_ptr<int64_t>(),
                                    H.data_ptr<scalar_t>(), sum_out.data_ptr<float>(), count_out.data_ptr<int64_t>());
    }
  });
}

#if POM_CPU_PART == 1
std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_cpu(const at::Tensor& h, const at::Tensor& coeff,
                                                                     const at::Tensor& state_sum,
                                                                     const at::Tensor& count) {
  const char* op = "pom_ext::poly_state_update";
  checks::state_args(op, h, coeff, state_sum, count);
  auto H = at::empty({h.size(0), h.size(2)}, h.options());
  auto sum_out = at::empty({h.size(0), h.size(2)}, state_sum.options());
  auto count_out = at::empty({h.size(0)}, count.options());
  state_update_into(h, coeff, state_sum, count, H, sum_out, count_out);
  return {H, sum_out, count_out};
}

at::Tensor poly_state_step_cpu(const at::Tensor& h, const at::Tensor& coeff, at::Tensor& state_sum,
                               at::Tensor& count) {
  checks::state_step_args("pom_ext::poly_state_step_", h, coeff, state_sum, count);
  auto H = at::empty({h.size(0), h.size(2)}, h.options());
  state_update_into(h, coeff, state_sum, count, H, state_sum, count);
  return H;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_state_update_backward_cpu(const at::Tensor& grad_H,
                                                                              const at::Tensor& grad_sum,
                                                                              const at::Tensor& h,
                                                                              const at::Tensor& coeff,
                                                                              const at::Tensor& count) {
  checks::state_backward_args("pom_ext::poly_state_update_backward", grad_H, grad_sum, h, coeff, count);
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t B = h.size(0), T = h.size(1), E = h.size(2);
  const Rows hr = rows_of(h, nullptr);
  std::vector<int64_t> first;
  auto chunks = row_chunks(hr, B, first);
  auto gh = pooled_empty(h.sizes(), h.options());
  const Rows ghr = rows_of(gh, nullptr);
  auto gbar_t = state_chunk_grad(grad_H, grad_sum, count, T);
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_state_update_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    at::Tensor gb = gbar_t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::vector<acc_t> gbar(gb.data_ptr<acc_t>(), gb.data_ptr<acc_t>() + B * E), none;
    std::vector<double> part;
    dispatch_degree(deg, [&](auto Kc) {
      mean_backward<scalar_t, decltype(Kc)::value>(h.data_ptr<scalar_t>(), hr, E, cT, deg, nullptr, Rows{}, chunks,
                                                   gbar, none, gh.data_ptr<scalar_t>(), ghr, nullptr, part);
    });
    std::vector<int64_t> e0s(chunks.size(), 0), widths(chunks.size(), E);
    gc = reduce_coeff_grad(part, e0s, widths, deg, E, coeff);
  });
  return {gh, gc, gbar_t.to(grad_sum.scalar_type())};
}
#endif

// ---------------------------------------------------------------------------
// Causal and block-causal prefix means, plain and gated.
// ---------------------------------------------------------------------------

struct ScanTask {
  int64_t b, e0, width, n0, n1;
  int64_t group_first, group_last;  // task indices of this (sequence, channel block)
};

// Channels per causal task over the B sequences of r: whole rows (up to kEBWhole) when one task per sequence shares
// the rows evenly among the threads — at::parallel_for gives thread k the tasks [k c, (k + 1) c), c = ceil(B /
// threads), B must reach the thread count and no thread's rows may exceed 5/4 of the mean (so no packed sequence
// that dwarfs the others) — else kEB. The rotary scans never join the sections of a 2-D table in one task.
inline int64_t task_channels(const Rows& r, int64_t B) {
  const int64_t threads = at::get_num_threads();
  if (B < threads) return kEB;
  const int64_t c = ceil_div(B, threads);
  int64_t total = 0, most = 0;
  for (int64_t b0 = 0; b0 < B; b0 += c) {
    int64_t rows = 0;
    for (int64_t b = b0; b < std::min(B, b0 + c); ++b) rows += r.len(b);
    total += rows;
    most = std::max(most, rows);
  }
  return 4 * most * threads <= 5 * total ? kEBWhole : kEB;
}

// Channel blocks of at most `channels` (task_channels) hold whole gate groups of q channels (q = 1 without a
// gate), so no task shares a gate.
inline int64_t block_width(int64_t E, int64_t q, int64_t channels) {
  return std::min(E, q >= channels ? q : (channels / q) * q);
}

// Tasks over channel blocks (first channel, width): every sequence, every block, the sequence cut into chunks
// (aligned to the block size F) when there are fewer (sequence, block) pairs than threads.
inline std::vector<ScanTask> scan_tasks_over(const Rows& r, int64_t B,
                                             const std::vector<std::pair<int64_t, int64_t>>& blocks, int64_t F) {
  const int64_t nEB = static_cast<int64_t>(blocks.size());
  const int64_t base = B * nEB;
  const int64_t threads = at::get_num_threads();
  std::vector<ScanTask> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = r.len(b);
    int64_t S = 1;
    if (base < threads) S = std::max<int64_t>(1, std::min(ceil_div(threads, base), L / kMinSplitRows));
    const int64_t R = std::max<int64_t>(F, ceil_div(ceil_div(L, S), F) * F);
    for (const auto& blk : blocks) {
      const int64_t g0 = static_cast<int64_t>(tasks.size());
      for (int64_t n0 = 0; n0 < std::max<int64_t>(L, 1); n0 += R)
        tasks.push_back({b, blk.first, blk.second, n0, std::min(L, n0 + R), g0, 0});
      for (size_t i = g0; i < tasks.size(); ++i) tasks[i].group_last = static_cast<int64_t>(tasks.size()) - 1;
    }
  }
  return tasks;
}

inline std::vector<ScanTask> scan_tasks(const Rows& r, int64_t B, int64_t E, int64_t F, int64_t q = 1) {
  const int64_t W = std::max<int64_t>(1, block_width(E, q, task_channels(r, B)));
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t e0 = 0; e0 < std::max<int64_t>(E, 1); e0 += W) blocks.push_back({e0, std::min(W, E - e0)});
  return scan_tasks_over(r, B, blocks, F);
}

inline int64_t max_width(const std::vector<ScanTask>& tasks) {
  int64_t w = 1;
  for (const ScanTask& t : tasks) w = std::max(w, t.width);
  return w;
}

// The layer's gate, fused into the gated ops: channel e of a row is scaled by
// s = hardsigmoid(pre[j] + bias[j]), j = e / q, where pre are the S gate columns of the row and
// q = E / S (q = 1: one gate per channel).
template <typename scalar_t>
struct Gate {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pre = nullptr;
  Rows r;
  int64_t q = 1;
  std::vector<acc_t> bias;

  // x[j] = pre + bias for the gate columns of channels [e0, e0 + w) of row n; returns their count.
  int64_t inputs(int64_t b, int64_t n, int64_t e0, int64_t w, acc_t* __restrict x) const {
    const int64_t j0 = e0 / q, nj = ceil_div(w, q);
    const scalar_t* p = pre + r.off(b, n) + j0 * r.sE;
    const acc_t* bj = bias.data() + j0;
    if (r.sE == 1) {
      for (int64_t j = 0; j < nj; ++j) x[j] = static_cast<acc_t>(p[j]) + bj[j];
    } else {
      for (int64_t j = 0; j < nj; ++j) x[j] = static_cast<acc_t>(p[j * r.sE]) + bj[j];
    }
    return nj;
  }
  // Prefetch the gate columns of channels [e0, e0 + w) of row n (contiguous columns only).
  void prefetch(int64_t b, int64_t n, int64_t e0, int64_t w) const {
    if (r.sE == 1) prefetch_row(pre + r.off(b, n) + e0 / q, ceil_div(w, q));
  }
  // s for channels [e0, e0 + w) of row n (x is scratch).
  void values(int64_t b, int64_t n, int64_t e0, int64_t w, acc_t* __restrict s, acc_t* __restrict x) const {
    const int64_t nj = inputs(b, n, e0, w, x);
    if (q == 1) {
      for (int64_t e = 0; e < w; ++e) s[e] = math::hsig(x[e]);
      return;
    }
    for (int64_t j = 0; j < nj; ++j) {
      const acc_t v = math::hsig(x[j]);
      std::fill(s + j * q, s + std::min(w, (j + 1) * q), v);
    }
  }
};

template <typename scalar_t>
Gate<scalar_t> make_gate(const at::Tensor& pre, const int64_t* cu, int64_t E, const c10::optional<at::Tensor>& bias) {
  using acc_t = at::opmath_type<scalar_t>;
  Gate<scalar_t> g;
  g.pre = pre.data_ptr<scalar_t>();
  g.r = rows_of(pre, cu);
  const int64_t S = pre.size(-1);
  g.q = E / S;
  if (bias.has_value()) {
    at::Tensor bt = bias->detach().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    g.bias.assign(bt.data_ptr<acc_t>(), bt.data_ptr<acc_t>() + S);
  } else {
    g.bias.assign(S, acc_t(0));
  }
  return g;
}

// The token weights of the weighted causal op: row n of sequence b enters the prefix sums as w_n p_n and reads
// them times inv_n = 1 / (the sum of w over the rows it sees, up to the end of its block), 0 where that sum is 0.
template <typename acc_t>
struct Weights {
  const acc_t* w = nullptr;  // (B, N), or (total,) when packed; contiguous, in the accumulation dtype
  Rows r;
  std::vector<acc_t> inv;  // indexed like w
  acc_t at(int64_t b, int64_t n) const { return w[r.off(b, n)]; }
  acc_t inverse(int64_t b, int64_t n) const { return inv[r.off(b, n)]; }
};

// wa: the weight converted to acc_t and made contiguous; the inverse prefix sums (weight_grad.h) in fp64.
template <typename acc_t>
Weights<acc_t> make_weights(const at::Tensor& wa, const c10::optional<at::Tensor>& cu_seqlens, const int64_t* cu,
                            int64_t F) {
  Weights<acc_t> wt;
  wt.w = wa.data_ptr<acc_t>();
  wt.r = rows_of(wa, cu);
  const at::Tensor inv = inverse_prefix_weights(wa, F, cu_seqlens).to(c10::CppTypeToScalarType<acc_t>::value)
                             .contiguous();
  wt.inv.assign(inv.data_ptr<acc_t>(), inv.data_ptr<acc_t>() + inv.numel());
  return wt;
}

// Totals of p (w p with weights) over every chunk that has a successor in its group (fp64, tasks x W): the
// carries of a forward scan that was cut into chunks.
template <typename scalar_t, int K>
std::vector<double> forward_carries(const scalar_t* h, const Rows& hr, int64_t E,
                                    const std::vector<at::opmath_type<scalar_t>>& cT, int deg,
                                    const std::vector<ScanTask>& tasks, int64_t W,
                                    const Weights<at::opmath_type<scalar_t>>* wt = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  std::vector<double> tot(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(3, W);
    acc_t *x = buf[0], *p = buf[1], *f = buf[2];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      if (i == t.group_last) continue;
      std::fill(f, f + W, acc_t(0));
      for (int64_t n = t.n0; n < t.n1; ++n) {
        poly_row<K>(in_row(h + hr.off(t.b, n) + t.e0 * hr.sE, hr.sE, t.width, x), p, cT.data(), E, t.e0, t.width,
                    deg);
        if (wt) {
          const acc_t wn = wt->at(t.b, n);
          for (int64_t e = 0; e < t.width; ++e) f[e] += wn * p[e];
        } else {
          for (int64_t e = 0; e < t.width; ++e) f[e] += p[e];
        }
        if ((n - t.n0 + 1) % kFlushRows == 0) flush(f, &tot[i * W], t.width);
      }
      flush(f, &tot[i * W], t.width);
    }
  });
  return tot;
}

// (run, comp) of task i from the carries of the tasks before it (step -1: after it) in its group.
template <typename acc_t>
void start_from_carry(const std::vector<double>& tot, int64_t W, const ScanTask& t, int64_t i, bool reverse,
                      acc_t* run, acc_t* comp) {
  for (int64_t e = 0; e < t.width; ++e) {
    double carry = 0;
    if (reverse) {
      for (int64_t j = t.group_last; j > i; --j) carry += tot[j * W + e];
    } else {
      for (int64_t j = t.group_first; j < i; ++j) carry += tot[j * W + e];
    }
    run[e] = static_cast<acc_t>(carry);
    comp[e] = static_cast<acc_t>(static_cast<double>(run[e]) - carry);
  }
}

// out = H (plain) or gate * H (gated), H the block-causal prefix mean of p(h), or with weights wt its weighted
// prefix mean.
template <typename scalar_t, int K>
void causal_forward(const scalar_t* h, const Rows& hr, int64_t E, const std::vector<at::opmath_type<scalar_t>>& cT,
                    int deg, int64_t F, const std::vector<ScanTask>& tasks, const Gate<scalar_t>* gate,
                    const Weights<at::opmath_type<scalar_t>>* wt, scalar_t* out, const Rows& outr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks);
  const std::vector<double> tot = forward_carries<scalar_t, K>(h, hr, E, cT, deg, tasks, W, wt);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(6, W);
    acc_t *x = buf[0], *run = buf[1], *comp = buf[2], *o = buf[3], *s = buf[4], *gx = buf[5];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      start_from_carry(tot, W, t, i, false, run, comp);
      if (F == 1) {
        for (int64_t n = t.n0; n < t.n1; ++n) {
          acc_t* orow = out_row(out + outr.off(t.b, n) + t.e0, o);
          const acc_t* xr = in_row(h + hr.off(t.b, n) + t.e0 * hr.sE, hr.sE, t.width, x);
          if (wt) {
            scan_row<K, true, true>(xr, run, comp, orow, wt->inverse(t.b, n), cT.data(), E, t.e0, t.width, deg,
                                    wt->at(t.b, n));
          } else {
            scan_row<K, true>(xr, run, comp, orow, acc_t(1) / static_cast<acc_t>(n + 1), cT.data(), E, t.e0,
                              t.width, deg);
          }
          if (gate) {
            gate->values(t.b, n, t.e0, t.width, s, gx);
            for (int64_t e = 0; e < t.width; ++e) orow[e] *= s[e];
          }
          commit_row(out + outr.off(t.b, n) + t.e0, t.width, orow);
        }
        continue;
      }
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        const int64_t bend = std::min(blk + F, t.n1);
        for (int64_t n = blk; n < bend; ++n) {
          const acc_t* xr = in_row(h + hr.off(t.b, n) + t.e0 * hr.sE, hr.sE, t.width, x);
          if (wt) {
            scan_row<K, false, true>(xr, run, comp, o, acc_t(0), cT.data(), E, t.e0, t.width, deg, wt->at(t.b, n));
          } else {
            scan_row<K, false>(xr, run, comp, o, acc_t(0), cT.data(), E, t.e0, t.width, deg);
          }
        }
        const acc_t inv = wt ? wt->inverse(t.b, blk) : acc_t(1) / static_cast<acc_t>(bend);
        for (int64_t e = 0; e < t.width; ++e) o[e] = (run[e] - comp[e]) * inv;
        for (int64_t n = blk; n < bend; ++n) {
          scalar_t* dst = out + outr.off(t.b, n) + t.e0;
          if (gate) {
            gate->values(t.b, n, t.e0, t.width, s, gx);
            for (int64_t e = 0; e < t.width; ++e) x[e] = o[e] * s[e];
            store(dst, t.width, x);
          } else {
            store(dst, t.width, o);
          }
        }
      }
    }
  });
}

// Reverse scan: gh = dp/dh * sum_{t >= n} ghat_t and grad_coeff partials, where ghat is g (plain) or
// g * gate (gated) summed over each block and divided by the block's end; with weights wt divided by the weight
// the block's rows see, and row n's share times w_n.
template <typename scalar_t, int K>
void causal_backward(const scalar_t* g, const Rows& gr, const scalar_t* h, const Rows& hr, int64_t E,
                     const std::vector<at::opmath_type<scalar_t>>& cT, int deg, int64_t F,
                     const std::vector<ScanTask>& tasks, const Gate<scalar_t>* gate,
                     const Weights<at::opmath_type<scalar_t>>* wt, scalar_t* gh, const Rows& ghr,
                     std::vector<double>& part) {
  using acc_t = at::opmath_type<scalar_t>;
  const math::ActGrad<acc_t> ag = math::act_grad_rule<acc_t>();
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks);
  // Sum of the block's (gated) gradient rows, divided by the block's end.
  // Kahan-compensated (comp: scratch): a block may hold thousands of rows.
  auto block_grad = [&](const ScanTask& t, int64_t blk, int64_t bend, acc_t* G, acc_t* comp, acc_t* x, acc_t* s,
                        acc_t* sx) {
    std::fill(G, G + t.width, acc_t(0));
    std::fill(comp, comp + t.width, acc_t(0));
    for (int64_t n = blk; n < bend; ++n) {
      const acc_t* xr = in_row(g + gr.off(t.b, n) + t.e0 * gr.sE, gr.sE, t.width, x);
      if (gate) {
        gate->values(t.b, n, t.e0, t.width, s, sx);
        for (int64_t e = 0; e < t.width; ++e) math::kahan_add(G[e], comp[e], xr[e] * s[e]);
      } else {
        for (int64_t e = 0; e < t.width; ++e) math::kahan_add(G[e], comp[e], xr[e]);
      }
    }
    const acc_t inv = wt ? wt->inverse(t.b, blk) : acc_t(1) / static_cast<acc_t>(bend);
    for (int64_t e = 0; e < t.width; ++e) G[e] = (G[e] - comp[e]) * inv;
  };
  // Pass 1: totals of every chunk that has a predecessor in its group (the reverse scan's carries).
  std::vector<double> tot(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(6, W);
    acc_t *x = buf[0], *G = buf[1], *f = buf[2], *s = buf[3], *sx = buf[4], *Gc = buf[5];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      if (i == t.group_first) continue;
      std::fill(f, f + W, acc_t(0));
      int64_t rows = 0;
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        const int64_t bend = std::min(blk + F, t.n1);
        block_grad(t, blk, bend, G, Gc, x, s, sx);
        for (int64_t e = 0; e < t.width; ++e) f[e] += G[e];
        if (++rows % kFlushRows == 0) flush(f, &tot[i * W], t.width);
      }
      flush(f, &tot[i * W], t.width);
    }
  });
  part.assign(nt * deg * W, 0.0);
  // Pass 2: reverse scan of every chunk from its carry.
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    // Token-causal: kScanRows rows per fused pass (bufs: x, g, gx, s for each, then scratch).
    RowBufs<acc_t> buf(4 * kScanRows + 5, W);
    acc_t *G = buf[4 * kScanRows], *acc = buf[4 * kScanRows + 1], *comp = buf[4 * kScanRows + 2],
          *gb = buf[4 * kScanRows + 3], *sx = buf[4 * kScanRows + 4];
    acc_t *x = buf[0], *gbuf = buf[1], *gx = buf[2], *s = buf[3];  // block-causal scratch
    RowBufs<acc_t> fbuf(1, deg * W);
    acc_t* f = fbuf[0];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      double* d = &part[i * deg * W];
      std::fill(f, f + deg * W, acc_t(0));
      start_from_carry(tot, W, t, i, true, acc, comp);
      int64_t rows = 0;
      if (F == 1) {
        // Rows n, n - 1, ..., n - R + 1 in one pass; R = kScanRows, then single rows for the rest.
        auto pass = [&](auto Rc, int64_t n) {
          constexpr int R = decltype(Rc)::value;
          const acc_t* xr[R];
          const acc_t* gv[R];
          const acc_t* sv[R];
          acc_t* gxr[R];
          acc_t inv[R], wv[R];
          // The rows kPrefetchRows ahead in the walk (before n in memory): h, g, the gate and the output row.
          for (int r = 0; r < R; ++r) {
            const int64_t m = n - r - kPrefetchRows;
            if (m < t.n0) break;
            if (hr.sE == 1) prefetch_row(h + hr.off(t.b, m) + t.e0, t.width);
            if (gr.sE == 1) prefetch_row(g + gr.off(t.b, m) + t.e0, t.width);
            if (gate) gate->prefetch(t.b, m, t.e0, t.width);
            prefetch_row(gh + ghr.off(t.b, m) + t.e0, t.width);
          }
          for (int r = 0; r < R; ++r) {
            const int64_t m = n - r;
            xr[r] = in_row(h + hr.off(t.b, m) + t.e0 * hr.sE, hr.sE, t.width, buf[4 * r]);
            gv[r] = in_row(g + gr.off(t.b, m) + t.e0 * gr.sE, gr.sE, t.width, buf[4 * r + 1]);
            gxr[r] = out_row(gh + ghr.off(t.b, m) + t.e0, buf[4 * r + 2]);
            sv[r] = buf[4 * r + 3];
            if (gate) gate->values(t.b, m, t.e0, t.width, buf[4 * r + 3], sx);
            inv[r] = wt ? wt->inverse(t.b, m) : acc_t(1) / static_cast<acc_t>(m + 1);
            wv[r] = wt ? wt->at(t.b, m) : acc_t(1);
          }
          if (gate) {
            scan_rows_backward<K, true, R, false>(xr, gv, sv, inv, wv, acc, comp, gxr, f, cT.data(), E, t.e0,
                                                  t.width, deg, ag);
          } else if (wt) {
            scan_rows_backward<K, false, R, true>(xr, gv, sv, inv, wv, acc, comp, gxr, f, cT.data(), E, t.e0,
                                                  t.width, deg, ag);
          } else {
            scan_rows_backward<K, false, R, false>(xr, gv, sv, inv, wv, acc, comp, gxr, f, cT.data(), E,
                                                   t.e0, t.width, deg, ag);
          }
          for (int r = 0; r < R; ++r) commit_row(gh + ghr.off(t.b, n - r) + t.e0, t.width, gxr[r]);
          rows += R;
          if (rows >= kFlushRows) {
            flush(f, d, deg * t.width);
            rows = 0;
          }
        };
        int64_t n = t.n1 - 1;
        for (; n - kScanRows + 1 >= t.n0; n -= kScanRows) pass(std::integral_constant<int, kScanRows>{}, n);
        for (; n >= t.n0; --n) pass(std::integral_constant<int, 1>{}, n);
        flush(f, d, deg * t.width);
        continue;
      }
      const int64_t nblocks = t.n1 > t.n0 ? ceil_div(t.n1 - t.n0, F) : 0;
      for (int64_t j = nblocks - 1; j >= 0; --j) {
        const int64_t blk = t.n0 + j * F, bend = std::min(blk + F, t.n1);
        block_grad(t, blk, bend, G, gbuf, x, s, sx);  // gbuf: scratch here
        for (int64_t e = 0; e < t.width; ++e) {
          math::kahan_add(acc[e], comp[e], G[e]);
          gb[e] = acc[e] - comp[e];
        }
        for (int64_t n = blk; n < bend; ++n) {
          acc_t* gxr = out_row(gh + ghr.off(t.b, n) + t.e0, gx);
          poly_row_backward<K, true, false, acc_t>(in_row(h + hr.off(t.b, n) + t.e0 * hr.sE, hr.sE, t.width, x), gb,
                                                   wt ? wt->at(t.b, n) : acc_t(1), gxr, f, nullptr, cT.data(),
                                                   E, t.e0, t.width, deg, ag);
          commit_row(gh + ghr.off(t.b, n) + t.e0, t.width, gxr);
          if (++rows % kFlushRows == 0) flush(f, d, deg * t.width);
        }
      }
      flush(f, d, deg * t.width);
    }
  });
}

// Gradient of the gate inputs of the gated op, by a forward scan that recomputes H:
// gpre[j] = hardsigmoid'(pre[j] + bias[j]) * sum_{e in gate j} g[e] H[e]; bias partials per task (fp64, tasks x W).
template <typename scalar_t, int K>
void causal_gate_backward(const scalar_t* g, const Rows& gr, const scalar_t* h, const Rows& hr, int64_t E,
                          const std::vector<at::opmath_type<scalar_t>>& cT, int deg, int64_t F,
                          const std::vector<ScanTask>& tasks, const Gate<scalar_t>& gate, scalar_t* gpre,
                          const Rows& gpr, std::vector<double>& bpart) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks), q = gate.q;
  const std::vector<double> tot = forward_carries<scalar_t, K>(h, hr, E, cT, deg, tasks, W);
  bpart.assign(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(7, W);
    acc_t *x = buf[0], *run = buf[1], *comp = buf[2], *Hb = buf[3], *gxs = buf[4], *gp = buf[5], *fb = buf[6];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      start_from_carry(tot, W, t, i, false, run, comp);
      std::fill(fb, fb + W, acc_t(0));
      int64_t rows = 0;
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        const int64_t bend = std::min(blk + F, t.n1);
        for (int64_t n = blk; n < bend; ++n) {
          scan_row<K, false>(in_row(h + hr.off(t.b, n) + t.e0 * hr.sE, hr.sE, t.width, x), run, comp, Hb, acc_t(0),
                             cT.data(), E, t.e0, t.width, deg);
        }
        const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
        for (int64_t e = 0; e < t.width; ++e) Hb[e] = (run[e] - comp[e]) * inv;
        for (int64_t n = blk; n < bend; ++n) {
          const acc_t* gy = in_row(g + gr.off(t.b, n) + t.e0 * gr.sE, gr.sE, t.width, x);
          const int64_t nj = gate.inputs(t.b, n, t.e0, t.width, gxs);
          if (q == 1) {
            for (int64_t e = 0; e < t.width; ++e) gp[e] = gy[e] * Hb[e] * math::hsig_grad(gxs[e]);
          } else {
            for (int64_t j = 0; j < nj; ++j) {
              acc_t sum = 0;
              for (int64_t e = j * q; e < std::min(t.width, (j + 1) * q); ++e) sum += gy[e] * Hb[e];
              gp[j] = sum * math::hsig_grad(gxs[j]);
            }
          }
          for (int64_t j = 0; j < nj; ++j) fb[j] += gp[j];
          scalar_t* dst = gpre + gpr.off(t.b, n) + (t.e0 / q) * gpr.sE;
          for (int64_t j = 0; j < nj; ++j) dst[j * gpr.sE] = static_cast<scalar_t>(gp[j]);
          if (++rows % kFlushRows == 0) flush(fb, &bpart[i * W], nj);
        }
      }
      flush(fb, &bpart[i * W], W);
    }
  });
}

// Each task owns deg * W slots of `part`, of which the first deg * width are used: their sum into (E, K).
inline at::Tensor scan_coeff_grad(const std::vector<double>& part, const std::vector<ScanTask>& tasks, int deg,
                                  int64_t E, const at::Tensor& coeff) {
  const int64_t W = max_width(tasks);
  std::vector<int64_t> e0s, widths;
  std::vector<double> packed;
  packed.reserve(part.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    e0s.push_back(tasks[i].e0);
    widths.push_back(tasks[i].width);
    packed.insert(packed.end(), part.begin() + i * deg * W, part.begin() + i * deg * W + deg * tasks[i].width);
  }
  return reduce_coeff_grad(packed, e0s, widths, deg, E, coeff);
}

// The plain and the weighted causal ops (weight: (B, N) or (total,), bool or floating; none for poly_causal).
inline at::Tensor causal_op(const char* op, const at::Tensor& h, const at::Tensor& coeff,
                            const c10::optional<at::Tensor>& weight, int64_t block_size,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  auto cu = host_offsets(op, cu_seqlens, h.size(0));
  const int64_t* cup = cu_seqlens ? cu.data() : nullptr;
  const Rows hr = rows_of(h, cup);
  auto out = pooled_empty(h.sizes(), h.options());
  const Rows outr = rows_of(out, cup);
  auto tasks = scan_tasks(hr, B, E, block_size);
  const at::Tensor wa = weight_as(weight, acc_type_of(h.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_causal_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const Weights<acc_t> wt = weight ? make_weights<acc_t>(wa, cu_seqlens, cup, block_size) : Weights<acc_t>();
    dispatch_degree(deg, [&](auto Kc) {
      causal_forward<scalar_t, decltype(Kc)::value>(h.data_ptr<scalar_t>(), hr, E, cT, deg, block_size, tasks,
                                                    nullptr, weight ? &wt : nullptr, out.data_ptr<scalar_t>(), outr);
    });
  });
  return out;
}

// (grad_h, grad_coeff) of causal_op.
inline std::tuple<at::Tensor, at::Tensor> causal_backward_op(const char* op, const at::Tensor& grad_H,
                                                             const at::Tensor& h, const at::Tensor& coeff,
                                                             const c10::optional<at::Tensor>& weight,
                                                             int64_t block_size,
                                                             const c10::optional<at::Tensor>& cu_seqlens) {
  const int deg = static_cast<int>(coeff.size(1));
  const int64_t E = h.size(-1), B = checks::batch_of(h, cu_seqlens);
  auto cu = host_offsets(op, cu_seqlens, h.size(0));
  const int64_t* cup = cu_seqlens ? cu.data() : nullptr;
  const Rows hr = rows_of(h, cup);
  auto g = grad_H.scalar_type() == h.scalar_type() ? grad_H : grad_H.to(h.scalar_type());
  const Rows gr = rows_of(g, cup);
  auto gh = pooled_empty(h.sizes(), h.options());
  const Rows ghr = rows_of(gh, cup);
  auto tasks = scan_tasks(hr, B, E, block_size);
  const at::Tensor wa = weight_as(weight, acc_type_of(h.scalar_type()));
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_causal_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const Weights<acc_t> wt = weight ? make_weights<acc_t>(wa, cu_seqlens, cup, block_size) : Weights<acc_t>();
    std::vector<double> part;
    dispatch_degree(deg, [&](auto Kc) {
      causal_backward<scalar_t, decltype(Kc)::value>(g.data_ptr<scalar_t>(), gr, h.data_ptr<scalar_t>(), hr, E, cT,
                                                     deg, block_size, tasks, nullptr, weight ? &wt : nullptr,
                                                     gh.data_ptr<scalar_t>(), ghr, part);
    });
    gc = scan_coeff_grad(part, tasks, deg, E, coeff);
  });
  return {gh, gc};
}

#if POM_CPU_PART == 2
at::Tensor poly_causal_cpu(const at::Tensor& h, const at::Tensor& coeff, int64_t block_size,
                           const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal";
  checks::causal_args(op, h, coeff, block_size, cu_seqlens);
  return causal_op(op, h, coeff, c10::nullopt, block_size, cu_seqlens);
}

at::Tensor poly_causal_weighted_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& weight,
                                    int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_weighted";
  checks::causal_weighted_args(op, h, coeff, weight, block_size, cu_seqlens);
  return causal_op(op, h, coeff, weight, block_size, cu_seqlens);
}
#endif

#if POM_CPU_PART == 3
std::tuple<at::Tensor, at::Tensor> poly_causal_backward_cpu(const at::Tensor& grad_H, const at::Tensor& h,
                                                            const at::Tensor& coeff, int64_t block_size,
                                                            const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_backward";
  checks::causal_backward_args(op, grad_H, h, coeff, block_size, cu_seqlens);
  return causal_backward_op(op, grad_H, h, coeff, c10::nullopt, block_size, cu_seqlens);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_weighted_backward_cpu(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& weight, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_causal_weighted_backward";
  checks::causal_weighted_backward_args(op, grad_H, H, h, coeff, weight, block_size, cu_seqlens);
  auto [gh, gc] = causal_backward_op(op, grad_H, h, coeff, weight, block_size, cu_seqlens);
  at::Tensor gw = weight_grad ? causal_weight_grad(grad_H, H, poly_eval_cpu(h, coeff), weight, block_size, cu_seqlens)
                              : at::empty({0}, h.options());
  return {gh, gc, gw};
}
#endif

// What both gated ops derive from their arguments: the split of hs = [h | pre], the packed offsets and the
// scan tasks (whole gate groups per task). Not copyable: cup points into cu.
struct GatedSetup {
  int deg;
  int64_t E, S, B;
  std::vector<int64_t> cu;
  const int64_t* cup;
  at::Tensor h, pre;
  Rows hr;
  std::vector<ScanTask> tasks;
  GatedSetup(const char* op, const at::Tensor& hs, const at::Tensor& coeff, int64_t block_size,
             const c10::optional<at::Tensor>& cu_seqlens)
      : deg(static_cast<int>(coeff.size(1))), E(coeff.size(0)), S(hs.size(-1) - E),
        B(checks::batch_of(hs, cu_seqlens)), cu(host_offsets(op, cu_seqlens, hs.size(0))),
        cup(cu_seqlens ? cu.data() : nullptr), h(hs.narrow(-1, 0, E)), pre(hs.narrow(-1, E, S)),
        hr(rows_of(h, cup)), tasks(scan_tasks(hr, B, E, block_size, E / S)) {}
  GatedSetup(const GatedSetup&) = delete;
  GatedSetup& operator=(const GatedSetup&) = delete;
};

// The gradient of the gate bias from its fp64 sums, in the bias's dtype (hs's without one).
inline at::Tensor gate_bias_grad(const std::vector<double>& bsum, const c10::optional<at::Tensor>& gate_bias,
                                 const at::Tensor& hs) {
  auto bt = at::empty({static_cast<int64_t>(bsum.size())}, hs.options().dtype(at::kDouble));
  std::copy(bsum.begin(), bsum.end(), bt.data_ptr<double>());
  return bt.to(gate_bias.has_value() ? gate_bias->scalar_type() : hs.scalar_type());
}

#if POM_CPU_PART == 2
// Gated: hs = [h | pre] (E + S columns), y = hardsigmoid(pre + bias) (per gate group) * H.
at::Tensor poly_causal_gated_cpu(const at::Tensor& hs, const at::Tensor& coeff,
                                 const c10::optional<at::Tensor>& gate_bias, int64_t block_size,
                                 const c10::optional<at::Tensor>& cu_seqlens) {
  checks::causal_gated_args("pom_ext::poly_causal_gated", hs, coeff, gate_bias, block_size, cu_seqlens);
  const GatedSetup a("pom_ext::poly_causal_gated", hs, coeff, block_size, cu_seqlens);
  auto sizes = hs.sizes().vec();
  sizes.back() = a.E;
  auto out = pooled_empty(sizes, hs.options());
  const Rows outr = rows_of(out, a.cup);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hs.scalar_type(), "poly_causal_gated_cpu", [&] {
    auto cT = coeff_table<at::opmath_type<scalar_t>>(coeff);
    const Gate<scalar_t> gate = make_gate<scalar_t>(a.pre, a.cup, a.E, gate_bias);
    dispatch_degree(a.deg, [&](auto Kc) {
      causal_forward<scalar_t, decltype(Kc)::value>(a.h.data_ptr<scalar_t>(), a.hr, a.E, cT, a.deg, block_size,
                                                    a.tasks, &gate, nullptr, out.data_ptr<scalar_t>(), outr);
    });
  });
  return out;
}
#endif

#if POM_CPU_PART == 3
std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& gate_bias, int64_t block_size, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_backward";
  checks::causal_gated_backward_args(op, grad_y, hs, coeff, gate_bias, block_size, cu_seqlens);
  const GatedSetup a(op, hs, coeff, block_size, cu_seqlens);
  auto g = grad_y.scalar_type() == hs.scalar_type() ? grad_y : grad_y.to(hs.scalar_type());
  const Rows gr = rows_of(g, a.cup);
  // One buffer for both gradients, with the layout of a contiguous hs.
  auto ghs = pooled_empty(hs.sizes(), hs.options());
  const at::Tensor gh = ghs.narrow(-1, 0, a.E), gpre = ghs.narrow(-1, a.E, a.S);
  const Rows ghr = rows_of(gh, a.cup), gpr = rows_of(gpre, a.cup);
  at::Tensor gc, gbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hs.scalar_type(), "poly_causal_gated_backward_cpu", [&] {
    auto cT = coeff_table<at::opmath_type<scalar_t>>(coeff);
    const Gate<scalar_t> gate = make_gate<scalar_t>(a.pre, a.cup, a.E, gate_bias);
    std::vector<double> part, bpart;
    dispatch_degree(a.deg, [&](auto Kc) {
      constexpr int Kv = decltype(Kc)::value;
      causal_gate_backward<scalar_t, Kv>(g.data_ptr<scalar_t>(), gr, a.h.data_ptr<scalar_t>(), a.hr, a.E, cT, a.deg,
                                         block_size, a.tasks, gate, gpre.data_ptr<scalar_t>(), gpr, bpart);
      causal_backward<scalar_t, Kv>(g.data_ptr<scalar_t>(), gr, a.h.data_ptr<scalar_t>(), a.hr, a.E, cT, a.deg,
                                    block_size, a.tasks, &gate, nullptr, gh.data_ptr<scalar_t>(), ghr, part);
    });
    gc = scan_coeff_grad(part, a.tasks, a.deg, a.E, coeff);
    // Bias: the per-task partials of each gate column, summed in task order.
    const int64_t W = max_width(a.tasks), q = a.E / a.S;
    std::vector<double> bsum(a.S, 0.0);
    for (size_t i = 0; i < a.tasks.size(); ++i) {
      const int64_t j0 = a.tasks[i].e0 / q, nj = ceil_div(a.tasks[i].width, q);
      for (int64_t j = 0; j < nj; ++j) bsum[j0 + j] += bpart[i * W + j];
    }
    gbias = gate_bias_grad(bsum, gate_bias, hs);
  });
  return {ghs, gc, gbias};
}
#endif

}  // namespace POM_CPU_ARCH
}  // namespace cpu
}  // namespace pom_ext
