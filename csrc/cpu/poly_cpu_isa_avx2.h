// CPU kernels for x86-64 with AVX2 + FMA + F16C, picked at run time when the CPU has them.
// Included by the four poly_cpu_avx2_<part>.cpp, each defining POM_CPU_PART (poly_cpu_impl.h).
#include "poly_cpu_headers.h"

#ifdef POM_CPU_HAVE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define POM_CPU_ARCH avx2
#include "poly_cpu_impl.h"
#include "rope_cpu_impl.h"
#include "conv_cpu_impl.h"
#pragma GCC pop_options
#endif
