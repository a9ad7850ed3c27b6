// CPU kernels of the rope ops (rotary positions fused into the aggregations), compiled per instruction set
// like poly_cpu_impl.h, after it (they use its rows, tasks, buffers and reductions).
//
// Features are rotated after the polynomial and before the aggregation: p~_n = R(pos_n) p_n (Rotation,
// poly_cpu_impl.h). The mean ops are the plain ones with every row turned (mean_partials / mean_backward take the
// rotation). The causal scans walk tasks of pairs: a task holds w pairs of one section, channels [A, A + w) and
// [A + P, A + P + w), loaded into one buffer of 2 w values (first halves, then second halves), so a pair never
// straddles two tasks; the backward turns the suffix sum of each row back (R^T) before the element backward.
// No rotated (B, N, E) tensor is ever formed.
#ifndef POM_CPU_ARCH
#error "define POM_CPU_ARCH before including rope_cpu_impl.h"
#endif

namespace pom_ext {
namespace cpu {
namespace POM_CPU_ARCH {

constexpr int64_t kRopePrefetchRows = 8;  // how far ahead the token-causal rope backward prefetches rows

// Pair blocks of the rope scans: (first pair, 2 * pairs), at most channels / 2 pairs each (task_channels; rounded
// down to a multiple of q, at least q), never across sections. q (dividing P): the gated op's channels per gate, so
// that a block holds whole gates.
inline std::vector<std::pair<int64_t, int64_t>> rope_blocks(int64_t P, int64_t S, int64_t channels, int64_t q = 1) {
  std::vector<std::pair<int64_t, int64_t>> blocks;
  const int64_t W = std::max<int64_t>(q, (channels / 2 / q) * q);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t i = 0; i < P; i += W) blocks.push_back({s * P + i, 2 * std::min(W, P - i)});
  if (blocks.empty()) blocks.push_back({0, 0});
  return blocks;
}

// Where the pairs of a rope task lie: channels [a, a + w) and [a + P, a + P + w), table columns [i0, i0 + w) of
// section sec.
struct PairSpan {
  int64_t w, sec, i0, a, b;
  PairSpan(const ScanTask& t, int64_t P)
      : w(t.width / 2), sec(P ? t.e0 / P : 0), i0(P ? t.e0 % P : 0), a(2 * P * sec + i0), b(a + P) {}
};

// The 2 w values of a task's pairs in row n of t (first halves, then second halves), as acc_t: pointers into
// the tensor where it already holds them, else into buf (2 w).
template <typename scalar_t, typename acc_t>
inline void pair_rows(const scalar_t* t, const Rows& r, int64_t b, int64_t n, const PairSpan& ps, acc_t* buf,
                      const acc_t*& lo, const acc_t*& hi) {
  const scalar_t* row = t + r.off(b, n);
  lo = in_row(row + ps.a * r.sE, r.sE, ps.w, buf);
  hi = in_row(row + ps.b * r.sE, r.sE, ps.w, buf + ps.w);
}

// Row m of a fused pass of R rows: its pairs of `in` as acc_t (x_lo, x_hi; buffer xb of 2 w), its table entries
// (c, s), where its output pairs are made (o_lo, o_hi: in `out`, or buffer ob of 2 w for commit_row) and
// 1 / (m + 1).
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void pass_row(const scalar_t* in, const Rows& ir, scalar_t* out,
                                                    const Rows& outr, const Rotation<acc_t>& rot, int64_t b,
                                                    int64_t m, const PairSpan& ps, acc_t* xb, acc_t* ob,
                                                    const acc_t*& x_lo, const acc_t*& x_hi, const acc_t*& c,
                                                    const acc_t*& s, acc_t*& o_lo, acc_t*& o_hi, acc_t& inv) {
  pair_rows(in, ir, b, m, ps, xb, x_lo, x_hi);
  const int64_t r = rot.row(b, m, ps.sec) + ps.i0;
  c = rot.cos + r;
  s = rot.sin + r;
  scalar_t* row = out + outr.off(b, m);
  o_lo = out_row(row + ps.a, ob);
  o_hi = out_row(row + ps.b, ob + ps.w);
  inv = acc_t(1) / static_cast<acc_t>(m + 1);
}

// p~ = R poly(act(x)) for the pairs of a task in row n: p (2 w).
template <int K, typename scalar_t, typename acc_t>
inline void rope_row(const scalar_t* h, const Rows& hr, const ScanTask& t, const PairSpan& ps, int64_t n,
                     const Rotation<acc_t>& rot, const std::vector<acc_t>& cT, int64_t E, int deg, acc_t* x,
                     acc_t* p) {
  const acc_t *lo, *hi;
  pair_rows(h, hr, t.b, n, ps, x, lo, hi);
  poly_row<K>(lo, p, cT.data(), E, ps.a, ps.w, deg);
  poly_row<K>(hi, p + ps.w, cT.data(), E, ps.b, ps.w, deg);
  const int64_t r = rot.row(t.b, n, ps.sec) + ps.i0;
  turn(p, p + ps.w, rot.cos + r, rot.sin + r, ps.w);
}

// (run, comp) += p (Kahan).
template <typename acc_t>
inline void accumulate(const acc_t* __restrict p, acc_t* __restrict run, acc_t* __restrict comp, int64_t n) {
  for (int64_t e = 0; e < n; ++e) math::kahan_add(run[e], comp[e], p[e]);
}

// R consecutive rows of the token-causal forward scan, fused, rows in sequence order: p~_r (the polynomial of the
// row's pairs x_lo, x_hi turned by its table entries c_r, s_r) enters the Kahan prefix sums (run, comp: 2 w) and
// o_lo, o_hi receive the prefix means times inv_r, times the row's gate s~ (sg_r: 2 w) when GATED. The sums are
// read and written once per R rows and no row of p~ is stored: one pass over each input row.
template <int K, int R, bool GATED, typename acc_t>
inline void rope_scan_rows(const acc_t* const* x_lo, const acc_t* const* x_hi, const acc_t* const* c,
                           const acc_t* const* s, const acc_t* const* sg, const acc_t* inv, acc_t* __restrict run,
                           acc_t* __restrict comp, acc_t* const* o_lo, acc_t* const* o_hi, const acc_t* __restrict cT,
                           int64_t E, int64_t a, int64_t b, int64_t w, int deg) {
#pragma GCC ivdep
  for (int64_t i = 0; i < w; ++i) {
    acc_t ra = run[i], ca = comp[i], rb = run[w + i], cb = comp[w + i];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const acc_t pa = math::poly<K>(math::act(x_lo[r][i]), cT + a + i, E, deg);
      const acc_t pb = math::poly<K>(math::act(x_hi[r][i]), cT + b + i, E, deg);
      math::kahan_add(ra, ca, pa * c[r][i] - pb * s[r][i]);
      math::kahan_add(rb, cb, pb * c[r][i] + pa * s[r][i]);
      acc_t oa = (ra - ca) * inv[r], ob = (rb - cb) * inv[r];
      if constexpr (GATED) {
        oa *= sg[r][i];
        ob *= sg[r][w + i];
      }
      o_lo[r][i] = oa;
      o_hi[r][i] = ob;
    }
    run[i] = ra;
    comp[i] = ca;
    run[w + i] = rb;
    comp[w + i] = cb;
  }
}

// R consecutive rows of the token-causal backward scan, fused, rows in scan order (row r is the one before row
// r - 1 in the sequence), as scan_rows_backward is for the plain op: g_r (the row's output gradient, g_lo, g_hi)
// * inv_r enters the Kahan suffix sums (run, comp: 2 w), the sum is turned back (R^T, the row's table entries c_r,
// s_r) into the gradient reaching p, and the element backward writes gx_lo, gx_hi and adds act^(k+1) times it to
// f_lo[k * w + i], f_hi[k * w + i]. The sums and f are read and written once per R rows.
template <int K, int R, typename acc_t>
inline void rope_scan_rows_backward(const acc_t* const* x_lo, const acc_t* const* x_hi, const acc_t* const* g_lo,
                                    const acc_t* const* g_hi, const acc_t* inv, const acc_t* const* c,
                                    const acc_t* const* s, acc_t* __restrict run, acc_t* __restrict comp,
                                    acc_t* const* gx_lo, acc_t* const* gx_hi, acc_t* __restrict f_lo,
                                    acc_t* __restrict f_hi, const acc_t* __restrict cT, int64_t E, int64_t a,
                                    int64_t b, int64_t w, int deg, math::ActGrad<acc_t> ag) {
#pragma GCC ivdep
  for (int64_t i = 0; i < w; ++i) {
    acc_t ra = run[i], ca = comp[i], rb = run[w + i], cb = comp[w + i];
    acc_t ua[R], ub[R], aa[R], ab[R];
#pragma GCC unroll 8  // whole: the channel loop vectorizes only once the rows are unrolled
    for (int r = 0; r < R; ++r) {
      math::kahan_add(ra, ca, g_lo[r][i] * inv[r]);
      math::kahan_add(rb, cb, g_hi[r][i] * inv[r]);
      const acc_t ga = ra - ca, gb = rb - cb;
      ua[r] = ga * c[r][i] + gb * s[r][i];  // R^T (ga, gb)
      ub[r] = gb * c[r][i] - ga * s[r][i];
      const acc_t xa = x_lo[r][i], xb = x_hi[r][i];
      aa[r] = math::act(xa);
      ab[r] = math::act(xb);
      acc_t pv, da, db;
      math::poly_and_slope<K>(aa[r], cT + a + i, E, deg, pv, da);
      math::poly_and_slope<K>(ab[r], cT + b + i, E, deg, pv, db);
      gx_lo[r][i] = ua[r] * ag(xa) * da;
      gx_hi[r][i] = ub[r] * ag(xb) * db;
    }
    run[i] = ra;
    comp[i] = ca;
    run[w + i] = rb;
    comp[w + i] = cb;
    POM_UNROLL
    for (int k = 0; k < math::degree_of<K>(deg); ++k) {
      acc_t sa = acc_t(0), sb = acc_t(0);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        ua[r] *= aa[r];
        ub[r] *= ab[r];
        sa += ua[r];
        sb += ub[r];
      }
      f_lo[k * w + i] += sa;
      f_hi[k * w + i] += sb;
    }
  }
}

