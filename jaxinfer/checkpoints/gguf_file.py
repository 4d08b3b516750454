"""The GGUF file format (llama.cpp's), read straight from a memory map.

Only what loading needs: the metadata as Python values and each tensor's type, shape and
data as a numpy view of the mapped file. The `gguf` package's reader builds a numpy view
per metadata item (a 49k-token vocabulary made it take 7 s and 158 MB); this one walks
the header once with `struct` (tens of milliseconds) and reads no tensor data until asked.
Tensor data views follow the `gguf` package's shapes (numpy order; quantized types as
[rows, bytes per row] uint8), so `gguf.quants` works on them.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxinfer.checkpoints.model import CheckpointError

T = gguf.GGMLQuantizationType
MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of a scalar (8: string, 9: array).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}
STRING, ARRAY = 8, 9
PLAIN_DTYPES = {T.F32: np.float32, T.F16: np.float16}


class GGUFFormatError(ValueError):
    """The header is not GGUF, or ends before it should."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `shape` in GGUF order (innermost first), `data` in numpy order."""

    name: str
    tensor_type: T
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """A memory-mapped GGUF file: `fields` (metadata key -> value), `tensors`, and
    `metadata_bytes` (the header up to the tensor infos, which the vocabulary comes from)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with self.path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._map)
        self._offset = 0
        if bytes(self._take(4)) != MAGIC:
            raise GGUFFormatError("no GGUF magic at the start of the file")
        version, n_tensors, n_fields = self._unpack("<IQQ")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version}; supported: 2, 3")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
        self.metadata_end = self._offset
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, dims, kind, offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(name, dims, kind, data_start + offset)
                        for name, dims, kind, offset in infos]

    @property
    def metadata_bytes(self) -> memoryview:
        return self._view[: self.metadata_end]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def release(self) -> None:
        """Returns the file pages read so far to the OS page cache: they would otherwise
        count in this process's resident memory until the file is closed."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)

    # -- header parsing ---------------------------------------------------------------------

    def _take(self, n: int) -> memoryview:
        end = self._offset + n
        if end > len(self._map):
            raise GGUFFormatError(f"the header ends at byte {len(self._map):,}, inside an item "
                                  f"that needs bytes {self._offset:,}..{end:,}")
        piece = self._view[self._offset : end]
        self._offset = end
        return piece

    def _unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return str(self._take(n), "utf-8", "replace")

    def _value(self, kind: int) -> Any:
        if kind == STRING:
            return self._string()
        if kind in SCALARS:
            return self._unpack("<" + SCALARS[kind])[0]
        if kind != ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {kind}")
        item, count = self._unpack("<IQ")
        if item == STRING:
            return self._strings(count)
        if item in SCALARS:
            dtype = np.dtype("<" + SCALARS[item])
            return np.frombuffer(self._take(count * dtype.itemsize), dtype).tolist()
        return [self._value(item) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        """`count` length-prefixed strings (a vocabulary): one tight loop, no per-item views."""
        view, offset, size = self._map, self._offset, len(self._map)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if offset + 8 > size:
                raise GGUFFormatError(f"a string array runs past the end ({size:,} bytes)")
            (n,) = unpack(view, offset)
            out.append(view[offset + 8 : offset + 8 + n].decode("utf-8", "replace"))
            offset += 8 + n
        if offset > size:
            raise GGUFFormatError(f"a string array runs past the end ({size:,} bytes)")
        self._offset = offset
        return out

    def _tensor(self, name: str, dims: tuple[int, ...], kind: int, offset: int) -> GGUFTensor:
        try:
            tensor_type = T(kind)
        except ValueError as e:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {kind}") from e
        n_elements = int(np.prod(dims))
        block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        n_bytes = n_elements * type_size // block
        np_shape = tuple(reversed(dims))
        if offset + n_bytes > len(self._map):  # checked by the caller with a clear message
            data = np.empty(0, np.uint8)
        elif tensor_type in PLAIN_DTYPES:
            data = np.frombuffer(self._map, PLAIN_DTYPES[tensor_type], n_elements,
                                 offset).reshape(np_shape)
        else:
            data = np.frombuffer(self._map, np.uint8, n_bytes, offset).reshape(
                gguf.quants.quant_shape_to_byte_shape(np_shape, tensor_type))
        return GGUFTensor(name, tensor_type, tuple(dims), n_elements, n_bytes, offset, data)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses the header and checks that every tensor's data lies inside the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = GGUFFile(path)
    except Exception as e:  # a corrupt header fails in assorted ways
        raise CheckpointError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise CheckpointError(
                f"{path}: truncated or corrupt: tensor {t.name!r} ends at byte {end:,} "
                f"but the file has {size:,} bytes"
            )
    return reader
