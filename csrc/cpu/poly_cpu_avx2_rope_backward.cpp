// CPU kernels for AVX2 + FMA + F16C, part 4 of 4: the rope causal backwards (poly_cpu_impl.h).
#define POM_CPU_PART 4
#include "poly_cpu_isa_avx2.h"
