"""Safetensors models read tensor by tensor, and written as Hugging Face shards with an index.

A model on disk is one ``.safetensors`` file, a directory holding ``model.safetensors``, or a
directory with a ``model.safetensors.index.json`` whose ``weight_map`` names the shard of each
tensor (the Hugging Face layout). :class:`SafetensorsReader` parses only the headers up front;
each tensor is read when asked for, either memory-mapped through ``safetensors.safe_open`` or
read straight into a caller's buffer (``out=``) so a streaming merge can reuse its buffers.

:class:`ShardedWriter` knows every tensor's name, dtype and shape before the first byte, so it
writes each shard's header first and then each tensor as it arrives: nothing but the tensor
being written is held. The directory appears under its name only once complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from storage.errors import ArtifactError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3

DTYPES: dict[str, torch.dtype] = {
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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, the byte offset of its data, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in the order their data lies in the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist: check the path") from None
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: not a valid safetensors file: rebuild it") from None
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise ArtifactError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        info = TensorInfo(
            name,
            DTYPES[entry["dtype"]],
            tuple(entry["shape"]),
            path,
            8 + length + begin,
            end - begin,
        )
        tensors.append(info)
    return {info.name: info for info in sorted(tensors, key=lambda info: info.offset)}


def model_files(location: str | Path) -> list[Path]:
    """The safetensors files of a model: a file, a directory's index shards, or its one file."""
    location = Path(location)
    if location.is_file():
        return [location]
    index = location / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ArtifactError(f"{index}: not a valid index (no weight_map): rebuild it") from None
        return [location / name for name in dict.fromkeys(weight_map.values())]
    if (location / SINGLE_NAME).is_file():
        return [location / SINGLE_NAME]
    found = sorted(location.glob("*.safetensors")) if location.is_dir() else []
    if len(found) == 1:
        return found
    raise ArtifactError(
        f"{location}: no {SINGLE_NAME} or {INDEX_NAME} there: point at a safetensors model"
    )


class SafetensorsReader:
    """Tensors of a safetensors model, read one at a time.

    ``mmap=True`` reads through ``safe_open`` (zero-copy; each file is mapped only for the
    duration of one read, so touched pages are not held). Otherwise ``read(name, out=buffer)``
    reads the bytes into the caller's buffer, or into a new tensor.
    """

    def __init__(self, location: str | Path, *, mmap: bool = False) -> None:
        self.location = Path(location)
        self.mmap = mmap
        self.tensors: dict[str, TensorInfo] = {}
        for path in model_files(location):
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise ArtifactError(f"{self.location}: tensor '{name}' appears twice")
                self.tensors[name] = info
        self._files: dict[Path, int] = {}

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``; read into ``out`` (contiguous, same dtype and numel) when given."""
        info = self.tensors[name]
        if out is None and self.mmap:
            try:
                with safe_open(str(info.path), framework="pt") as handle:
                    return handle.get_tensor(name)
            except SafetensorError as error:
                raise ArtifactError(f"{info.path}: cannot read '{name}' ({error})") from None
        if out is None:
            out = torch.empty(info.shape, dtype=info.dtype)
        elif out.dtype != info.dtype or out.numel() * out.element_size() != info.nbytes:
            raise ValueError(f"buffer for '{name}' must be {info.dtype} {info.shape}")
        if info.nbytes:
            self._read_into(info, info.offset, out.reshape(-1).view(torch.uint8).numpy())
        return out.view(info.shape)

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``, read alone."""
        info = self.tensors[name]
        shape = (stop - start, *info.shape[1:])
        row_bytes = info.nbytes // info.shape[0]
        if out is None:
            out = torch.empty(shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != shape:
            raise ValueError(f"buffer for rows of '{name}' must be {info.dtype} {shape}")
        if out.numel():
            view = out.reshape(-1).view(torch.uint8).numpy()
            self._read_into(info, info.offset + start * row_bytes, view)
        return out

    def _read_into(self, info: TensorInfo, offset: int, view: object) -> None:
        descriptor = self._files.get(info.path)
        if descriptor is None:
            descriptor = self._files[info.path] = os.open(info.path, os.O_RDONLY)
        buffer = memoryview(view).cast("B")  # type: ignore[arg-type]
        done, size = 0, len(buffer)
        while done < size:  # preadv may return fewer bytes than asked (>2 GiB reads)
            count = os.preadv(descriptor, [buffer[done:]], offset + done)
            if count == 0:
                raise ArtifactError(f"{info.path}: truncated while reading '{info.name}'")
            done += count

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileTensors(Mapping[str, torch.Tensor]):
    """A safetensors model as a read-only mapping: each lookup reads that one tensor and holds
    nothing, so a merge that asks for one tensor at a time holds one (the data statistics of
    regmean and fisher are model-sized per task)."""

    def __init__(self, reader: SafetensorsReader) -> None:
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.reader.tensors:
            raise KeyError(name)
        return self.reader.read(name)

    def __contains__(self, name: object) -> bool:
        return name in self.reader.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.tensors)

    def __len__(self) -> int:
        return len(self.reader.tensors)


