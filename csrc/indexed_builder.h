// Writer, reader-validator and merger of Megatron indexed datasets (PREFIX.bin + PREFIX.idx), byte-compatible
// with megatron-core 0.16.1 (megatron/core/datasets/indexed_dataset.py, IndexedDatasetBuilder/_IndexWriter).
//
// .idx layout (little-endian): b"MMIDIDX\x00\x00", version u64 = 1, dtype code u8, sequence count u64,
// document-index count u64, then int32 sequence lengths, int64 sequence byte offsets into .bin, and int64
// document indices (sequence index where each document starts, beginning with 0 and ending with the count).
// .bin: the tokens of all sequences back to back, in the dtype named by the code.
//
// Plain C++ (no Python): the pybind11 layer lives in indexed_builder_bindings.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mq {

// megatron-core's DType codes.
enum DTypeCode : uint8_t {
    kUint8 = 1, kInt8 = 2, kInt16 = 3, kInt32 = 4, kInt64 = 5, kFloat64 = 6, kFloat32 = 7, kUint16 = 8,
};

// Name ("int32", ...) and byte size of a megatron-core dtype code; throws FormatError for unknown codes.
const char* dtype_name(uint8_t code);
size_t dtype_size(uint8_t code);

// megatron-core's DType.optimal_dtype: uint16 below 65,500 distinct tokens, else int32.
uint8_t optimal_dtype_code(int64_t vocab_size);

// Largest token limit a token writer of this dtype accepts (65,536 for uint16, 2^31 for int32); 0 for dtypes
// that only whole shards can be merged into.
int64_t token_capacity(uint8_t code);

// A shard's files are malformed or disagree with each other (the message names the file and the problem).
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// An operating-system call failed on `path` (errno kept so Python can raise the matching OSError).
struct IoError : std::runtime_error {
    IoError(int err, std::string path, const std::string& what);
    int err;
    std::string path;
};

// Caller passed unusable tokens, lengths or arguments (maps to Python's ValueError through pybind11).
using ArgumentError = std::invalid_argument;

// Element type of a caller's token buffer: integer kind ('i' or 'u') and byte size.
struct IntType {
    char kind;
    size_t size;
};

// The validated index of a shard. Pointers are not kept: validation proved they are the running byte
// offsets of the lengths, so they can always be recomputed.
struct ShardIndex {
    uint8_t dtype_code = 0;
    std::vector<int32_t> sequence_lengths;
    std::vector<int64_t> document_indices;
    uint64_t num_tokens = 0;
    uint64_t bin_bytes = 0;
};

// Read PREFIX.idx and check it against itself and PREFIX.bin's size. Throws FormatError / IoError.
ShardIndex read_shard_index(const std::string& prefix);

class OutputFile;  // buffered output file, defined in indexed_builder.cpp

// Streams one shard to PREFIX.bin.tmp-<pid>-<n> / PREFIX.idx.tmp-<pid>-<n>; finalize() writes the index and
// renames both to their final names. Destroying an unfinalized writer deletes its temporaries.
class ShardWriter {
  public:
    // token_limit: tokens must lie in [0, token_limit) (the vocabulary size); the dtype must hold them.
    ShardWriter(std::string prefix, uint8_t dtype_code, int64_t token_limit);
    ~ShardWriter();
    ShardWriter(const ShardWriter&) = delete;
    ShardWriter& operator=(const ShardWriter&) = delete;

    // Append n_docs documents whose tokens lie back to back in `tokens` (n_tokens elements of type `type`),
    // document i having lengths[i] tokens. A non-empty document becomes one sequence; an empty one only
    // records a document boundary, as Megatron-LM's preprocess_data.py does. All-or-nothing: on a bad
    // token or length nothing is appended.
    void add_documents(const void* tokens, IntType type, size_t n_tokens, const int64_t* lengths, size_t n_docs);

    // Append every document of an existing shard (dtype must match): its .bin is copied in large blocks,
    // its lengths and document indices appended with rebased offsets.
    void append_shard(const std::string& prefix);

    // Write the index and move PREFIX.bin / PREFIX.idx into place. The writer is closed afterwards.
    void finalize();

    // Close and delete the temporaries without producing output (idempotent).
    void discard() noexcept;

    uint8_t dtype_code() const { return dtype_code_; }
    size_t num_sequences() const { return sequence_lengths_.size(); }
    size_t num_documents() const { return document_indices_.size() - 1; }
    uint64_t num_tokens() const { return num_tokens_; }
    const std::string& prefix() const { return prefix_; }

  private:
    void require_open(const char* operation) const;
    template <typename Out>
    void convert_documents(const void* tokens, IntType type, size_t n_tokens);

    std::string prefix_;
    uint8_t dtype_code_;
    int64_t token_limit_;
    std::string bin_tmp_, idx_tmp_;
    std::unique_ptr<OutputFile> bin_;  // null once finalized or discarded
    std::vector<int32_t> sequence_lengths_;
    std::vector<int64_t> document_indices_{0};
    uint64_t num_tokens_ = 0;
};

// Concatenate shards, in order, into one at out_prefix. Every input is validated (and the dtypes compared)
// before anything is copied.
void merge_shards(const std::vector<std::string>& prefixes, const std::string& out_prefix);

}  // namespace mq
