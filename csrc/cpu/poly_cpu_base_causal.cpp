// CPU kernels for the baseline instruction set, part 2 of 4: the causal forwards (poly_cpu_impl.h).
#define POM_CPU_PART 2
#include "poly_cpu_isa_base.h"
