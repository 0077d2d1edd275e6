// Megatron indexed-dataset writer, validator and merger; see indexed_builder.h for the format.
#include "indexed_builder.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <sstream>
#include <type_traits>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "indexed_builder writes the arrays of the little-endian Megatron format straight from memory"
#endif

namespace mq {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kVersion = 1;
constexpr size_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;
// Large enough that write() cost is negligible, small enough to keep many writers per process cheap.
constexpr size_t kBufferBytes = 4 << 20;
constexpr size_t kPointerChunk = 1 << 20;

template <typename... Parts>
std::string cat(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

// Closes a file descriptor when it goes out of scope.
struct Fd {
    int fd;
    explicit Fd(int f) : fd(f) {}
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
};

int open_or_throw(const std::string& path, int flags, const char* purpose) {
    int fd;
    do {
        fd = ::open(path.c_str(), flags | O_CLOEXEC, 0666);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) throw IoError(errno, path, cat("cannot open ", purpose));
    return fd;
}

uint64_t size_of(int fd, const std::string& path) {
    struct stat st;
    if (::fstat(fd, &st) != 0) throw IoError(errno, path, "cannot stat");
    return static_cast<uint64_t>(st.st_size);
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
        ssize_t k = ::write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            throw IoError(errno, path, "cannot write");
        }
        p += k;
        n -= static_cast<size_t>(k);
    }
}

void pread_all(int fd, void* data, size_t n, uint64_t offset, const std::string& path) {
    char* p = static_cast<char*>(data);
    while (n > 0) {
        ssize_t k = ::pread(fd, p, n, static_cast<off_t>(offset));
        if (k < 0) {
            if (errno == EINTR) continue;
            throw IoError(errno, path, "cannot read");
        }
        if (k == 0) throw FormatError(cat(path, ": file shrank while it was being read"));
        p += k;
        n -= static_cast<size_t>(k);
        offset += static_cast<uint64_t>(k);
    }
}

// Append `n` bytes of `in_fd` (from its start) to `out_fd`. copy_file_range lets the kernel (or a
// copy-on-write filesystem) move the data without it passing through this process.
void copy_file(int in_fd, const std::string& in_path, int out_fd, const std::string& out_path, uint64_t n) {
    uint64_t done = 0;
#ifdef SYS_copy_file_range
    loff_t in_off = 0;
    while (done < n) {
        ssize_t k = ::syscall(SYS_copy_file_range, in_fd, &in_off, out_fd, nullptr, n - done, 0u);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (done == 0 && (errno == ENOSYS || errno == EXDEV || errno == EINVAL || errno == EOPNOTSUPP ||
                              errno == EPERM))
                break;  // not supported for these files: fall back to read/write below
            throw IoError(errno, out_path, cat("cannot copy data from ", in_path, " into"));
        }
        if (k == 0) throw FormatError(cat(in_path, ": file shrank while it was being copied"));
        done += static_cast<uint64_t>(k);
    }
#endif
    if (done == n) return;
    std::vector<char> block(kBufferBytes);
    while (done < n) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(block.size(), n - done));
        pread_all(in_fd, block.data(), want, done, in_path);
        write_all(out_fd, block.data(), want, out_path);
        done += want;
    }
}

// Counts read from a corrupt header can be huge: saturate instead of wrapping around.
uint64_t saturating_mul(uint64_t a, uint64_t b) {
    uint64_t r;
    return __builtin_mul_overflow(a, b, &r) ? UINT64_MAX : r;
}
uint64_t saturating_add(uint64_t a, uint64_t b) {
    uint64_t r;
    return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
}

template <typename T>
T load_le(const unsigned char* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

template <typename In>
void check_tokens(const In* in, size_t n, int64_t limit) {
    // A min/max pass vectorises; the offending position is only searched for when there is one.
    In lo = n ? in[0] : In(0), hi = lo;
    for (size_t i = 0; i < n; ++i) {
        lo = std::min(lo, in[i]);
        hi = std::max(hi, in[i]);
    }
    auto bad = [limit](In v) {
        if constexpr (std::is_signed_v<In>) {
            if (v < 0) return true;
        }
        return static_cast<uint64_t>(v) >= static_cast<uint64_t>(limit);
    };
    if (!bad(lo) && !bad(hi)) return;
    for (size_t i = 0; i < n; ++i) {
        if (bad(in[i])) {
            throw ArgumentError(cat("token ", +in[i], " at position ", i,
                                    " of the batch is outside the vocabulary [0, ", limit,
                                    "); pass token ids of the tokenizer whose vocab_size the shard was created with"));
        }
    }
}

template <typename In, typename Out>
void convert(const In* in, size_t n, unsigned char* out) {
    for (size_t i = 0; i < n; ++i) {
        Out v = static_cast<Out>(in[i]);
        std::memcpy(out + i * sizeof(Out), &v, sizeof(Out));
    }
}

std::atomic<unsigned long> g_writer_counter{0};

}  // namespace

