// CPU kernels for x86-64 with AVX-512 (F, VL, BW, DQ) on 512-bit vectors, picked at run time when the CPU
// has them. Twice the channels per instruction of the AVX2 build: on a Zen 4 core the token-causal backward
// scan's arithmetic took half the time, and the scan about 15% less.
// Included by the four poly_cpu_avx512_<part>.cpp, each defining POM_CPU_PART (poly_cpu_impl.h).
#include "poly_cpu_headers.h"

#ifdef POM_CPU_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#define POM_CPU_ARCH avx512
#include "poly_cpu_impl.h"
#include "rope_cpu_impl.h"
#include "conv_cpu_impl.h"
#pragma GCC pop_options
#endif