// The gate of the gated rope op, s~ = R_g(pos) hardsigmoid(pre + bias): S gate columns in the sections of the
// features (S = 2 Pg per section, Pg q = P with q = E / S); gate j of a section's first half pairs with gate j + Pg
// and turns by column j of the gate tables at the row's position. Channel e uses gate e / q, so a rope task
// (channels [a, a + w) and [a + P, a + P + w), w and a multiples of q) uses the w / q gates from a / q and the w / q
// from (a + P) / q: whole pairs of gates. (S = E: q = 1, the gates turn with the features' pairs.)
template <typename scalar_t>
struct RopeGate {
  using acc_t = at::opmath_type<scalar_t>;
  Gate<scalar_t> gate;  // pre + bias, one gate per q channels
  Rotation<acc_t> rot;  // the gate tables (Pg columns) at the rows' positions
  // x = pre + bias of the task's gates in row n (first halves, then second halves: 2 w / q values); returns w / q.
  int64_t inputs(int64_t b, int64_t n, const PairSpan& ps, acc_t* __restrict x) const {
    const int64_t nh = gate.inputs(b, n, ps.a, ps.w, x);
    gate.inputs(b, n, ps.b, ps.w, x + nh);
    return nh;
  }
  // Offset of the gate tables' entries of the task's first gate in row n.
  int64_t table_row(int64_t b, int64_t n, const PairSpan& ps) const {
    return rot.row(b, n, ps.sec) + ps.i0 / gate.q;
  }
  // s~ of the task's 2 w channels in row n (first halves, then second halves); x: scratch of 2 w.
  void values(int64_t b, int64_t n, const PairSpan& ps, acc_t* __restrict s, acc_t* __restrict x) const {
    const int64_t q = gate.q;
    const int64_t nh = inputs(b, n, ps, x);
    acc_t* u = q == 1 ? s : x + 2 * nh;  // q >= 2: 4 w / q <= 2 w
    for (int64_t j = 0; j < 2 * nh; ++j) u[j] = math::hsig(x[j]);
    const int64_t r = table_row(b, n, ps);
    turn(u, u + nh, rot.cos + r, rot.sin + r, nh);
    if (q == 1) return;
    for (int64_t j = 0; j < 2 * nh; ++j) std::fill(s + j * q, s + (j + 1) * q, u[j]);
  }
};

