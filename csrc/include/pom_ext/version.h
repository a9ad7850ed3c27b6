// Version of the pom_ext C++ API; matches pom_ext.__version__ and the CMake package version.
#pragma once

#define POM_EXT_VERSION_MAJOR 0
#define POM_EXT_VERSION_MINOR 1
#define POM_EXT_VERSION_PATCH 0
#define POM_EXT_VERSION "0.1.0"