// Buffered output to one file descriptor.
class OutputFile {
  public:
    OutputFile(int fd, std::string path, size_t capacity) : fd_(fd), path_(std::move(path)), buf_(capacity) {}
    ~OutputFile() { close_quietly(); }
    OutputFile(const OutputFile&) = delete;
    OutputFile& operator=(const OutputFile&) = delete;

    void put(const void* data, size_t n) {
        if (n >= buf_.size()) {
            flush();
            write_all(fd_, data, n, path_);
            return;
        }
        if (used_ + n > buf_.size()) flush();
        std::memcpy(buf_.data() + used_, data, n);
        used_ += n;
    }
    // Free space (at least min_bytes) at the end of the buffer, for callers that convert data in place and
    // then commit() what they wrote.
    unsigned char* space(size_t min_bytes, size_t& bytes) {
        if (buf_.size() - used_ < min_bytes) flush();
        bytes = buf_.size() - used_;
        return buf_.data() + used_;
    }
    void commit(size_t n) { used_ += n; }
    void flush() {
        write_all(fd_, buf_.data(), used_, path_);
        used_ = 0;
    }
    void close() {
        flush();
        int fd = fd_;
        fd_ = -1;
        if (::close(fd) != 0) throw IoError(errno, path_, "cannot close");
    }
    void close_quietly() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }
    int fd() const { return fd_; }

  private:
    int fd_;
    std::string path_;
    std::vector<unsigned char> buf_;
    size_t used_ = 0;
};

IoError::IoError(int e, std::string p, const std::string& what)
    : std::runtime_error(cat(std::strerror(e), " (", what, ")")), err(e), path(std::move(p)) {}

namespace {
struct DTypeInfo {
    const char* name;
    size_t size;
};

const DTypeInfo& dtype_info(uint8_t code) {
    // Indexed by megatron-core's code - 1.
    static const DTypeInfo table[] = {{"uint8", 1},  {"int8", 1},    {"int16", 2},   {"int32", 4},
                                      {"int64", 8},  {"float64", 8}, {"float32", 4}, {"uint16", 2}};
    if (code < kUint8 || code > kUint16)
        throw FormatError(cat("unknown dtype code ", int(code), "; megatron-core's codes are 1 (uint8) to 8 (uint16)"));
    return table[code - 1];
}
}  // namespace

const char* dtype_name(uint8_t code) { return dtype_info(code).name; }

size_t dtype_size(uint8_t code) { return dtype_info(code).size; }

uint8_t optimal_dtype_code(int64_t vocab_size) { return vocab_size < 65500 ? kUint16 : kInt32; }

int64_t token_capacity(uint8_t code) {
    return code == kUint16 ? int64_t(1) << 16 : code == kInt32 ? int64_t(1) << 31 : 0;
}

