// CPU kernels for AVX2 + FMA + F16C, part 1 of 4: the eval, mean and state ops (poly_cpu_impl.h).
#define POM_CPU_PART 1
#include "poly_cpu_isa_avx2.h"
