"""Corpus inputs: which files ``--input`` names, how they are cut into parts, and the records a part reads.

Formats, by name: ``.parquet`` and ``.arrow`` (Hugging Face ``save_to_disk``) are read by rows
(`megatron_qwen.data.columnar_input`); ``.jsonl.gz`` and ``.jsonl.zst`` are decompressed, anything else is
read as JSON lines (`megatron_qwen.data.jsonl_input`). An ``--input`` may be a file, a glob (sorted), or a
directory: a ``save_to_disk`` directory gives its Arrow files in the dataset's order, any other directory
every corpus file under it in sorted path order.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence

from megatron_qwen.data import columnar_input
from megatron_qwen.data.columnar_input import ColumnarFile, is_columnar
from megatron_qwen.data.jsonl_input import Piece, is_compressed, iter_piece_lines, line_number
from megatron_qwen.errors import PreprocessError

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".arrow")  # what a directory contributes


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Input files in processing order: each argument in turn, a glob in sorted order, a directory's files."""
    files: list[str] = []
    seen: dict[str, str] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PreprocessError(f"--input {pattern!r} matches no file; check the path or quote the glob")
        for match in matches:
            for path in _directory_files(match) if os.path.isdir(match) else [match]:
                if not os.path.isfile(path):
                    raise PreprocessError(f"--input {path!r} is not a readable file")
                real = os.path.realpath(path)
                if real in seen:
                    raise PreprocessError(
                        f"input file {path!r} is given twice (by {seen[real]!r} and {pattern!r}); list each file once"
                    )
                seen[real] = pattern
                files.append(path)
    return files


def _directory_files(directory: str) -> list[str]:
    """A save_to_disk directory's Arrow files in the dataset's order, or every corpus file under a directory."""
    state = os.path.join(directory, "state.json")
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PreprocessError(
                f"{state}: not a datasets save_to_disk state file ({e}); save the dataset again"
            ) from None
        return [os.path.join(directory, name) for name in names]
    splits = os.path.join(directory, "dataset_dict.json")
    if os.path.isfile(splits):
        with open(splits, encoding="utf-8") as f:
            names = json.load(f).get("splits", [])
        raise PreprocessError(
            f"--input {directory!r} holds a dataset with the splits {', '.join(names)}; pass one split's "
            f"directory, e.g. {os.path.join(directory, names[0] if names else 'train')}"
        )
    files = sorted(
        os.path.join(root, name)
        for root, dirs, names in os.walk(directory)
        for name in names
        if name.endswith(CORPUS_SUFFIXES)
    )
    if not files:
        raise PreprocessError(
            f"--input {directory!r} is a directory without corpus files ({', '.join(CORPUS_SUFFIXES)}); "
            "check the path"
        )
    return files


def describe_inputs(files: Sequence[str], columns: Sequence[str] | None) -> list[tuple[str, int] | ColumnarFile]:
    """What `plan_parts` needs of each file: (path, bytes) for JSON lines, the units of a columnar file.

    ``columns`` are the fields a mode reads by name, checked in every columnar file (None: all of them).
    """
    return [columnar_input.describe(p, columns) if is_columnar(p) else (p, os.path.getsize(p)) for p in files]


def plan_parts(
    files: Sequence[tuple[str, int] | ColumnarFile], num_parts: int, gz_cut_every: int = 1
) -> list[list[Piece]]:
    """Cut the concatenated files into ``num_parts`` contiguous, equal ranges of their sizes.

    Inside a compressed file only every ``gz_cut_every``-th cut is kept (the parts in between stay empty):
    each cut in a compressed file costs one more decompression of the file up to it. A columnar file's
    piece lists the units (row groups, record batches) that start in it; a piece with none is left out.
    """
    sizes = [f.size if isinstance(f, ColumnarFile) else f[1] for f in files]
    paths = [f.path if isinstance(f, ColumnarFile) else f[0] for f in files]
    total = sum(sizes)
    bounds = [total * p // num_parts for p in range(num_parts + 1)]
    offset = 0
    for path, size in zip(paths, sizes):
        if is_compressed(path):
            for p in range(1, num_parts):
                if offset < bounds[p] < offset + size and p % gz_cut_every:
                    bounds[p] = max(offset, bounds[p - p % gz_cut_every])
        offset += size
    parts: list[list[Piece]] = [[] for _ in range(num_parts)]
    offset = 0
    for file, path, size in zip(files, paths, sizes):
        for p in range(num_parts):
            lo, hi = max(bounds[p], offset) - offset, min(bounds[p + 1], offset + size) - offset
            if lo >= hi:
                continue
            if isinstance(file, ColumnarFile):
                units = tuple((locator, row) for start, locator, row in file.units if lo <= start < hi)
                if units:
                    parts[p].append(Piece(path, lo, hi, units))
            else:
                parts[p].append(Piece(path, lo, hi))
        offset += size
    return parts


def iter_piece_records(piece: Piece, columns: Sequence[str] | None) -> Iterator[tuple[bytes | dict, int, int]]:
    """Yield (a JSON line's bytes or a row's record, its position, input bytes it took) for every record the piece
    owns; `where` turns the position into ``file:line`` or ``file: row N`` for messages."""
    if is_columnar(piece.path):
        yield from columnar_input.iter_piece_rows(piece, columns)
    else:
        for line, newlines_before in iter_piece_lines(piece):
            yield line, newlines_before, len(line) + 1


def where(piece: Piece, position: int) -> str:
    """The place of a record that `iter_piece_records` gave ``position`` for, as ``file:line`` or ``file: row N``."""
    if is_columnar(piece.path):
        return f"{piece.path}: row {position}"
    return f"{piece.path}:{line_number(piece, position)}"
