// The chunked scans of csrc/cuda run on the CPU with their own index arithmetic (csrc/cuda/plan.h): forward
// (chunk totals, exclusive carries, then each chunk's rows) and backward (chunk totals of the output gradient,
// reverse carries, then each chunk's rows), for both plans (whole blocks, split blocks), dense and packed with
// empty sequences, against the block-causal means and their gradient computed directly. Exits 1 on any
// mismatch, printing the case. Built and run by tests/test_scan_plan.py (no torch, no CUDA).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "plan.h"

using namespace pom_ext::cuda::plan;

namespace {

struct Case {
  std::vector<int64_t> lens;
  int64_t F, want;
};

// Direct: H_t = sum_{m < e(t)} p_m / e(t), e(t) = min((t / F + 1) F, len); dL/dp_m = sum_t g_t [m < e(t)] / e(t).
void direct(const std::vector<double>& p, const std::vector<double>& g, int64_t F, std::vector<double>& H,
            std::vector<double>& gp) {
  const int64_t len = static_cast<int64_t>(p.size());
  H.assign(len, 0.0);
  gp.assign(len, 0.0);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t e = std::min((t / F + 1) * F, len);
    double s = 0;
    for (int64_t m = 0; m < e; ++m) s += p[m];
    H[t] = s / e;
    for (int64_t m = 0; m < e; ++m) gp[m] += g[t] / e;
  }
}

