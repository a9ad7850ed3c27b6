// Symbol visibility of the C++ API: the library is compiled with
// -fvisibility=hidden, so only what carries POM_EXT_API is exported.
#pragma once

#if defined(_WIN32)
#if defined(POM_EXT_BUILDING_LIBRARY)
#define POM_EXT_API __declspec(dllexport)
#else
#define POM_EXT_API __declspec(dllimport)
#endif
#else
#define POM_EXT_API __attribute__((visibility("default")))
#endif
