// CPU kernels for the baseline instruction set of the build (SSE2 on x86-64, NEON on arm64).
// Included by the four poly_cpu_base_<part>.cpp, each defining POM_CPU_PART (poly_cpu_impl.h).
#include "poly_cpu_headers.h"

#define POM_CPU_ARCH base
#include "poly_cpu_impl.h"
#include "rope_cpu_impl.h"
#include "conv_cpu_impl.h"
