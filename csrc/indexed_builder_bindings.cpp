// Python bindings of the indexed-dataset builder (indexed_builder.h); the Python API over them is
// megatron_qwen/data/indexed.py.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "indexed_builder.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// Raise OSError(errno, message, filename) so Python picks the matching subclass (FileNotFoundError, ...).
void raise_os_error(const mq::IoError& e) {
    py::object filename = py::reinterpret_steal<py::object>(
        PyUnicode_DecodeFSDefaultAndSize(e.path.data(), static_cast<Py_ssize_t>(e.path.size())));
    py::object error = py::reinterpret_steal<py::object>(
        PyObject_CallFunction(PyExc_OSError, "isO", e.err, e.what(), filename.ptr()));
    if (!error) return;  // constructing the exception failed: that error is already set
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
}

void add_documents(mq::ShardWriter& writer, const py::array& tokens, const py::array& lengths) {
    const py::ssize_t itemsize = tokens.itemsize();
    if (tokens.ndim() != 1 || (tokens.size() > 1 && tokens.strides(0) != itemsize))
        throw std::invalid_argument("tokens must be a contiguous 1-D integer array (got ndim=" +
                                    std::to_string(tokens.ndim()) + "); use numpy.ascontiguousarray(tokens).ravel()");
    if (lengths.ndim() != 1 || lengths.dtype().kind() != 'i' || lengths.itemsize() != 8 ||
        (lengths.size() > 1 && lengths.strides(0) != 8))
        throw std::invalid_argument("lengths must be a contiguous 1-D int64 array");
    const mq::IntType type{tokens.dtype().kind(), static_cast<size_t>(itemsize)};
    const void* data = tokens.data();
    const auto* lens = static_cast<const int64_t*>(lengths.data());
    const size_t n_tokens = static_cast<size_t>(tokens.size()), n_docs = static_cast<size_t>(lengths.size());
    py::gil_scoped_release release;
    writer.add_documents(data, type, n_tokens, lens, n_docs);
}

py::dict shard_summary(const std::string& prefix) {
    mq::ShardIndex index;
    {
        py::gil_scoped_release release;
        index = mq::read_shard_index(prefix);
    }
    return py::dict("dtype"_a = mq::dtype_name(index.dtype_code), "num_sequences"_a = index.sequence_lengths.size(),
                    "num_documents"_a = index.document_indices.size() - 1, "num_tokens"_a = index.num_tokens);
}

}  // namespace

void register_indexed_builder(py::module_& m) {
    py::register_exception<mq::FormatError>(m, "ShardFormatError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const mq::IoError& e) {
            raise_os_error(e);
        }
    });

    m.def("optimal_dtype_code", &mq::optimal_dtype_code, "vocab_size"_a,
          "megatron-core's DType.optimal_dtype as a dtype code: 8 (uint16) below 65,500 tokens, else 4 (int32).");
    m.def("dtype_name", &mq::dtype_name, "code"_a, "numpy name of a megatron-core dtype code.");
    m.def("shard_summary", &shard_summary, "prefix"_a,
          "Validate PREFIX.idx against itself and PREFIX.bin; return its dtype and counts. Raises "
          "ShardFormatError (a ValueError) naming the file and the problem.");

    m.def("merge_shards", &mq::merge_shards, "prefixes"_a, "out_prefix"_a, py::call_guard<py::gil_scoped_release>(),
          "Concatenate shards in order into OUT_PREFIX.bin/.idx, validating all inputs first.");

    py::class_<mq::ShardWriter>(m, "ShardWriter",
                                "Streams one Megatron indexed dataset to temporaries; finalize() renames them into "
                                "PREFIX.bin/.idx. Not thread-safe.")
        .def(py::init<std::string, uint8_t, int64_t>(), "prefix"_a, "dtype_code"_a, "token_limit"_a)
        .def("add_documents", &add_documents, "tokens"_a, "lengths"_a,
             "Append documents given as one flat integer token array and an int64 array of their lengths.")
        .def("finalize", &mq::ShardWriter::finalize, py::call_guard<py::gil_scoped_release>(),
             "Write the index and rename the temporaries to PREFIX.bin/.idx.")
        .def("discard", &mq::ShardWriter::discard, "Delete the temporaries without producing output.")
        .def_property_readonly("dtype_code", &mq::ShardWriter::dtype_code)
        .def_property_readonly("num_sequences", &mq::ShardWriter::num_sequences)
        .def_property_readonly("num_documents", &mq::ShardWriter::num_documents)
        .def_property_readonly("num_tokens", &mq::ShardWriter::num_tokens)
        .def_property_readonly("prefix", &mq::ShardWriter::prefix);
}
