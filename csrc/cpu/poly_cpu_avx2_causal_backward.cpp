// CPU kernels for AVX2 + FMA + F16C, part 3 of 4: the causal backwards (poly_cpu_impl.h).
#define POM_CPU_PART 3
#include "poly_cpu_isa_avx2.h"