// Prefetch the two half rows of a task's pairs in row n of t (contiguous channels only) into L1, for reading or
// (write) for a store. A task's row is two streams half a row apart, which the hardware prefetchers follow poorly
// (forward scan, AVX2 EPYC: 1.9x the plain scan's time without, 1.4x with one row ahead; the reverse scans walk
// rows downwards, which they do not follow at all).
template <typename T>
inline void prefetch_pairs(const T* t, const Rows& r, int64_t b, int64_t n, const PairSpan& ps, bool write) {
  if (r.sE != 1) return;
  const char* lo = reinterpret_cast<const char*>(t + r.off(b, n) + ps.a);
  const char* hi = reinterpret_cast<const char*>(t + r.off(b, n) + ps.b);
  const int64_t bytes = ps.w * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write) {
      __builtin_prefetch(lo + o, 1, 3);
      __builtin_prefetch(hi + o, 1, 3);
    } else {
      __builtin_prefetch(lo + o, 0, 3);
      __builtin_prefetch(hi + o, 0, 3);
    }
  }
}

// Store 2 w values of a task's pairs into row n of a contiguous output.
template <typename scalar_t, typename acc_t>
inline void store_pairs(scalar_t* out, const Rows& r, int64_t b, int64_t n, const PairSpan& ps, const acc_t* v) {
  scalar_t* row = out + r.off(b, n);
  store(row + ps.a, ps.w, v);
  store(row + ps.b, ps.w, v + ps.w);
}

// Totals of R p over every chunk that has a successor in its group (fp64, tasks x W): the carries of a forward
// scan cut into chunks.
template <typename scalar_t, int K>
std::vector<double> rope_forward_carries(const scalar_t* h, const Rows& hr, int64_t E,
                                         const std::vector<at::opmath_type<scalar_t>>& cT, int deg,
                                         const std::vector<ScanTask>& tasks,
                                         const Rotation<at::opmath_type<scalar_t>>& rot, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  std::vector<double> tot(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(3, W);
    acc_t *x = buf[0], *p = buf[1], *f = buf[2];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      if (i == t.group_last) continue;
      const PairSpan ps(t, rot.P);
      std::fill(f, f + W, acc_t(0));
      for (int64_t n = t.n0; n < t.n1; ++n) {
        rope_row<K>(h, hr, t, ps, n, rot, cT, E, deg, x, p);
        for (int64_t e = 0; e < t.width; ++e) f[e] += p[e];
        if ((n - t.n0 + 1) % kFlushRows == 0) flush(f, &tot[i * W], t.width);
      }
      flush(f, &tot[i * W], t.width);
    }
  });
  return tot;
}

