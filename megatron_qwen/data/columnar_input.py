"""Reading columnar corpora in parts: Parquet files and Arrow files (Hugging Face ``save_to_disk``).

A columnar file is cut between its units: a Parquet file's row groups, an Arrow file's record batches. Each
unit has a size (uncompressed bytes of a row group, bytes of a batch's message), so the file is a span of
their cumulative sizes that `megatron_qwen.data.inputs.plan_parts` cuts with the JSONL files; a unit belongs
to the part holding its first byte, as a line does. A part reads only its units, a batch of rows at a time,
so memory follows the largest row group, not the corpus.

Rows become records (dicts of the columns read): the same dicts a JSON line of the same fields parses to,
so every mode renders them exactly as their JSONL. Columns that a mode names (``--json-keys`` in text mode)
are checked once per file, before any work: a missing column, or one that is not a string (a list, a
struct), is refused with the file and the column named.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_qwen.data.jsonl_input import Piece
from megatron_qwen.errors import PreprocessError

ROWS_PER_BATCH = 1024  # rows turned into records at a time
_ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format (Feather v2); save_to_disk writes the stream format


def is_columnar(path: str) -> bool:
    """A Parquet or an Arrow file (read by rows), as opposed to JSON lines."""
    return path.endswith((".parquet", ".arrow"))


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - submodules used through `pyarrow.`
    except ImportError as e:
        raise PreprocessError(f"reading Parquet and Arrow files needs pyarrow ({e}); pip install pyarrow") from None
    return pyarrow


@dataclass(frozen=True)
class ColumnarFile:
    """A columnar file's units: (offset in the file's span, locator, first row) each, and the span's size."""

    path: str
    size: int
    units: tuple[tuple[int, int, int], ...]


def describe(path: str, columns: Sequence[str] | None) -> ColumnarFile:
    """The units of a Parquet or Arrow file, after checking that it has ``columns`` as strings (None: any)."""
    pa = _pyarrow()
    try:
        if path.endswith(".parquet"):
            meta = pa.parquet.ParquetFile(path).metadata
            _check_columns(path, meta.schema.to_arrow_schema(), columns)
            groups = [meta.row_group(rg) for rg in range(meta.num_row_groups)]
            sizes = [(rg, group.total_byte_size, group.num_rows) for rg, group in enumerate(groups)]
        else:
            sizes = _arrow_batches(pa, path, columns)
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(f"{path}: cannot be read as {_kind(path)} ({e}); re-create or re-download it") from None
    units, offset, row = [], 0, 0
    for locator, size, rows in sizes:
        if rows:
            units.append((offset, locator, row))
            offset += max(int(size), 1)  # a positive span per unit, so every unit starts in exactly one part
            row += rows
    return ColumnarFile(path, offset, tuple(units))


def _kind(path: str) -> str:
    return "Parquet" if path.endswith(".parquet") else "Arrow"


def _arrow_batches(pa, path: str, columns) -> list[tuple[int, int, int]]:
    """(byte offset of the message, its size, rows) per record batch of an Arrow IPC stream or file."""
    with pa.memory_map(path) as source:
        if source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            _check_columns(path, reader.schema, columns)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            return [(i, batch.nbytes, batch.num_rows) for i, batch in enumerate(batches)]
        source.seek(0)
        # Batches are zero-copy views of the map: finding their offsets touches only the message headers.
        reader = pa.ipc.open_stream(source)
        _check_columns(path, reader.schema, columns)
        if any(pa.types.is_dictionary(field.type) for field in reader.schema):
            raise PreprocessError(
                f"{path}: dictionary-encoded columns are not supported; save the dataset without them"
            )
        batches, pos = [], source.tell()
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            end = source.tell()
            batches.append((pos, end - pos, batch.num_rows))
            pos = end
        return batches


def _check_columns(path: str, schema, columns) -> None:
    """Refuse a file without the named columns, or whose named columns are not strings."""
    pa = _pyarrow()
    for name in columns or ():
        if schema.get_field_index(name) < 0:
            present = ", ".join(repr(n) for n in schema.names[:8]) or "none"
            raise PreprocessError(
                f"{path}: no column {name!r} (columns: {present}); choose the columns with --json-keys"
            )
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            nested = pa.types.is_nested(kind)
            raise PreprocessError(
                f"{path}: column {name!r} is {kind}, {'a nested column' if nested else 'not a string'}; "
                "--json-keys takes string columns"
            )


def iter_piece_rows(piece: Piece, columns: Sequence[str] | None) -> Iterator[tuple[dict, int, int]]:
    """Yield (record, 1-based row number in the file, bytes it took in Arrow) for every row of the piece's units."""
    pa = _pyarrow()
    try:
        for batch, first_row in _piece_batches(pa, piece, columns):
            records = batch.to_pylist()
            size = batch.nbytes // max(len(records), 1)
            for i, record in enumerate(records):
                yield record, first_row + i + 1, size
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(
            f"{piece.path}: cannot be read as {_kind(piece.path)} ({e}); re-create or re-download it"
        ) from None


def _piece_batches(pa, piece: Piece, columns) -> Iterator[tuple[object, int]]:
    """(record batch, row before its first) of the piece, a bounded number of rows at a time."""
    columns = list(columns) if columns is not None else None
    if piece.path.endswith(".parquet"):
        parquet = pa.parquet.ParquetFile(piece.path)
        for row_group, first_row in piece.units:
            row = first_row
            batches = parquet.iter_batches(ROWS_PER_BATCH, row_groups=[row_group], columns=columns, use_threads=False)
            for batch in batches:
                yield batch, row
                row += batch.num_rows
        return
    with pa.OSFile(piece.path) as source:
        if source.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(index) for index, _ in piece.units)
        else:
            source.seek(0)
            schema = pa.ipc.open_stream(source).schema

            def stream_batches():
                for offset, _ in piece.units:
                    source.seek(offset)
                    yield pa.ipc.read_record_batch(pa.ipc.read_message(source), schema)

            batches = stream_batches()
        for batch, (_, first_row) in zip(batches, piece.units):
            batch = batch.select(columns) if columns is not None else batch
            for start in range(0, batch.num_rows, ROWS_PER_BATCH):
                yield batch.slice(start, ROWS_PER_BATCH), first_row + start
