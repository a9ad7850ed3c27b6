// The lanes of the CUDA rope scans (csrc/cuda/plan.h, rope_lane) on the CPU: for random table widths P,
// sections S, vector widths V and block widths, every channel is owned by exactly one lane, a lane's partner
// (lane ^ 16, same warp) owns the other half of the same pairs, and the kernels' turn of the features
// (p~ = c p - sign s p_partner) and of the suffix sums (u = c G + sign s G_partner) computed lane by lane equal
// the rotation R(pos) and its transpose applied to whole rows. The gated rope op's gate (q channels a gate, gate
// tables of Pg = P / q columns): the gates of a lane's channels pair with those of its partner's, so the turned gate
// from the lane's gate values and the partner's equals R_g(pos) applied to whole gate rows, and the gate gradient
// turned back channel by channel and summed over each gate's channels equals R_g^T applied to the gates' sums; the
// run sums of the q > 1 path (runs of gcd(q, V) channels) never cross a lane's end. Exits 1 on any mismatch,
// printing the case. Built and run by tests/test_scan_plan.py (no torch, no CUDA).
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "plan.h"

using namespace pom_ext::cuda::plan;

namespace {

bool run(int64_t P, int64_t S, int V, int64_t tx, int64_t q, std::mt19937_64& rng, int id) {
  const int64_t E = 2 * P * S, N = 5, L = 7, Pg = P / q, Sg = E / q;
  const int64_t threads = cdiv(rope_lanes(P, S, V), tx) * tx;  // the grid's tiles times the block
  std::normal_distribution<double> nd;
  auto randn = [&](int64_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = nd(rng);
    return v;
  };
  const std::vector<double> cosv = randn(L * P), sinv = randn(L * P), p = randn(N * E), G = randn(N * E);
  std::vector<int64_t> pos(N * S);
  for (auto& v : pos) v = static_cast<int64_t>(rng() % L);
  // The gate: values x (N, Sg), tables (L, Pg); gH = g H~ per channel (the gate gradient's input).
  const std::vector<double> gcos = randn(L * Pg), gsin = randn(L * Pg), x = randn(N * Sg), gH = randn(N * E);
  // Whole rows of width W = 2 Q S turned pair by pair by tables (L, Q) at the positions: R (sign +1) or R^T (-1).
  auto turn_rows = [&](const std::vector<double>& c, const std::vector<double>& sn, int64_t Q,
                       const std::vector<double>& in, int sign) {
    const int64_t W = 2 * Q * S;
    std::vector<double> out(N * W);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t i = 0; i < Q; ++i) {
          const int64_t a = n * W + 2 * Q * s + i, b = a + Q, t = pos[n * S + s] * Q + i;
          out[a] = c[t] * in[a] - sign * sn[t] * in[b];
          out[b] = c[t] * in[b] + sign * sn[t] * in[a];
        }
    return out;
  };
  // Direct: s~ = R_g x over whole gate rows; d = R_g^T D, D the sums of gH over each gate's q channels.
  std::vector<double> D(N * Sg, 0.0), dlane(N * Sg, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) D[n * Sg + e / q] += gH[n * E + e];
  const std::vector<double> st = turn_rows(gcos, gsin, Pg, x, 1), d = turn_rows(gcos, gsin, Pg, D, -1);
  // Direct: p~ = R p, u = R^T G over whole rows.
  const std::vector<double> pt = turn_rows(cosv, sinv, P, p, 1), u = turn_rows(cosv, sinv, P, G, -1);
  std::vector<int> owner(E, 0);
  auto fail = [&](const char* what, int64_t t) {
    std::printf("case %d (P=%lld S=%lld V=%d tx=%lld): lane %lld: %s\n", id, (long long)P, (long long)S, V,
                (long long)tx, (long long)t, what);
    return false;
  };
  for (int64_t t = 0; t < threads; ++t) {
    const RopeLane r = rope_lane(t, P, S, V);
    if (r.nv == 0) continue;
    const RopeLane pr = rope_lane(t ^ 16, P, S, V);
    if (pr.nv != r.nv || pr.sec != r.sec || pr.col0 != r.col0 || pr.sign != -r.sign || pr.e0 != r.e0 + r.sign * P)
      return fail("its partner lane does not own the other half of its pairs", t);
    if (r.e0 != 2 * P * r.sec + r.col0 + (r.sign > 0 ? 0 : P) || r.col0 + r.nv > P || r.sec >= S)
      return fail("channels outside its section half", t);
    if (P % V == 0 && (r.e0 % V != 0 || r.nv != V)) return fail("not a whole aligned vector with P % V == 0", t);
    const int64_t run = std::gcd(q, static_cast<int64_t>(V));
    if (r.nv % run != 0 || r.e0 % run != 0) return fail("a run of the gate gradient's sums crosses the lane's end", t);
    for (int j = 0; j < r.nv; ++j) {
      ++owner[r.e0 + j];
      const int64_t gi = (r.e0 + j) / q, gp = (pr.e0 + j) / q;  // the lane's gate and the shuffle's
      if (gp != gi + r.sign * Pg) return fail("the partner lane's gate is not the partner gate", t);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t tab = pos[n * S + r.sec] * Pg + (r.col0 + j) / q;  // gate_factors
        const double lane_st = gcos[tab] * x[n * Sg + gi] - r.sign * gsin[tab] * x[n * Sg + gp];
        if (std::fabs(lane_st - st[n * Sg + gi]) > 1e-12) return fail("turned gate differs", t);
        dlane[n * Sg + gi] += gcos[tab] * gH[n * E + r.e0 + j] + r.sign * gsin[tab] * gH[n * E + pr.e0 + j];
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t tab = pos[n * S + r.sec] * P + r.col0 + j;
        const double own = p[n * E + r.e0 + j], partner = p[n * E + pr.e0 + j];  // the shuffle's value
        const double lane_pt = cosv[tab] * own - r.sign * sinv[tab] * partner;
        const double lane_u = cosv[tab] * G[n * E + r.e0 + j] + r.sign * sinv[tab] * G[n * E + pr.e0 + j];
        if (std::fabs(lane_pt - pt[n * E + r.e0 + j]) > 1e-12) return fail("turned features differ", t);
        if (std::fabs(lane_u - u[n * E + r.e0 + j]) > 1e-12) return fail("turned-back gradient differs", t);
      }
    }
  }
  for (int64_t k = 0; k < N * Sg; ++k)
    if (std::fabs(dlane[k] - d[k]) > 1e-10) return fail("turned-back gate gradient differs (gate sums)", k % Sg);
  for (int64_t e = 0; e < E; ++e)
    if (owner[e] != 1) {
      std::printf("case %d (P=%lld S=%lld V=%d tx=%lld): channel %lld owned %d times\n", id, (long long)P,
                  (long long)S, V, (long long)tx, (long long)e, owner[e]);
      return false;
    }
  return true;
}

}  // namespace

int main() {
  std::mt19937_64 rng(99);
  const int Vs[] = {2, 4, 8};
  int cases = 0;
  for (int id = 0; id < 2000; ++id) {
    const int64_t P = 1 + rng() % (id % 4 == 0 ? 300 : 40), S = 1 + rng() % 3;
    const int V = Vs[rng() % 3];
    const int64_t tx = 32 * (1 + rng() % 4);
    std::vector<int64_t> divisors;  // q: channels a gate, a divisor of P
    for (int64_t k = 1; k <= P; ++k)
      if (P % k == 0) divisors.push_back(k);
    const int64_t q = id % 3 == 0 ? 1 : divisors[rng() % divisors.size()];
    if (!run(P, S, V, tx, q, rng, id)) return 1;
    ++cases;
  }
  std::printf("rope lanes: %d cases passed\n", cases);
  return 0;
}
