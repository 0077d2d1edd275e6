"""Reading JSON-lines corpora (plain, .gz or .zst) in parts: byte ranges, lines, records.

The input files, in order, form one byte stream that `megatron_qwen.data.inputs.plan_parts` cuts into
contiguous byte ranges (`Piece`s). A line belongs to the part holding its first byte (in a compressed file,
to the part holding the compressed block of ``BLOCK_BYTES`` that decompresses to it), so every line is read
by exactly one part and each part reads only its own bytes. `line_number` gives a line's number in its
file, for reporting a bad line as ``file:line``; `record_of` parses a line into its JSON object or says why
it is not one.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_qwen.errors import PreprocessError

BLOCK_BYTES = 1 << 20  # read size, and the unit in which compressed files are split between parts
COMPRESSED_SUFFIXES = (".gz", ".zst")


@dataclass(frozen=True)
class Piece:
    """The lines of ``path`` that start in raw bytes [start, end) (compressed bytes for .gz/.zst files).

    For a columnar file (Parquet, Arrow) [start, end) is a range of its row groups' (record batches')
    cumulative sizes, and ``units`` lists the (locator, first row) of those starting in it, which the
    piece reads (see `megatron_qwen.data.columnar_input`).
    """

    path: str
    start: int
    end: int
    units: tuple[tuple[int, int], ...] = ()


def is_compressed(path: str) -> bool:
    """A .gz or .zst file: read from its start, split only at the compressed blocks a part begins with."""
    return path.endswith(COMPRESSED_SUFFIXES)


def _plain_chunks(piece: Piece) -> Iterator[tuple[int, bool, bytes]]:
    """(raw offset, exact, data) blocks from the byte before ``piece.start`` (it shows whether start begins a line)."""
    with open(piece.path, "rb", buffering=0) as f:
        pos = max(piece.start - 1, 0)
        f.seek(pos)
        while data := f.read(BLOCK_BYTES):
            yield pos, True, data
            pos += len(data)


def _stream_chunks(piece: Piece, new_stream, errors, kind: str, unit: str) -> Iterator[tuple[int, bool, bytes]]:
    """(compressed offset, exact=False, decompressed data) per compressed block, from the start of the file.

    Concatenated members or frames (pigz, ``zstd -T``, ``cat a.gz b.gz``) are read as one stream: when one ends,
    `new_stream()` starts the next on the bytes left over. `errors` are the decoder's exceptions.
    """
    with open(piece.path, "rb", buffering=0) as f:
        stream = None
        pos = 0
        while raw := f.read(BLOCK_BYTES):
            out = []
            data = raw
            try:
                while data:
                    if stream is None or stream.eof:
                        stream = new_stream()
                    out.append(stream.decompress(data))
                    data = stream.unused_data if stream.eof else b""
            except errors as e:
                raise PreprocessError(
                    f"{piece.path}: not a valid {kind} file near compressed byte {pos} ({e}); re-create it"
                ) from None
            yield pos, False, b"".join(out)
            pos += len(raw)
        if stream is not None and not stream.eof:
            raise PreprocessError(f"{piece.path}: truncated {kind} file (its last {unit} does not end); re-create it")


def _gzip_chunks(piece: Piece) -> Iterator[tuple[int, bool, bytes]]:
    """`_stream_chunks` of a .gz file (gzip members)."""
    return _stream_chunks(piece, lambda: zlib.decompressobj(wbits=31), zlib.error, "gzip", "member")


def _zstd_chunks(piece: Piece) -> Iterator[tuple[int, bool, bytes]]:
    """`_stream_chunks` of a .zst file (zstd frames)."""
    try:
        import zstandard  # imported here: only .zst inputs need it
    except ImportError as e:
        raise PreprocessError(
            f"{piece.path}: reading .zst needs the zstandard package ({e}); pip install zstandard"
        ) from None
    decompressor = zstandard.ZstdDecompressor()
    return _stream_chunks(piece, decompressor.decompressobj, zstandard.ZstdError, "zstd", "frame")


def iter_piece_lines(piece: Piece) -> Iterator[tuple[bytes, int]]:
    """Yield (line without its newline, newlines read before it) for every line the piece owns.

    The newline count is relative to where reading began (see :func:`line_number`).
    """
    if piece.path.endswith(".gz"):
        chunks = _gzip_chunks(piece)
    else:
        chunks = _zstd_chunks(piece) if piece.path.endswith(".zst") else _plain_chunks(piece)
    start, end = piece.start, piece.end
    carry: list[bytes] = []  # the unfinished line, kept only when it is ours
    carry_pos = None  # where the unfinished line began; None when the next byte starts a line
    newlines = 0
    for raw_pos, exact, data in chunks:
        if raw_pos >= end and (carry_pos is None or carry_pos >= end):
            return
        if not exact and raw_pos < start:
            # A block before this part (only in compressed files): track line numbers and the open line, nothing else.
            count = data.count(b"\n")
            newlines += count
            if count:
                carry_pos = raw_pos if data[-1:] != b"\n" else None
            elif carry_pos is None and data:
                carry_pos = raw_pos
            continue
        segments = data.split(b"\n")
        offset = 0
        for i in range(len(segments) - 1):
            if i == 0 and carry_pos is not None:
                line_pos, line = carry_pos, b"".join(carry) + segments[0]
                carry = []
            else:
                line_pos, line = (raw_pos + offset if exact else raw_pos), segments[i]
            if line_pos >= end:
                return
            if line_pos >= start:
                yield line, newlines
            newlines += 1
            offset += len(segments[i]) + 1
        last = segments[-1]
        if len(segments) > 1 or carry_pos is None:
            carry_pos = (raw_pos + offset if exact else raw_pos) if last else None
            carry = []
        if carry_pos is not None and start <= carry_pos < end:
            carry.append(last)
    if carry_pos is not None and start <= carry_pos < end:
        yield b"".join(carry), newlines


def line_number(piece: Piece, newlines_before: int) -> int:
    """1-based line number in the file of a line that ``iter_piece_lines`` reported ``newlines_before`` for."""
    if is_compressed(piece.path) or piece.start == 0:
        return newlines_before + 1  # reading began at the start of the (decompressed) file
    return _newlines_before(piece.path, piece.start - 1) + newlines_before + 1


@functools.lru_cache(maxsize=64)
def _newlines_before(path: str, offset: int) -> int:
    """Newlines in the first ``offset`` bytes of a file (only needed to report a bad line, so cached, not tracked)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (block := f.read(min(BLOCK_BYTES, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def json_type(value) -> str:
    """The JSON name of a parsed value's type ("object", "array", "null", ...), for messages."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def record_of(line: bytes) -> dict | str:
    """The JSON object on a line, or the reason the line is not one."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(record, dict):
        return f"expected a JSON object, found a JSON {json_type(record)}"
    return record
