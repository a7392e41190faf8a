"""On-disk cache of preprocessed datasets: memory-mappable ``.npy`` CSR arrays plus metadata.

A cache entry is a directory named by a hash of the resolved data configuration and a
fingerprint of the input file. It is built in a temporary directory and renamed into place,
so a reader never sees a half-written entry; a lock file makes concurrent builders on one
node wait for the first instead of repeating its work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("tokbench.data")

# 2: per-cell library_size.npy and total_counts.npy (raw counts for UCE, whole-cell totals
# for Geneformer); entries of format 1 lack them and are rebuilt.
FORMAT_VERSION = 2
META = "meta.json"


def default_cache_root() -> Path:
    """``$TOKBENCH_CACHE``, else ``~/.cache/tokbench``."""
    return Path(os.environ.get("TOKBENCH_CACHE", Path.home() / ".cache" / "tokbench")).expanduser().resolve()


def file_fingerprint(path: Path) -> dict:
    """Size, modification time and a hash of the first and last MiB of ``path``."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if stat.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read(1 << 20))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_blake2b": digest.hexdigest()}


def cache_key(resolved_config: dict, fingerprint: dict) -> str:
    """Hex key of a resolved (interpolation-free) config plus the input file's fingerprint."""
    payload = json.dumps({"format": FORMAT_VERSION, "config": resolved_config, "input": fingerprint}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class NpyAppender:
    """Append 1-D chunks to a ``.npy`` file whose final length is only known at the end.

    The file is created for ``capacity`` elements (sparse on disk), filled in order, then its
    header is rewritten in place with the real length and the file truncated, so the data
    is written once and memory use is one chunk.
    """

    def __init__(self, path: Path, dtype, capacity: int):
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self._capacity = max(int(capacity), 1)
        self._header = self._header_bytes(self._capacity)
        self._fh = open(path, "wb")
        self._fh.write(self._header)
        self._fh.truncate(len(self._header) + self._capacity * self.dtype.itemsize)

    def _header_bytes(self, length: int) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length,)}
        )
        return buf.getvalue()

    def append(self, values: np.ndarray) -> None:
        """Write ``values`` (cast to the file's dtype) after what is already there."""
        if self.length + len(values) > self._capacity:
            raise ValueError(f"{self.path}: more values than the capacity {self._capacity}")
        self._fh.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.length += len(values)

    def close(self) -> None:
        """Rewrite the header with the real length and truncate the unused tail."""
        header = self._header_bytes(self.length)
        if len(header) != len(self._header):
            # numpy pads 1-D headers to fit any length up to 21 digits, so this cannot
            # happen with a supported numpy; refuse rather than corrupt the file.
            raise RuntimeError(f"{self.path}: .npy header size changed with the array length")
        self._fh.seek(0)
        self._fh.write(header)
        self._fh.truncate(len(header) + self.length * self.dtype.itemsize)
        self._fh.close()


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_meta(entry: Path) -> dict | None:
    """The metadata of a complete cache entry, or None if it is absent or incomplete."""
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") and meta.get("format") == FORMAT_VERSION else None


def get_or_build(entry: Path, build: Callable[[Path], dict], validate: Callable[[Path, dict], None]) -> tuple[dict, bool]:
    """Return ``(meta, built)`` for the cache entry at ``entry``, building it if needed.

    ``build(tmp_dir) -> meta`` writes every file into ``tmp_dir``; ``validate(entry, meta)``
    raises ``ValueError`` on a corrupt entry, which is then removed and rebuilt.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    meta = _valid_meta(entry, validate)
    if meta is not None:
        return meta, False
    with _locked(entry.parent / f"{entry.name}.lock"):
        meta = _valid_meta(entry, validate)  # another process may have built it meanwhile
        if meta is not None:
            return meta, False
        tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            meta.update(format=FORMAT_VERSION, complete=True)
            (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return meta, True


def _valid_meta(entry: Path, validate) -> dict | None:
    if not entry.exists():
        return None
    meta = read_meta(entry)
    try:
        if meta is None:
            raise ValueError("metadata missing or incomplete")
        validate(entry, meta)
        return meta
    except (ValueError, OSError) as exc:
        log.warning("cache entry %s is corrupt (%s); rebuilding it", entry, exc)
        trash = entry.parent / f".corrupt-{entry.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return None
