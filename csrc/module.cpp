// Python bindings of the project's C++ code (pybind11): the one PYBIND11_MODULE, which registers each part.
#include <pybind11/pybind11.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "megatron-qwen native extension";
    m.def("abi_version", []() { return 1; }, "Version of the native API, bumped on incompatible changes.");
    register_indexed_builder(m);
}
