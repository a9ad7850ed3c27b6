// CPU kernels for the baseline instruction set, part 1 of 4: the eval, mean and state ops (poly_cpu_impl.h).
#define POM_CPU_PART 1
#include "poly_cpu_isa_base.h"
