"""Hugging Face checkpoint files: a lazy reader (rows of one tensor at a time) and a streaming safetensors writer.

Memory holds the rows asked for and nothing else. A safetensors file is a JSON header (dtype, shape and
byte range of every tensor) followed by the raw row-major data, so rows [start, stop) of a tensor are
one contiguous byte range: it is read straight into a new tensor. `.bin` files are memory-mapped with
`torch.load(mmap=True)` for the request and the rows copied out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from megatron_qwen.errors import ConversionError


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple
    dtype: torch.dtype
    offset: int = 0  # safetensors: where the data starts in the file


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file (8-byte little-endian header size, JSON header, data)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{file}: not a safetensors file (unreadable header: {exc})") from exc
    start = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(
                f"{file}: tensor {name} has dtype {entry['dtype']}, which this converter does not read"
            )
        info = TensorInfo(file, tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]],
                          start + entry["data_offsets"][0])
        first, last = entry["data_offsets"]
        if last - first != math.prod(info.shape) * info.dtype.itemsize:
            raise ConversionError(f"{file}: the header gives tensor {name} {last - first} bytes for shape "
                                  f"{list(info.shape)}; the file is corrupt")
        out[name] = info
    return out


def _read_into(info: TensorInfo, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
    """`out` filled from `info.file`'s bytes at `offset` (part of tensor `name`)."""
    with open(info.file, "rb") as f:
        f.seek(offset)
        if f.readinto(out.view(-1).view(torch.uint8).numpy()) != out.numel() * out.element_size():
            raise ConversionError(f"{info.file}: ends inside tensor {name}; the file is truncated, download it again")
    return out


def read_safetensors_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """The whole tensor `name` of a safetensors file, read straight from its byte range."""
    return _read_into(info, name, info.offset, torch.empty(info.shape, dtype=info.dtype))


class HFCheckpoint:
    """A Hugging Face model directory: `config` (config.json) and `tensors` (name -> TensorInfo), read lazily.

    Weights come from, in this order: model.safetensors.index.json, model.safetensors, other *.safetensors
    files, pytorch_model.bin.index.json, pytorch_model.bin (``.bin`` files load with weights_only=True).
    """

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"--hf {self.dir}: no such directory; point it at the downloaded model's folder")
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"--hf {self.dir}: no config.json there; a Hugging Face model directory has one")
        self.config = _read_json(config_path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            self._scan(file)

    def _weight_files(self) -> list[Path]:
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.dir / index_name
            if index.is_file():
                weight_map = _read_json(index).get("weight_map") or {}
                files = sorted({self.dir / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ConversionError(
                        f"{index} lists {missing[0]}, which is not in {self.dir}; finish the download"
                    )
                if not files:
                    raise ConversionError(f"{index} has an empty weight_map")
                return files
            if (self.dir / single).is_file():
                return [self.dir / single]
            if single.endswith(".safetensors"):
                files = sorted(self.dir.glob("*.safetensors"))
                if files:
                    return files
        raise ConversionError(
            f"--hf {self.dir}: no weights found; expected model.safetensors[.index.json] or "
            "pytorch_model.bin[.index.json]"
        )

    def _scan(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            for name, info in read_safetensors_header(file).items():
                self._add(name, info)
        else:
            for name, tensor in _load_bin(file).items():
                self._add(name, TensorInfo(file, tuple(tensor.shape), tensor.dtype))

    def _add(self, name: str, info: TensorInfo) -> None:
        if name in self.tensors:
            raise ConversionError(f"tensor {name} appears in both {self.tensors[name].file.name} and {info.file.name}")
        self.tensors[name] = info

    def read(self, name: str, start: int | None = None, stop: int | None = None, slab: int | None = None
             ) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of it by default), as a tensor that owns its memory; with
        `slab`, rows of `name[slab]` (one expert of a fused expert tensor)."""
        info = self.tensors[name]
        if info.file.suffix != ".safetensors":
            whole = _load_bin(info.file)[name]
            return (whole if slab is None else whole[slab])[start:stop].clone()  # a view of the mapping until cloned
        shape = info.shape if slab is None else info.shape[1:]
        start, stop, _ = slice(start, stop).indices(shape[0])
        out = torch.empty((max(stop - start, 0), *shape[1:]), dtype=info.dtype)
        row_bytes = math.prod(shape[1:]) * out.element_size()
        first = start if slab is None else slab * shape[0] + start
        return _read_into(info, name, info.offset + first * row_bytes, out)


def tokenizer_files(directory: Path) -> tuple[dict[int, str] | None, str | None]:
    """(added tokens by id, chat template) of the tokenizer files in a Hugging Face model directory: from
    tokenizer_config.json (`added_tokens_decoder`, `chat_template`), else tokenizer.json (`added_tokens`) and
    chat_template.jinja; (None, None) when it has none."""
    added, template = None, None
    config_file, tokenizer_file = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if config_file.is_file():
        config = _read_json(config_file)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            added = {int(i): entry["content"] for i, entry in decoder.items()}
        template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
    if added is None and tokenizer_file.is_file():
        tokens = _read_json(tokenizer_file).get("added_tokens")
        if isinstance(tokens, list):
            added = {int(entry["id"]): entry["content"] for entry in tokens}
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    return added, template


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc}); download it again") from exc


def _load_bin(file: Path) -> dict:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zip) torch.save files cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"{file}: cannot be read as a weights-only PyTorch checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ConversionError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, shape and dtype up front, its data as row blocks produced on demand."""

    name: str
    shape: tuple
    dtype: torch.dtype
    blocks: Callable[[], Iterator[torch.Tensor]]  # row blocks that concatenate (dim 0) to the tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(directory: Path, tensors: list[PlannedTensor], max_shard_bytes: int,
                      single_name: str = "model.safetensors") -> list[str]:
    """Write `tensors` (in order) as Hugging Face safetensors shards of at most `max_shard_bytes` (a tensor is
    never split); returns the file names. `single_name` when one file suffices, else
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    Shapes and dtypes are known in advance, so each file's header is written first and every tensor's
    data streamed after it, one row block at a time: memory holds one block, never a shard.
    """
    shards: list[list[PlannedTensor]] = [[]]
    for tensor in tensors:
        if shards[-1] and sum(t.nbytes for t in shards[-1]) + tensor.nbytes > max_shard_bytes:
            shards.append([])
        shards[-1].append(tensor)
    n = len(shards)
    names = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    for file_name, shard in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
        with open(directory / file_name, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for t in shard:
                written = 0
                for block in t.blocks():
                    if block.dtype != t.dtype or tuple(block.shape[1:]) != tuple(t.shape[1:]):
                        raise AssertionError(
                            f"{t.name}: block {block.dtype} {tuple(block.shape)} does not fit {t.dtype} {t.shape}"
                        )
                    f.write(block.contiguous().view(-1).view(torch.uint8).numpy())
                    written += block.numel() * block.element_size()
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
    if n > 1:
        weight_map = {t.name: file_name for file_name, shard in zip(names, shards) for t in shard}
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