ShardIndex read_shard_index(const std::string& prefix) {
    const std::string idx_path = prefix + ".idx", bin_path = prefix + ".bin";
    Fd idx(open_or_throw(idx_path, O_RDONLY, "the shard index"));
    ShardIndex out;
    const uint64_t idx_bytes = size_of(idx.fd, idx_path);
    if (idx_bytes < kHeaderBytes)
        throw FormatError(cat(idx_path, ": truncated index: ", idx_bytes, " bytes, but the header alone takes ",
                              kHeaderBytes));

    unsigned char header[kHeaderBytes];
    pread_all(idx.fd, header, kHeaderBytes, 0, idx_path);
    if (std::memcmp(header, kMagic, sizeof(kMagic)) != 0)
        throw FormatError(cat(idx_path, ": not a Megatron indexed-dataset index (it does not start with the magic ",
                              "bytes MMIDIDX\\x00\\x00)"));
    const uint64_t version = load_le<uint64_t>(header + 9);
    if (version != kVersion)
        throw FormatError(cat(idx_path, ": index version ", version,
                              " is not supported; megatron-core 0.16.1 reads and writes version 1 only"));
    out.dtype_code = header[17];
    size_t itemsize;
    try {
        itemsize = dtype_size(out.dtype_code);
    } catch (const FormatError& e) {
        throw FormatError(cat(idx_path, ": ", e.what()));
    }
    const uint64_t n_seq = load_le<uint64_t>(header + 18), n_doc = load_le<uint64_t>(header + 26);

    if (n_doc == 0)
        throw FormatError(cat(idx_path, ": the document-index count is 0, but a valid index has at least the ",
                              "leading document index 0"));
    const uint64_t need = saturating_add(kHeaderBytes + saturating_mul(n_seq, 12), saturating_mul(n_doc, 8));
    if (need > idx_bytes)
        throw FormatError(cat(idx_path, ": truncated index: ", idx_bytes, " bytes, but its ", n_seq,
                              " sequences and ", n_doc, " document indices need ", need, " bytes"));
    if (need < idx_bytes)
        throw FormatError(cat(idx_path, ": ", idx_bytes - need, " unexpected bytes after the ", n_doc,
                              " document indices (", n_seq, " sequences need ", need,
                              " bytes); multimodal indexes with sequence modes are not supported"));

    const uint64_t lengths_at = kHeaderBytes, pointers_at = lengths_at + 4 * n_seq,
                   documents_at = pointers_at + 8 * n_seq;
    out.sequence_lengths.resize(n_seq);
    pread_all(idx.fd, out.sequence_lengths.data(), 4 * n_seq, lengths_at, idx_path);
    out.document_indices.resize(n_doc);
    pread_all(idx.fd, out.document_indices.data(), 8 * n_doc, documents_at, idx_path);

    // Pointers must be the running byte offsets of the lengths (what every Megatron writer produces);
    // that is what lets a merge copy .bin files whole and recompute pointers.
    std::vector<int64_t> pointers(std::min<uint64_t>(n_seq, kPointerChunk));
    uint64_t offset = 0;
    for (uint64_t begin = 0; begin < n_seq; begin += pointers.size()) {
        const uint64_t count = std::min<uint64_t>(pointers.size(), n_seq - begin);
        pread_all(idx.fd, pointers.data(), 8 * count, pointers_at + 8 * begin, idx_path);
        for (uint64_t j = 0; j < count; ++j) {
            const uint64_t i = begin + j;
            if (out.sequence_lengths[i] < 0)
                throw FormatError(cat(idx_path, ": sequence ", i, " has negative length ", out.sequence_lengths[i]));
            if (static_cast<uint64_t>(pointers[j]) != offset)
                throw FormatError(cat(idx_path, ": sequence ", i, " starts at byte ", pointers[j],
                                      " but the sequences before it end at byte ", offset, " (", itemsize,
                                      "-byte ", dtype_name(out.dtype_code),
                                      " tokens); the pointers disagree with the lengths and the dtype code"));
            offset += static_cast<uint64_t>(out.sequence_lengths[i]) * itemsize;
            out.num_tokens += static_cast<uint64_t>(out.sequence_lengths[i]);
        }
    }

    const auto& docs = out.document_indices;
    if (docs[0] != 0)
        throw FormatError(cat(idx_path, ": the first document index is ", docs[0], ", not 0"));
    for (uint64_t i = 1; i < n_doc; ++i) {
        if (docs[i] < docs[i - 1])
            throw FormatError(cat(idx_path, ": document index ", i, " (", docs[i],
                                  ") is smaller than the one before it (", docs[i - 1], ")"));
    }
    if (static_cast<uint64_t>(docs[n_doc - 1]) != n_seq)
        throw FormatError(cat(idx_path, ": the last document index is ", docs[n_doc - 1], " but there are ", n_seq,
                              " sequences (megatron-core requires them equal)"));

    Fd bin(open_or_throw(bin_path, O_RDONLY, "the shard data"));
    out.bin_bytes = size_of(bin.fd, bin_path);
    if (out.bin_bytes < offset)
        throw FormatError(cat(bin_path, ": truncated data: ", out.bin_bytes, " bytes, but ", idx_path, " describes ",
                              out.num_tokens, " ", dtype_name(out.dtype_code), " tokens = ", offset, " bytes"));
    if (out.bin_bytes > offset)
        throw FormatError(cat(bin_path, ": ", out.bin_bytes, " bytes, but ", idx_path, " describes only ",
                              out.num_tokens, " ", dtype_name(out.dtype_code), " tokens = ", offset,
                              " bytes; the .idx and .bin do not belong together"));
    return out;
}

