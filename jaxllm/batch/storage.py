"""Files through fsspec (local paths, gs:// via gcsfs, any other protocol): input shards from a glob,
streamed line by line, and whole-object writes.

Every write here is all-or-nothing: object stores (GCS, S3) only show an object once its upload is
finalized, so we write there directly; on a local disk we write a temporary name and rename it, which
POSIX makes atomic. A reader therefore never sees half a part, half a progress record or half an output.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

_TMP = ".tmp-"  # local temporary names; never listed as parts


class StorageError(Exception):
    """A path that cannot be read or written; the message names it."""


@dataclass(frozen=True)
class Shard:
    url: str  # as the user would write it (protocol included)
    size: int


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def list_shards(pattern: str) -> list[Shard]:
    """The input files a path or glob names, in name order (the order lines are read)."""
    try:
        fs, path = url_to_fs(pattern)
        if fs.isfile(path):
            paths = [path]
        else:
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p)) if any(c in path for c in "*?[") else []
        shards = [Shard(_url(fs, p), int(fs.size(p) or 0)) for p in paths]
    except (OSError, ValueError, ImportError) as exc:
        raise StorageError(f"cannot read input {pattern}: {exc}") from None
    if not shards:
        raise StorageError(f"input {pattern} does not exist (no file matches it)")
    return shards


def read_lines(url: str) -> Iterator[bytes]:
    """Streams a shard's lines (fsspec reads ahead in blocks: memory stays bounded by the longest line);
    .gz / .bz2 / .zst shards are decompressed on the fly."""
    with fsspec.open(url, "rb", compression="infer") as f:
        yield from f


def write_atomic(url: str, data: bytes, *, fault: str | None = None) -> None:
    fs, path = url_to_fs(url)
    if _is_local(fs):
        tmp = f"{path}{_TMP}{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            _write(f, data, fault)
            f.flush()
            os.fsync(f.fileno())
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            _write(f, data, fault)


def _write(f, data: bytes, fault: str | None) -> None:
    if fault is None:
        f.write(data)
        return
    from jaxllm.batch.faults import crash_point
    f.write(data[: len(data) // 2])
    crash_point(fault)
    f.write(data[len(data) // 2:])


def write_stream(url: str, chunks: Iterator[bytes], *, fault: str | None = None) -> None:
    """write_atomic for content too large to hold: the chunks are copied as they come."""
    fs, path = url_to_fs(url)
    local = _is_local(fs)
    target = f"{path}{_TMP}{uuid.uuid4().hex[:8]}" if local else path
    with fs.open(target, "wb") as f:
        for i, chunk in enumerate(chunks):
            f.write(chunk)
            if i == 0 and fault:
                from jaxllm.batch.faults import crash_point
                crash_point(fault)
        if local:
            f.flush()
            os.fsync(f.fileno())
    if local:
        fs.mv(target, path)


def read_bytes(url: str) -> bytes | None:
    fs, path = url_to_fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def list_dir(url: str, prefix: str) -> list[str]:
    """Names under url starting with prefix, sorted; local temporaries left by a kill are not listed."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)  # listings are cached per filesystem instance; parts appear as we write
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if n.startswith(prefix) and _TMP not in n)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def make_dirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)  # a no-op on object stores (no directories there)


def iter_chunks(url: str, size: int = 8 << 20) -> Iterator[bytes]:
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(size):
            yield chunk
