"""A fast GGUF header parser: metadata and tensor index, with tensor bytes memory-mapped.

gguf.GGUFReader builds a NumPy memmap view per string (SmolLM2's 49k-token vocab + 48k merges take
~10 s); reading the header with struct takes ~0.1 s. Dequantization still uses gguf.quants.
Format (little-endian): "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv (key, type, value),
then per tensor (name, u32 n_dims, u64 dims fastest-first, u32 ggml type, u64 offset), then the
data section at the next multiple of general.alignment (default 32).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np

from models.loading.errors import CheckpointError, CheckpointNotFoundError

# GGUF value type -> struct code (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass
class GGUFTensor:
    """shape: GGUF order (fastest dim first, as llama.cpp prints it); data: raw bytes [rows, row_bytes]
    for block-quantized types and BF16, typed values [rows, cols] for F32/F16 (NumPy row-major order)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


@dataclasses.dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]  # numeric arrays as ndarrays, string arrays as lists
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise CheckpointError(f"{self.path}: truncated GGUF header ({e})") from e
        self.pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string(self) -> str:
        n = self.unpack("Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return bytes(s).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            sub, n = self.unpack("IQ")
            if sub == 8:
                return [self.string() for _ in range(n)]
            if sub == 9:
                return [self.value(9) for _ in range(n)]
            arr = np.frombuffer(self.buf, _NP[sub], n, self.pos).copy()
            self.pos += arr.nbytes
            return arr
        if kind not in _SCALARS:
            raise CheckpointError(f"{self.path}: unknown GGUF value type {kind}")
        return self.unpack(_SCALARS[kind])


def read_gguf(path: str) -> GGUFFile:
    import gguf  # for the quant type enum and block sizes

    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise CheckpointError(f"{path}: not a GGUF file ({e})") from e
    if buf[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("IQQ")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3)")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", buf, cur.pos))
        cur.pos += 8 * n_dims
        kind, offset = cur.unpack("IQ")
        infos.append((name, dims, kind, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    data = np.frombuffer(buf, np.uint8)  # zero-copy view of the mapping; keeps it alive
    tensors = []
    for name, dims, kind, offset in infos:
        try:
            qtype = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type id {kind}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        np_shape = tuple(reversed(dims))
        n_bytes = int(np.prod(dims)) // block * type_size
        raw = data[start + offset:start + offset + n_bytes]
        if raw.size != n_bytes:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        typed = {"F32": np.float32, "F16": np.float16}.get(qtype.name)  # BF16 stays bytes, as gguf.quants wants
        if typed is not None:
            arr = raw.view(typed).reshape(np_shape)
        else:
            arr = raw.reshape(*np_shape[:-1], np_shape[-1] // block * type_size)
        tensors.append(GGUFTensor(name, qtype, dims, arr))
    return GGUFFile(path, version, meta, tensors)