def plan_shards(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Consecutive groups of tensors, each under ``max_shard_bytes`` unless one tensor is larger."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Writes tensors, in the order of ``specs``, as HF shards plus the index JSON.

    Files go to a staging directory beside ``directory`` (``staging`` may receive extra files
    such as config.json); ``finish()`` writes the index and renames the staging directory.
    With ``single_file`` every tensor goes to one ``model.safetensors`` and no index is written
    (the layout of a published merge's own tensors, which every reader of it reads).
    """

    def __init__(
        self,
        directory: str | Path,
        specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        single_file: bool = False,
    ) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and any(self.directory.iterdir()):
            raise ArtifactError(f"{self.directory} exists and is not empty: choose a new --out")
        self.staging = self.directory.with_name(
            f".{self.directory.name}.{uuid.uuid4().hex}.partial"
        )
        unsupported = next((name for name, dtype, _ in specs if dtype not in DTYPE_NAMES), None)
        if unsupported is not None:
            raise ArtifactError(f"tensor '{unsupported}' has a dtype that safetensors lacks")
        self.staging.mkdir(parents=True)
        self.metadata = {"format": "pt"} | (metadata or {})
        groups = [list(specs)] if single_file else plan_shards(specs, max_shard_bytes)
        self.single_file = single_file
        self.weight_map: dict[str, str] = {}
        self._order: list[tuple[str, int]] = []  # (name, shard index) in writing order
        self._specs = list(specs)
        self._files = []
        self.total_size = 0
        for index, group in enumerate(groups):
            numbered = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
            file_name = SINGLE_NAME if single_file else numbered
            self._files.append(open(self.staging / file_name, "wb"))  # noqa: SIM115
            self._write_header(self._files[-1], group)
            for name, _, _ in group:
                self.weight_map[name] = file_name
                self._order.append((name, index))
        self._next = 0

    def _write_header(self, handle, group) -> None:
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape in group:
            nbytes = _nbytes(dtype, shape)
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.total_size += offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        handle.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next name of ``specs`` with its dtype/shape."""
        if self._next >= len(self._order) or self._order[self._next][0] != name:
            expected = self._order[self._next][0] if self._next < len(self._order) else "none"
            raise ValueError(
                f"tensors must be written in order: expected '{expected}', got '{name}'"
            )
        _, dtype, shape = self._specs[self._next]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor '{name}' must be {dtype} {tuple(shape)}")
        handle = self._files[self._order[self._next][1]]
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def finish(self) -> Path:
        """Close the shards, write the index, make the directory visible; returns it."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} tensors were never written")
        for handle in self._files:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        if not self.single_file:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        if self.directory.exists():
            self.directory.rmdir()  # empty, checked at the start
        os.replace(self.staging, self.directory)
        return self.directory

    def abort(self) -> None:
        """Drop everything written so far."""
        for handle in self._files:
            handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class TensorView:
    """Some of a reader's tensors under other names: ``names`` maps each new name to the name
    it has in ``reader``. Reads go to ``reader``; closing the view closes it."""

    def __init__(self, reader: SafetensorsReader | TensorView, names: dict[str, str]) -> None:
        self.reader = reader
        self._source = dict(names)
        self.tensors = {
            new: dataclasses.replace(reader.tensors[old], name=new)
            for new, old in self._source.items()
        }

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.reader.read(self._source[name], out=out)

    def read_rows(
        self, name: str, start: int, stop: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.reader.read_rows(self._source[name], start, stop, out=out)

    def close(self) -> None:
        self.reader.close()


def write_view(
    view: SafetensorsReader | TensorView,
    directory: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    single_file: bool = False,
) -> Path:
    """Copy every tensor of ``view`` into a new model ``directory``, one tensor at a time
    (e.g. a merged backbone under the Hugging Face model's own names)."""
    specs = [(name, info.dtype, info.shape) for name, info in view.tensors.items()]
    writer = ShardedWriter(
        directory, specs, max_shard_bytes=max_shard_bytes, single_file=single_file
    )
    try:
        for name, _, _ in specs:
            writer.write(name, view.read(name))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def digest_model(reader: SafetensorsReader | TensorView) -> str:
    """``storage.digest.digest_state`` of the model, computed one tensor at a time."""
    hasher = hashlib.sha256()
    for name in sorted(reader.tensors):
        tensor = reader.read(name)
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            hasher.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        del tensor
    return hasher.hexdigest()