// out = H~, the block-causal prefix mean of R p(h); gated (gate given): out = s~ * H~.
template <typename scalar_t, int K>
void rope_causal_forward(const scalar_t* h, const Rows& hr, int64_t E,
                         const std::vector<at::opmath_type<scalar_t>>& cT, int deg, int64_t F,
                         const std::vector<ScanTask>& tasks, const Rotation<at::opmath_type<scalar_t>>& rot,
                         const RopeGate<scalar_t>* gate, scalar_t* out, const Rows& outr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks);
  const std::vector<double> tot = rope_forward_carries<scalar_t, K>(h, hr, E, cT, deg, tasks, rot, W);
  // Every chunk scanned from its carry.
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    // Then, token-causal, 3 buffers for each row of a pass: the input row, the output row, the gate.
    RowBufs<acc_t> buf(7 + 3 * kScanRows, W);
    acc_t *x = buf[0], *p = buf[1], *run = buf[2], *comp = buf[3], *o = buf[4], *sg = buf[5], *sx = buf[6];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      const PairSpan ps(t, rot.P);
      start_from_carry(tot, W, t, i, false, run, comp);
      if (F == 1) {  // token-causal: rows n, ..., n + R - 1 in one pass (R = kScanRows), then single rows
        auto pass = [&](auto Rc, int64_t n) {
          constexpr int R = decltype(Rc)::value;
          const acc_t *xlo[R], *xhi[R], *cr[R], *sr[R], *sgr[R] = {};  // sgr: the gated pass only
          acc_t *olo[R], *ohi[R];
          acc_t inv[R];
          for (int q = 0; q < R; ++q) {
            const int64_t m = n + q;
            pass_row(h, hr, out, outr, rot, t.b, m, ps, buf[7 + 3 * q], buf[8 + 3 * q], xlo[q], xhi[q], cr[q], sr[q],
                     olo[q], ohi[q], inv[q]);
            if (gate) {
              gate->values(t.b, m, ps, buf[9 + 3 * q], sx);
              sgr[q] = buf[9 + 3 * q];
            }
          }
          const auto scan = [&](auto gated) {
            rope_scan_rows<K, R, decltype(gated)::value>(xlo, xhi, cr, sr, sgr, inv, run, comp, olo, ohi, cT.data(),
                                                         E, ps.a, ps.b, ps.w, deg);
          };
          if (gate) scan(std::true_type{}); else scan(std::false_type{});
          for (int q = 0; q < R; ++q) {
            scalar_t* row = out + outr.off(t.b, n + q);
            commit_row(row + ps.a, ps.w, olo[q]);
            commit_row(row + ps.b, ps.w, ohi[q]);
          }
        };
        int64_t n = t.n0;
        for (; n + kScanRows <= t.n1; n += kScanRows) pass(std::integral_constant<int, kScanRows>{}, n);
        for (; n < t.n1; ++n) pass(std::integral_constant<int, 1>{}, n);
        continue;
      }
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        const int64_t bend = std::min(blk + F, t.n1);
        for (int64_t n = blk; n < bend; ++n) {
          rope_row<K>(h, hr, t, ps, n, rot, cT, E, deg, x, p);
          accumulate(p, run, comp, t.width);
        }
        const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
        for (int64_t e = 0; e < t.width; ++e) o[e] = (run[e] - comp[e]) * inv;
        for (int64_t n = blk; n < bend; ++n) {
          if (gate) {
            gate->values(t.b, n, ps, sg, sx);
            for (int64_t e = 0; e < t.width; ++e) p[e] = o[e] * sg[e];
            store_pairs(out, outr, t.b, n, ps, p);
          } else {
            store_pairs(out, outr, t.b, n, ps, o);
          }
        }
      }
    }
  });
}

