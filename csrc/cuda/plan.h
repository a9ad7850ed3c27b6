// Index arithmetic of the chunked scans (causal and block-causal, dense and packed): which rows a chunk holds,
// and where a block's sums are found. __host__ __device__ and free of CUDA and torch, so that
// tests/cpp/scan_plan_test.cpp runs the scans' logic on the CPU with these very functions.
//
// A sequence of len rows is cut into chunks (a block of the grid each). Two plans:
//  - whole blocks (cpb == 0): chunks of R rows, R a multiple of the block size F; a chunk holds R / F blocks
//    (F = 1: the token-causal scan). Each chunk rescans its rows from the carry of the chunks before it.
//  - split blocks (cpb > 0), when F is larger than the rows a chunk should hold: every F-block is cut into cpb
//    chunks of at most R rows (a short last block leaves empty chunks at its end). A block's sum up to its end
//    is then the exclusive carry plus the total of its last chunk, and the backward's suffix sum from a block
//    on is the reverse carry plus the total of its first chunk: the chunks need no rescan of each other.
#pragma once

#include <cstdint>

#include "pom_ext/poly_math.h"  // POM_HD

namespace pom_ext {
namespace cuda {
namespace plan {

struct ChunkPlan {
  int64_t R = 1;    // rows per chunk (at most)
  int64_t F = 1;    // block size
  int64_t cpb = 0;  // chunks per block when blocks are split, else 0
};

POM_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
POM_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
POM_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// The plan for block size F when a chunk should hold about `want` rows: whole blocks when F <= want (R the
// multiple of F nearest below want, at least F), else blocks split into chunks of `want` rows.
POM_HD ChunkPlan make_plan(int64_t F, int64_t want) {
  ChunkPlan p;
  p.F = imax(F, 1);
  want = imax(want, 1);
  if (p.F <= want) {
    p.R = imax(p.F, want / p.F * p.F);
    p.cpb = 0;
  } else {
    p.R = want;
    p.cpb = cdiv(p.F, want);
  }
  return p;
}

// Chunks of a sequence of len rows.
POM_HD int64_t chunks_of_len(const ChunkPlan& p, int64_t len) {
  if (len <= 0) return 0;
  return p.cpb == 0 ? cdiv(len, p.R) : cdiv(len, p.F) * p.cpb;
}

// Rows [n0, n1) of local chunk lc (0-based within its sequence) of a sequence of len rows; n0 == n1 for the
// empty chunks at the end of a short last block.
POM_HD void chunk_rows(const ChunkPlan& p, int64_t len, int64_t lc, int64_t& n0, int64_t& n1) {
  if (p.cpb == 0) {
    n0 = lc * p.R;
    n1 = imin(n0 + p.R, len);
    return;
  }
  const int64_t j = lc / p.cpb;
  const int64_t bend = imin((j + 1) * p.F, len);
  n0 = imin(j * p.F + (lc - j * p.cpb) * p.R, bend);
  n1 = imin(n0 + p.R, bend);
}

// Split blocks: the block of local chunk lc, the local indices of its first and last chunk, and its end row.
POM_HD int64_t block_of(const ChunkPlan& p, int64_t lc) { return lc / p.cpb; }
POM_HD int64_t first_chunk_of_block(const ChunkPlan& p, int64_t j) { return j * p.cpb; }
POM_HD int64_t last_chunk_of_block(const ChunkPlan& p, int64_t j) { return j * p.cpb + p.cpb - 1; }
POM_HD int64_t block_end(const ChunkPlan& p, int64_t len, int64_t j) { return imin((j + 1) * p.F, len); }

// Packed sequences: the sequence b holding global chunk c, given off (B + 1) = the first chunk of each sequence
// (off[B]: the number of chunks); false past the last chunk. Binary search over off.
POM_HD bool find_sequence(const int64_t* off, int64_t B, int64_t c, int64_t& b) {
  if (c >= off[B]) return false;
  int64_t lo = 0, hi = B;  // off[lo] <= c < off[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  b = lo;
  return true;
}

// Whole blocks: the end row of the block holding row n (F = 1: n + 1).
POM_HD int64_t block_end_of_row(const ChunkPlan& p, int64_t len, int64_t n) { return imin((n / p.F + 1) * p.F, len); }

// The rope scans (causal.cu): the channels of a pair in two lanes of one warp. Thread t of a row's threads (t =
// channel tile * blockDim.x + threadIdx.x, blockDim.x a multiple of 32) owns, when nv > 0, the nv <= V channels
// from e0 of one half of pair vector gv = (t / 32) * 16 + t % 16 (columns col0 .. col0 + nv - 1 of section sec):
// lanes t % 32 < 16 the first half (sign +1, partner channels e0 + P on lane t ^ 16), the others the second
// (sign -1, partner e0 - P). E = 2 P S; G = ceil(P / V) pair vectors a section. Lanes past the last vector:
// nv = 0.
struct RopeLane {
  int64_t e0 = 0, sec = 0, col0 = 0;
  int nv = 0;
  int sign = 1;
};

POM_HD RopeLane rope_lane(int64_t t, int64_t P, int64_t S, int V) {
  RopeLane r;
  const int lane = static_cast<int>(t & 31);
  const int64_t G = cdiv(P, V);
  const int64_t gv = (t >> 5) * 16 + (lane & 15);
  if (gv >= S * G) return r;
  r.sec = gv / G;
  r.col0 = (gv - r.sec * G) * V;
  r.nv = static_cast<int>(imin(V, P - r.col0));
  r.sign = lane < 16 ? 1 : -1;
  r.e0 = 2 * P * r.sec + r.col0 + (lane < 16 ? 0 : P);
  return r;
}

// Threads a row needs: 32 per 16 pair vectors.
POM_HD int64_t rope_lanes(int64_t P, int64_t S, int V) { return cdiv(S * cdiv(P, V), 16) * 32; }

}  // namespace plan
}  // namespace cuda
}  // namespace pom_ext
