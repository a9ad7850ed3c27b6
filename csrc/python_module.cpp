// The Python module pom_ext._C: importing it loads this shared library, the op library, whose static
// initialisers register the pom_ext ops with the dispatcher (csrc/registration.cpp). One function:
// registration_error(), empty unless another build of the op library registered the ops first.
#include <Python.h>

#include <string>

#include "pom_ext/library.h"

namespace {

PyObject* registration_error(PyObject*, PyObject*) {
  const std::string& e = pom_ext::detail::registration_error();
  return PyUnicode_FromStringAndSize(e.data(), static_cast<Py_ssize_t>(e.size()));
}

PyMethodDef methods[] = {
    {"registration_error", registration_error, METH_NOARGS,
     "Why this build of the op library does not run in this process ('' when it does)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