ShardWriter::ShardWriter(std::string prefix, uint8_t dtype_code, int64_t token_limit)
    : prefix_(std::move(prefix)), dtype_code_(dtype_code), token_limit_(token_limit) {
    dtype_size(dtype_code);  // rejects unknown codes
    const int64_t max_limit = token_capacity(dtype_code);
    if (max_limit && (token_limit < 1 || token_limit > max_limit))
        throw ArgumentError(cat("token_limit ", token_limit, " does not fit dtype ", dtype_name(dtype_code),
                                "; it must be in [1, ", max_limit, "]"));
    const std::string tag = cat(".tmp-", ::getpid(), "-", g_writer_counter.fetch_add(1));
    bin_tmp_ = prefix_ + ".bin" + tag;
    idx_tmp_ = prefix_ + ".idx" + tag;
    bin_ = std::make_unique<OutputFile>(open_or_throw(bin_tmp_, O_WRONLY | O_CREAT | O_TRUNC, "a temporary shard file"),
                                        bin_tmp_, kBufferBytes);
}

ShardWriter::~ShardWriter() { discard(); }

void ShardWriter::require_open(const char* operation) const {
    if (!bin_)
        throw ArgumentError(cat("cannot ", operation, ": the writer of ", prefix_,
                                " is closed (finalized, discarded, or stopped by an earlier I/O error)"));
}

template <typename Out>
void ShardWriter::convert_documents(const void* tokens, IntType type, size_t n_tokens) {
    auto run = [&](auto tag) {
        using In = decltype(tag);
        const In* in = static_cast<const In*>(tokens);
        check_tokens(in, n_tokens, token_limit_);
        if constexpr (std::is_same_v<In, Out>) {
            bin_->put(in, n_tokens * sizeof(Out));
        } else {
            for (size_t i = 0; i < n_tokens;) {
                size_t room;
                unsigned char* out = bin_->space(sizeof(Out), room);
                const size_t k = std::min(n_tokens - i, room / sizeof(Out));
                convert<In, Out>(in + i, k, out);
                bin_->commit(k * sizeof(Out));
                i += k;
            }
        }
    };
    switch (type.kind == 'u' ? 10 + type.size : type.kind == 'i' ? type.size : 0) {
        case 1: return run(int8_t{});
        case 2: return run(int16_t{});
        case 4: return run(int32_t{});
        case 8: return run(int64_t{});
        case 11: return run(uint8_t{});
        case 12: return run(uint16_t{});
        case 14: return run(uint32_t{});
        case 18: return run(uint64_t{});
    }
    throw ArgumentError(cat("tokens must be an integer array; got element kind '", type.kind, "' of ", type.size,
                            " bytes"));
}

void ShardWriter::add_documents(const void* tokens, IntType type, size_t n_tokens, const int64_t* lengths,
                                size_t n_docs) {
    require_open("add documents");
    if (dtype_code_ != kUint16 && dtype_code_ != kInt32)
        throw ArgumentError(cat("this writer's dtype ", dtype_name(dtype_code_),
                                " only takes whole shards; token writers use uint16 or int32"));
    uint64_t total = 0;
    for (size_t i = 0; i < n_docs; ++i) {
        if (lengths[i] < 0 || lengths[i] > std::numeric_limits<int32_t>::max())
            throw ArgumentError(cat("document ", i, " of the batch has length ", lengths[i],
                                    "; lengths must be in [0, 2^31 - 1] (Megatron stores them as int32)"));
        total += static_cast<uint64_t>(lengths[i]);
    }
    if (total != n_tokens)
        throw ArgumentError(cat("the document lengths sum to ", total, " but ", n_tokens,
                                " tokens were given; pass one length per document, summing to the token count"));
    try {
        if (dtype_code_ == kUint16)
            convert_documents<uint16_t>(tokens, type, n_tokens);
        else
            convert_documents<int32_t>(tokens, type, n_tokens);
    } catch (const IoError&) {
        discard();  // part of the batch may be on disk: the shard can no longer be completed
        throw;
    }
    for (size_t i = 0; i < n_docs; ++i) {
        if (lengths[i] > 0) sequence_lengths_.push_back(static_cast<int32_t>(lengths[i]));
        document_indices_.push_back(static_cast<int64_t>(sequence_lengths_.size()));
    }
    num_tokens_ += n_tokens;
}

