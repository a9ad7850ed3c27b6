// The Python module pom_ext._C is empty: importing it loads this shared library,
// whose static initialisers register the pom_ext ops with the dispatcher.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
