// Python bindings of the project's C++ code (pybind11). The indexed-dataset builder lands here.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
    m.doc() = "megatron-qwen native extension";
    m.def("abi_version", []() { return 1; }, "Version of the native API, bumped on incompatible changes.");
}