void ShardWriter::append_shard(const std::string& prefix) {
    require_open("append a shard");
    ShardIndex index = read_shard_index(prefix);
    if (index.dtype_code != dtype_code_)
        throw FormatError(cat(prefix, ".idx: dtype ", dtype_name(index.dtype_code), " differs from the output's ",
                              dtype_name(dtype_code_), "; only shards of one dtype (one vocabulary) can be merged"));
    try {
        bin_->flush();
        const std::string bin_path = prefix + ".bin";
        Fd bin(open_or_throw(bin_path, O_RDONLY, "the shard data"));
        copy_file(bin.fd, bin_path, bin_->fd(), bin_tmp_, index.bin_bytes);
    } catch (...) {
        discard();  // a partial copy may be on disk
        throw;
    }
    const int64_t base = static_cast<int64_t>(sequence_lengths_.size());
    sequence_lengths_.insert(sequence_lengths_.end(), index.sequence_lengths.begin(), index.sequence_lengths.end());
    for (size_t i = 1; i < index.document_indices.size(); ++i)
        document_indices_.push_back(base + index.document_indices[i]);
    num_tokens_ += index.num_tokens;
}

void ShardWriter::finalize() {
    require_open("finalize");
    try {
        bin_->close();
        OutputFile idx(open_or_throw(idx_tmp_, O_WRONLY | O_CREAT | O_TRUNC, "a temporary shard index"), idx_tmp_,
                       1 << 20);
        const uint64_t n_seq = sequence_lengths_.size(), n_doc = document_indices_.size();
        idx.put(kMagic, sizeof(kMagic));
        idx.put(&kVersion, 8);
        idx.put(&dtype_code_, 1);
        idx.put(&n_seq, 8);
        idx.put(&n_doc, 8);
        idx.put(sequence_lengths_.data(), 4 * n_seq);
        const int64_t itemsize = static_cast<int64_t>(dtype_size(dtype_code_));
        int64_t pointer = 0;
        for (size_t i = 0; i < n_seq;) {
            size_t room;
            unsigned char* out = idx.space(8, room);
            const size_t k = std::min<size_t>(n_seq - i, room / 8);
            for (size_t j = 0; j < k; ++j, ++i) {
                std::memcpy(out + 8 * j, &pointer, 8);
                pointer += sequence_lengths_[i] * itemsize;
            }
            idx.commit(8 * k);
        }
        idx.put(document_indices_.data(), 8 * n_doc);
        idx.close();

        // Remove an older index first so that an old .idx never pairs with the new .bin.
        const std::string bin_path = prefix_ + ".bin", idx_path = prefix_ + ".idx";
        if (::unlink(idx_path.c_str()) != 0 && errno != ENOENT) throw IoError(errno, idx_path, "cannot replace");
        if (::rename(bin_tmp_.c_str(), bin_path.c_str()) != 0) throw IoError(errno, bin_path, "cannot rename into");
        if (::rename(idx_tmp_.c_str(), idx_path.c_str()) != 0) throw IoError(errno, idx_path, "cannot rename into");
    } catch (...) {
        discard();
        throw;
    }
    bin_.reset();
}

void merge_shards(const std::vector<std::string>& prefixes, const std::string& out_prefix) {
    if (prefixes.empty()) throw ArgumentError("merge_shards needs at least one input shard prefix; got none");
    uint8_t code = 0;
    for (const std::string& prefix : prefixes) {
        const uint8_t c = read_shard_index(prefix).dtype_code;
        if (code != 0 && c != code)
            throw FormatError(cat(prefix, ".idx: dtype ", dtype_name(c), " differs from ", dtype_name(code), " of ",
                                  prefixes[0], "; only shards of one dtype (one vocabulary) can be merged"));
        code = c;
    }
    ShardWriter writer(out_prefix, code, token_capacity(code));
    for (const std::string& prefix : prefixes) writer.append_shard(prefix);
    writer.finalize();
}

void ShardWriter::discard() noexcept {
    if (!bin_) return;
    bin_->close_quietly();
    bin_.reset();
    ::unlink(bin_tmp_.c_str());
    ::unlink(idx_tmp_.c_str());
}

}  // namespace mq
