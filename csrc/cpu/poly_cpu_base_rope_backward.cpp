// CPU kernels for the baseline instruction set, part 4 of 4: the rope causal backwards (poly_cpu_impl.h).
#define POM_CPU_PART 4
#include "poly_cpu_isa_base.h"