// Reverse scan: the gradient reaching p~_n is gb_n = sum over blocks ending at or after n's of the block's
// gradient rows (times s~ when gated) / the block's end; p_n gets R^T gb_n, then the element backward (gh,
// grad_coeff partials: per task deg * w values for channels [a, a + w), then deg * w for [a + P, a + P + w)).
template <typename scalar_t, int K>
void rope_causal_backward(const scalar_t* g, const Rows& gr, const scalar_t* h, const Rows& hr, int64_t E,
                          const std::vector<at::opmath_type<scalar_t>>& cT, int deg, int64_t F,
                          const std::vector<ScanTask>& tasks, const Rotation<at::opmath_type<scalar_t>>& rot,
                          const RopeGate<scalar_t>* gate, scalar_t* gh, const Rows& ghr, std::vector<double>& part) {
  using acc_t = at::opmath_type<scalar_t>;
  const math::ActGrad<acc_t> ag = math::act_grad_rule<acc_t>();
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks);
  // The gradient rows of row n (times s~ when gated: into sg, with sx scratch).
  auto grad_rows = [&](const ScanTask& t, const PairSpan& ps, int64_t n, acc_t* x, acc_t* sg, acc_t* sx,
                       const acc_t*& lo, const acc_t*& hi) {
    pair_rows(g, gr, t.b, n, ps, x, lo, hi);
    if (!gate) return;
    gate->values(t.b, n, ps, sg, sx);
    for (int64_t e = 0; e < ps.w; ++e) sg[e] *= lo[e];
    for (int64_t e = 0; e < ps.w; ++e) sg[ps.w + e] *= hi[e];
    lo = sg;
    hi = sg + ps.w;
  };
  // The block's (gated) gradient rows summed (Kahan; comp scratch) and divided by the block's end.
  auto block_grad = [&](const ScanTask& t, const PairSpan& ps, int64_t blk, int64_t bend, acc_t* G, acc_t* comp,
                        acc_t* x, acc_t* sg, acc_t* sx) {
    std::fill(G, G + t.width, acc_t(0));
    std::fill(comp, comp + t.width, acc_t(0));
    for (int64_t n = blk; n < bend; ++n) {
      const acc_t *lo, *hi;
      grad_rows(t, ps, n, x, sg, sx, lo, hi);
      for (int64_t e = 0; e < ps.w; ++e) math::kahan_add(G[e], comp[e], lo[e]);
      for (int64_t e = 0; e < ps.w; ++e) math::kahan_add(G[ps.w + e], comp[ps.w + e], hi[e]);
    }
    const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
    for (int64_t e = 0; e < t.width; ++e) G[e] = (G[e] - comp[e]) * inv;
  };
  // Pass 1: totals of every chunk with a predecessor in its group (the reverse scan's carries).
  std::vector<double> tot(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(6, W);
    acc_t *x = buf[0], *G = buf[1], *f = buf[2], *Gc = buf[3], *sg = buf[4], *sx = buf[5];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      if (i == t.group_first) continue;
      const PairSpan ps(t, rot.P);
      std::fill(f, f + W, acc_t(0));
      int64_t rows = 0;
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        block_grad(t, ps, blk, std::min(blk + F, t.n1), G, Gc, x, sg, sx);
        for (int64_t e = 0; e < t.width; ++e) f[e] += G[e];
        if (++rows % kFlushRows == 0) flush(f, &tot[i * W], t.width);
      }
      flush(f, &tot[i * W], t.width);
    }
  });
  part.assign(nt * deg * W, 0.0);
  // Pass 2: reverse scan of every chunk from its carry.
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    // Then, token-causal, 5 buffers for each row of a pass: the gradient row, the gated gradient, gate scratch,
    // the input row, the output row.
    RowBufs<acc_t> buf(10 + 5 * kScanRows, W);
    acc_t *x = buf[0], *G = buf[1], *Gc = buf[2], *acc = buf[3], *comp = buf[4], *gb = buf[5], *gp = buf[6],
          *gx = buf[7], *sg = buf[8], *sx = buf[9];
    RowBufs<acc_t> fbuf(1, deg * W);
    acc_t* f = fbuf[0];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      const PairSpan ps(t, rot.P);
      double* d = &part[i * deg * W];
      acc_t *f_lo = f, *f_hi = f + deg * ps.w;
      std::fill(f, f + deg * W, acc_t(0));
      start_from_carry(tot, W, t, i, true, acc, comp);
      auto drain = [&] { flush(f, d, 2 * deg * ps.w); };
      int64_t rows = 0;
      const int64_t nblocks = t.n1 > t.n0 ? ceil_div(t.n1 - t.n0, F) : 0;
      if (F == 1) {  // token-causal: rows n, n - 1, ..., n - R + 1 in one pass (R = kScanRows), then single rows
        auto pass = [&](auto Rc, int64_t n) {
          constexpr int R = decltype(Rc)::value;
          const acc_t *glo[R], *ghi[R], *xlo[R], *xhi[R], *cr[R], *sr[R];
          acc_t *gxa[R], *gxb[R];
          acc_t inv[R];
          for (int q = 0; q < R; ++q) {  // the rows kRopePrefetchRows ahead in the walk (before n in memory)
            const int64_t m = n - q - kRopePrefetchRows;
            if (m < t.n0) break;
            prefetch_pairs(g, gr, t.b, m, ps, false);
            prefetch_pairs(h, hr, t.b, m, ps, false);
            prefetch_pairs(gh, ghr, t.b, m, ps, true);
          }
          for (int q = 0; q < R; ++q) {
            const int64_t m = n - q;
            grad_rows(t, ps, m, buf[10 + 5 * q], buf[11 + 5 * q], buf[12 + 5 * q], glo[q], ghi[q]);
            pass_row(h, hr, gh, ghr, rot, t.b, m, ps, buf[13 + 5 * q], buf[14 + 5 * q], xlo[q], xhi[q], cr[q], sr[q],
                     gxa[q], gxb[q], inv[q]);
          }
          rope_scan_rows_backward<K, R>(xlo, xhi, glo, ghi, inv, cr, sr, acc, comp, gxa, gxb, f_lo, f_hi, cT.data(),
                                        E, ps.a, ps.b, ps.w, deg, ag);
          for (int q = 0; q < R; ++q) {
            scalar_t* grow = gh + ghr.off(t.b, n - q);
            commit_row(grow + ps.a, ps.w, gxa[q]);
            commit_row(grow + ps.b, ps.w, gxb[q]);
          }
          rows += R;
          if (rows >= kFlushRows) {
            drain();
            rows = 0;
          }
        };
        int64_t n = t.n1 - 1;
        for (; n - kScanRows + 1 >= t.n0; n -= kScanRows) pass(std::integral_constant<int, kScanRows>{}, n);
        for (; n >= t.n0; --n) pass(std::integral_constant<int, 1>{}, n);
        drain();
        continue;
      }
      for (int64_t j = nblocks - 1; j >= 0; --j) {
        const int64_t blk = t.n0 + j * F, bend = std::min(blk + F, t.n1);
        {
          block_grad(t, ps, blk, bend, G, Gc, x, sg, sx);
          for (int64_t e = 0; e < t.width; ++e) {
            math::kahan_add(acc[e], comp[e], G[e]);
            gb[e] = acc[e] - comp[e];
          }
        }
        for (int64_t n = bend - 1; n >= blk; --n) {
          const int64_t r = rot.row(t.b, n, ps.sec) + ps.i0;
          turn_back(gb, gb + ps.w, gp, gp + ps.w, rot.cos + r, rot.sin + r, ps.w);
          const acc_t *lo, *hi;
          pair_rows(h, hr, t.b, n, ps, x, lo, hi);
          scalar_t* grow = gh + ghr.off(t.b, n);
          acc_t* gxa = out_row(grow + ps.a, gx);
          poly_row_backward<K, true, false, acc_t>(lo, gp, acc_t(1), gxa, f_lo, nullptr, cT.data(), E, ps.a, ps.w,
                                                   deg, ag);
          commit_row(grow + ps.a, ps.w, gxa);
          acc_t* gxb = out_row(grow + ps.b, gx);
          poly_row_backward<K, true, false, acc_t>(hi, gp + ps.w, acc_t(1), gxb, f_hi, nullptr, cT.data(), E, ps.b,
                                                   ps.w, deg, ag);
          commit_row(grow + ps.b, ps.w, gxb);
          if (++rows % kFlushRows == 0) drain();
        }
      }
      drain();
    }
  });
}