bool run(const Case& cs, std::mt19937_64& rng, int id) {
  const ChunkPlan pl = make_plan(cs.F, cs.want);
  const int64_t B = static_cast<int64_t>(cs.lens.size());
  // Packed offsets of rows and of chunks, as chunk_offsets_kernel computes them.
  std::vector<int64_t> cu(B + 1, 0), off(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    cu[b + 1] = cu[b] + cs.lens[b];
    off[b + 1] = off[b] + chunks_of_len(pl, cs.lens[b]);
  }
  const int64_t total = cu[B], nchunks = off[B];
  std::normal_distribution<double> nd;
  std::vector<double> p(total), g(total);
  for (auto& v : p) v = nd(rng);
  for (auto& v : g) v = nd(rng);

  // Every chunk: its sequence and rows, through find_sequence and chunk_rows; the rows must tile each sequence.
  std::vector<int64_t> cb(nchunks), c0(nchunks), c1(nchunks);
  std::vector<int64_t> covered(total, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    int64_t b;
    if (!find_sequence(off.data(), B, c, b)) return std::printf("case %d: chunk %lld not found\n", id, (long long)c), false;
    chunk_rows(pl, cs.lens[b], c - off[b], c0[c], c1[c]);
    cb[c] = b;
    if (c0[c] > c1[c] || c1[c] > cs.lens[b] || (pl.cpb == 0 && c1[c] - c0[c] > pl.R) || c1[c] - c0[c] > pl.R)
      return std::printf("case %d: chunk %lld rows [%lld, %lld)\n", id, (long long)c, (long long)c0[c], (long long)c1[c]), false;
    for (int64_t n = c0[c]; n < c1[c]; ++n) ++covered[cu[b] + n];
  }
  int64_t dummy;
  if (find_sequence(off.data(), B, nchunks, dummy)) return std::printf("case %d: chunk past the end found\n", id), false;
  for (int64_t r = 0; r < total; ++r)
    if (covered[r] != 1) return std::printf("case %d: row %lld covered %lld times\n", id, (long long)r, (long long)covered[r]), false;

  // Pass 1 and 2 of the forward: chunk totals, exclusive carries per sequence.
  std::vector<double> tot(nchunks, 0.0), carry(nchunks, 0.0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t n = c0[c]; n < c1[c]; ++n) tot[c] += p[cu[cb[c]] + n];
  for (int64_t b = 0; b < B; ++b) {
    double run = 0;
    for (int64_t c = off[b]; c < off[b + 1]; ++c) {
      carry[c] = run;
      run += tot[c];
    }
  }
  // Pass 3: each chunk's rows.
  std::vector<double> H(total, NAN);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = cb[c], len = cs.lens[b], lc = c - off[b];
    if (pl.cpb > 0) {
      const int64_t j = block_of(pl, lc);
      const int64_t cl = off[b] + last_chunk_of_block(pl, j);
      const double S = carry[cl] + tot[cl];
      for (int64_t n = c0[c]; n < c1[c]; ++n) H[cu[b] + n] = S / block_end(pl, len, j);
      continue;
    }
    double run = carry[c];
    for (int64_t blk = c0[c]; blk < c1[c]; blk += pl.F) {
      const int64_t bend = std::min(blk + pl.F, c1[c]);
      if (pl.F == 1) {
        run += p[cu[b] + blk];
        H[cu[b] + blk] = run / (blk + 1);
        continue;
      }
      for (int64_t n = blk; n < bend; ++n) run += p[cu[b] + n];
      for (int64_t n = blk; n < bend; ++n) H[cu[b] + n] = run / block_end_of_row(pl, len, n);
    }
  }
  // Backward: G = g / e(t) summed per chunk (whole blocks: per block), reverse carries, then each chunk's rows.
  std::vector<double> gt(nchunks, 0.0), rcarry(nchunks, 0.0), gbar(total, NAN);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = cb[c], len = cs.lens[b];
    for (int64_t n = c0[c]; n < c1[c]; ++n) gt[c] += g[cu[b] + n] / block_end_of_row(pl, len, n);
  }
  for (int64_t b = 0; b < B; ++b) {
    double run = 0;
    for (int64_t c = off[b + 1] - 1; c >= off[b]; --c) {
      rcarry[c] = run;
      run += gt[c];
    }
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = cb[c], len = cs.lens[b], lc = c - off[b];
    if (pl.cpb > 0) {
      const int64_t cf = off[b] + first_chunk_of_block(pl, block_of(pl, lc));
      for (int64_t n = c0[c]; n < c1[c]; ++n) gbar[cu[b] + n] = rcarry[cf] + gt[cf];
      continue;
    }
    double run = rcarry[c];
    int64_t n = c1[c];
    while (n > c0[c]) {  // blocks of the chunk from its end
      const int64_t blk = (n - 1) / pl.F * pl.F;
      const int64_t start = std::max(blk, c0[c]);
      double G = 0;
      for (int64_t m = start; m < n; ++m) G += g[cu[b] + m] / block_end_of_row(pl, len, m);
      run += G;
      for (int64_t m = start; m < n; ++m) gbar[cu[b] + m] = run;
      n = start;
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> pb(p.begin() + cu[b], p.begin() + cu[b + 1]), gb(g.begin() + cu[b], g.begin() + cu[b + 1]);
    std::vector<double> Hd, gpd;
    direct(pb, gb, pl.F, Hd, gpd);
    for (int64_t n = 0; n < cs.lens[b]; ++n) {
      const double eh = std::fabs(H[cu[b] + n] - Hd[n]), eg = std::fabs(gbar[cu[b] + n] - gpd[n]);
      if (!(eh <= 1e-9 * (1 + std::fabs(Hd[n]))) || !(eg <= 1e-9 * (1 + std::fabs(gpd[n])))) {
        std::printf("case %d: F=%lld want=%lld R=%lld cpb=%lld seq %lld len %lld row %lld: H %.12g vs %.12g, "
                    "grad %.12g vs %.12g\n", id, (long long)pl.F, (long long)cs.want, (long long)pl.R,
                    (long long)pl.cpb, (long long)b, (long long)cs.lens[b], (long long)n, H[cu[b] + n], Hd[n],
                    gbar[cu[b] + n], gpd[n]);
        return false;
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  int cases = 0, split = 0;
  for (int id = 0; id < 3000; ++id) {
    Case cs;
    const int64_t B = 1 + rng() % 4;
    for (int64_t b = 0; b < B; ++b) cs.lens.push_back(rng() % 5 == 0 ? 0 : 1 + rng() % (id % 3 == 0 ? 400 : 60));
    const int64_t Fs[] = {1, 1, 2, 3, 4, 7, 16, 33, 64, 100, 257, 1000};
    cs.F = Fs[rng() % 12];
    cs.want = 1 + rng() % 80;
    split += make_plan(cs.F, cs.want).cpb > 0;
    if (!run(cs, rng, id)) return 1;
    ++cases;
  }
  std::printf("scan plan: %d cases passed (%d with split blocks)\n", cases, split);
  return 0;
}
