// pom_ext C++ API: the ops (pom_ext/ops.h) and the PoM module (pom_ext/module.h).
// Link against the CMake target pom_ext::pom_ext (find_package(pom_ext)).
#pragma once

#include "pom_ext/module.h"
#include "pom_ext/ops.h"
#include "pom_ext/version.h"