// Gradient of the gate inputs of the gated rope op, by a forward scan that recomputes H~: the gradient reaching
// s~ of a gate is the sum over its q channels of g H~; turned back by the gate tables (R_g^T) and times
// hardsigmoid'(pre + bias). Bias partials per task (fp64, tasks x W: the w / q gates of the first halves, then the
// w / q of the second halves).
template <typename scalar_t, int K>
void rope_causal_gate_backward(const scalar_t* g, const Rows& gr, const scalar_t* h, const Rows& hr, int64_t E,
                               const std::vector<at::opmath_type<scalar_t>>& cT, int deg, int64_t F,
                               const std::vector<ScanTask>& tasks, const Rotation<at::opmath_type<scalar_t>>& rot,
                               const RopeGate<scalar_t>& gate, scalar_t* gpre, const Rows& gpr,
                               std::vector<double>& bpart) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nt = static_cast<int64_t>(tasks.size());
  const int64_t W = max_width(tasks), q = gate.gate.q;
  const std::vector<double> tot = rope_forward_carries<scalar_t, K>(h, hr, E, cT, deg, tasks, rot, W);
  bpart.assign(nt * W, 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    RowBufs<acc_t> buf(9, W);
    acc_t *x = buf[0], *p = buf[1], *run = buf[2], *comp = buf[3], *Hb = buf[4], *gy = buf[5], *gs = buf[6],
          *gp = buf[7], *fb = buf[8];
    for (int64_t i = t0; i < t1; ++i) {
      const ScanTask& t = tasks[i];
      const PairSpan ps(t, rot.P);
      const int64_t nh = ps.w / q;
      start_from_carry(tot, W, t, i, false, run, comp);
      std::fill(fb, fb + W, acc_t(0));
      int64_t rows = 0;
      for (int64_t blk = t.n0; blk < t.n1; blk += F) {
        const int64_t bend = std::min(blk + F, t.n1);
        // H~ of the block (token-causal: of the row), as the forward computes it.
        for (int64_t n = blk; n < bend; ++n) {
          rope_row<K>(h, hr, t, ps, n, rot, cT, E, deg, x, p);
          accumulate(p, run, comp, t.width);
        }
        const acc_t inv = acc_t(1) / static_cast<acc_t>(bend);
        for (int64_t e = 0; e < t.width; ++e) Hb[e] = (run[e] - comp[e]) * inv;
        for (int64_t n = blk; n < bend; ++n) {
          const acc_t *glo, *ghi;
          pair_rows(g, gr, t.b, n, ps, gy, glo, ghi);
          for (int64_t j = 0; j < nh; ++j) {
            acc_t sl = 0, sh = 0;
            for (int64_t e = j * q; e < (j + 1) * q; ++e) {
              sl += glo[e] * Hb[e];
              sh += ghi[e] * Hb[ps.w + e];
            }
            gs[j] = sl;
            gs[nh + j] = sh;
          }
          gate.inputs(t.b, n, ps, x);
          const int64_t r = gate.table_row(t.b, n, ps);
          turn_back(gs, gs + nh, gp, gp + nh, gate.rot.cos + r, gate.rot.sin + r, nh);
          for (int64_t j = 0; j < 2 * nh; ++j) {
            gp[j] *= math::hsig_grad(x[j]);
            fb[j] += gp[j];
          }
          scalar_t* dst = gpre + gpr.off(t.b, n);
          for (int64_t j = 0; j < nh; ++j) dst[(ps.a / q + j) * gpr.sE] = static_cast<scalar_t>(gp[j]);
          for (int64_t j = 0; j < nh; ++j) dst[(ps.b / q + j) * gpr.sE] = static_cast<scalar_t>(gp[nh + j]);
          if (++rows % kFlushRows == 0) flush(fb, &bpart[i * W], 2 * nh);
        }
      }
      flush(fb, &bpart[i * W], 2 * nh);
    }
  });
}

