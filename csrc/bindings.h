// Registration functions of the native extension's parts, each called once from module.cpp.
#pragma once

#include <pybind11/pybind11.h>

// ShardWriter, shard_summary and ShardFormatError (indexed_builder_bindings.cpp).
void register_indexed_builder(pybind11::module_& m);
