// Everything poly_cpu_impl.h uses, included before any instruction-set pragma.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pom_ext/checks.h"
#include "pom_ext/dispatch.h"
#include "pom_ext/library.h"
#include "pom_ext/poly_math.h"
#include "pom_ext/state_grad.h"
#include "pom_ext/weight_grad.h"
#include "output_pool.h"
#include "poly_cpu.h"