// Each rope task owns deg * W slots of `part`: deg * w for its first channels, then deg * w for its second.
inline at::Tensor rope_coeff_grad(const std::vector<double>& part, const std::vector<ScanTask>& tasks, int64_t P,
                                  int deg, int64_t E, const at::Tensor& coeff) {
  const int64_t W = max_width(tasks);
  std::vector<int64_t> e0s, widths;
  std::vector<double> packed;
  packed.reserve(part.size());
  for (size_t i = 0; i < tasks.size(); ++i) {
    const PairSpan ps(tasks[i], P);
    e0s.insert(e0s.end(), {ps.a, ps.b});
    widths.insert(widths.end(), {ps.w, ps.w});
    packed.insert(packed.end(), part.begin() + i * deg * W, part.begin() + i * deg * W + 2 * deg * ps.w);
  }
  return reduce_coeff_grad(packed, e0s, widths, deg, E, coeff);
}

// ---------------------------------------------------------------------------
// Entry points.
// ---------------------------------------------------------------------------

#if POM_CPU_PART == 1
at::Tensor poly_mean_rope_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                              const at::Tensor& sin, const at::Tensor& positions,
                              const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_mean_rope";
  checks::mean_rope_args(op, h, coeff, cos, sin, positions, weight, cu_seqlens);
  const RopeTensors rope(op, h, cos, sin, positions, cu_seqlens);
  return mean_op(op, h, coeff, weight, cu_seqlens, &rope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_mean_rope_backward_cpu(
    const at::Tensor& grad_H, const at::Tensor& H, const at::Tensor& h, const at::Tensor& coeff,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& cu_seqlens, bool weight_grad) {
  const char* op = "pom_ext::poly_mean_rope_backward";
  checks::mean_rope_backward_args(op, grad_H, H, h, coeff, cos, sin, positions, weight, cu_seqlens, weight_grad);
  const RopeTensors rope(op, h, cos, sin, positions, cu_seqlens);
  return mean_backward_op(op, grad_H, H, h, coeff, weight, cu_seqlens, weight_grad, &rope);
}
#endif

// What the causal rope ops derive from their arguments: the packed offsets, the rows of h, the tables and
// positions, and the pair tasks (holding whole gates of q channels for the gated op). Not copyable: cup points
// into cu.
struct RopeCausalSetup {
  int deg;
  int64_t E, B;
  std::vector<int64_t> cu;
  const int64_t* cup;
  at::Tensor h;
  Rows hr;
  RopeTensors rope;
  std::vector<ScanTask> tasks;
  RopeCausalSetup(const char* op, const at::Tensor& h_, const at::Tensor& coeff, const at::Tensor& cos,
                  const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,
                  const c10::optional<at::Tensor>& cu_seqlens, int64_t q = 1)
      : deg(static_cast<int>(coeff.size(1))), E(coeff.size(0)), B(checks::batch_of(h_, cu_seqlens)),
        cu(host_offsets(op, cu_seqlens, h_.size(0))), cup(cu_seqlens ? cu.data() : nullptr), h(h_),
        hr(rows_of(h, cup)), rope(op, h, cos, sin, positions, cu_seqlens),
        tasks(scan_tasks_over(hr, B, rope_blocks(rope.P, rope.S, task_channels(hr, B), q), block_size)) {}
  RopeCausalSetup(const RopeCausalSetup&) = delete;
  RopeCausalSetup& operator=(const RopeCausalSetup&) = delete;
};

// The plain (gate_bias unused, pre undefined) or gated forward.
inline at::Tensor rope_causal_op(const RopeCausalSetup& a, const at::Tensor& coeff, int64_t block_size,
                                 const at::Tensor& pre, const c10::optional<at::Tensor>& gate_bias) {
  auto sizes = a.h.sizes().vec();
  auto out = pooled_empty(sizes, a.h.options());
  const Rows outr = rows_of(out, a.cup);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.h.scalar_type(), "poly_causal_rope_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const Rotation<acc_t> rot = a.rope.rotation<acc_t>(a.cup);
    RopeGate<scalar_t> gate;
    if (pre.defined()) gate = {make_gate<scalar_t>(pre, a.cup, a.E, gate_bias), a.rope.rotation<acc_t>(a.cup, true)};
    dispatch_degree(a.deg, [&](auto Kc) {
      rope_causal_forward<scalar_t, decltype(Kc)::value>(a.h.data_ptr<scalar_t>(), a.hr, a.E, cT, a.deg, block_size,
                                                         a.tasks, rot, pre.defined() ? &gate : nullptr,
                                                         out.data_ptr<scalar_t>(), outr);
    });
  });
  return out;
}

#if POM_CPU_PART == 2
at::Tensor poly_causal_rope_cpu(const at::Tensor& h, const at::Tensor& coeff, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& positions, int64_t block_size,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_rope";
  checks::causal_rope_args(op, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  const RopeCausalSetup a(op, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  return rope_causal_op(a, coeff, block_size, at::Tensor(), c10::nullopt);
}

// Gated: hs = [h | pre] (E + S columns), y = s~ * H~ with s~ = R_g(positions) hardsigmoid(pre + bias) turned by
// the gate tables (per gate group of E / S channels).
at::Tensor poly_causal_gated_rope_cpu(const at::Tensor& hs, const at::Tensor& coeff,
                                      const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& gate_cos, const at::Tensor& gate_sin,
                                      const at::Tensor& positions, int64_t block_size,
                                      const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_rope";
  checks::causal_gated_rope_args(op, hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions, block_size,
                                 cu_seqlens);
  const int64_t E = coeff.size(0), S = hs.size(-1) - E;
  RopeCausalSetup a(op, hs.narrow(-1, 0, E), coeff, cos, sin, positions, block_size, cu_seqlens, E / S);
  a.rope.gate(gate_cos, gate_sin);
  return rope_causal_op(a, coeff, block_size, hs.narrow(-1, E, S), gate_bias);
}
#endif

#if POM_CPU_PART == 4
std::tuple<at::Tensor, at::Tensor> poly_causal_rope_backward_cpu(const at::Tensor& grad_H, const at::Tensor& h,
                                                                 const at::Tensor& coeff, const at::Tensor& cos,
                                                                 const at::Tensor& sin, const at::Tensor& positions,
                                                                 int64_t block_size,
                                                                 const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_rope_backward";
  checks::causal_rope_backward_args(op, grad_H, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  const RopeCausalSetup a(op, h, coeff, cos, sin, positions, block_size, cu_seqlens);
  auto g = grad_H.scalar_type() == h.scalar_type() ? grad_H : grad_H.to(h.scalar_type());
  const Rows gr = rows_of(g, a.cup);
  auto gh = pooled_empty(h.sizes(), h.options());
  const Rows ghr = rows_of(gh, a.cup);
  at::Tensor gc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "poly_causal_rope_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const Rotation<acc_t> rot = a.rope.rotation<acc_t>(a.cup);
    std::vector<double> part;
    dispatch_degree(a.deg, [&](auto Kc) {
      rope_causal_backward<scalar_t, decltype(Kc)::value>(g.data_ptr<scalar_t>(), gr, h.data_ptr<scalar_t>(), a.hr,
                                                          a.E, cT, a.deg, block_size, a.tasks, rot, nullptr,
                                                          gh.data_ptr<scalar_t>(), ghr, part);
    });
    gc = rope_coeff_grad(part, a.tasks, a.rope.P, a.deg, a.E, coeff);
  });
  return {gh, gc};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> poly_causal_gated_rope_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& hs, const at::Tensor& coeff,
    const c10::optional<at::Tensor>& gate_bias, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& gate_cos, const at::Tensor& gate_sin, const at::Tensor& positions, int64_t block_size,
    const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = "pom_ext::poly_causal_gated_rope_backward";
  checks::causal_gated_rope_backward_args(op, grad_y, hs, coeff, gate_bias, cos, sin, gate_cos, gate_sin, positions,
                                          block_size, cu_seqlens);
  const int64_t E = coeff.size(0), S = hs.size(-1) - E, q = E / S;
  RopeCausalSetup a(op, hs.narrow(-1, 0, E), coeff, cos, sin, positions, block_size, cu_seqlens, q);
  a.rope.gate(gate_cos, gate_sin);
  const at::Tensor pre = hs.narrow(-1, E, S);
  auto g = grad_y.scalar_type() == hs.scalar_type() ? grad_y : grad_y.to(hs.scalar_type());
  const Rows gr = rows_of(g, a.cup);
  // One buffer for both gradients, with the layout of a contiguous hs.
  auto ghs = pooled_empty(hs.sizes(), hs.options());
  const at::Tensor gh = ghs.narrow(-1, 0, E), gpre = ghs.narrow(-1, E, S);
  const Rows ghr = rows_of(gh, a.cup), gpr = rows_of(gpre, a.cup);
  at::Tensor gc, gbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hs.scalar_type(), "poly_causal_gated_rope_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto cT = coeff_table<acc_t>(coeff);
    const Rotation<acc_t> rot = a.rope.rotation<acc_t>(a.cup);
    const RopeGate<scalar_t> gate{make_gate<scalar_t>(pre, a.cup, E, gate_bias), a.rope.rotation<acc_t>(a.cup, true)};
    std::vector<double> part, bpart;
    dispatch_degree(a.deg, [&](auto Kc) {
      constexpr int Kv = decltype(Kc)::value;
      rope_causal_gate_backward<scalar_t, Kv>(g.data_ptr<scalar_t>(), gr, a.h.data_ptr<scalar_t>(), a.hr, E, cT,
                                              a.deg, block_size, a.tasks, rot, gate, gpre.data_ptr<scalar_t>(), gpr,
                                              bpart);
      rope_causal_backward<scalar_t, Kv>(g.data_ptr<scalar_t>(), gr, a.h.data_ptr<scalar_t>(), a.hr, E, cT, a.deg,
                                         block_size, a.tasks, rot, &gate, gh.data_ptr<scalar_t>(), ghr, part);
    });
    gc = rope_coeff_grad(part, a.tasks, a.rope.P, a.deg, E, coeff);
    // Bias: each task's partials of its two spans of w / q gates, summed in task order.
    const int64_t W = max_width(a.tasks);
    std::vector<double> bsum(S, 0.0);
    for (size_t i = 0; i < a.tasks.size(); ++i) {
      const PairSpan ps(a.tasks[i], a.rope.P);
      const int64_t nh = ps.w / q;
      for (int64_t j = 0; j < nh; ++j) {
        bsum[ps.a / q + j] += bpart[i * W + j];
        bsum[ps.b / q + j] += bpart[i * W + nh + j];
      }
    }
    gbias = gate_bias_grad(bsum, gate_bias, hs);
  });
  return {ghs, gc, gbias};
}
#endif

}  // namespace POM_CPU_ARCH
}  // namespace cpu
}  // namespace pom_ext
