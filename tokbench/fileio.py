"""Atomic file writes: a reader (a resumed trial, a browser reloading the report, another
node sharing the cache) sees either the old file or the whole new one, never a part.

Every write goes to a temporary file in the target's own folder (so the final rename stays
on one file system and is atomic), is flushed to disk, then renamed over the target. The
temporary name comes from :func:`uuid.uuid4`, never from a seeded generator: two writers of
the same file (two trials, two processes on a shared disk) cannot pick the same name, and
the write does not consume draws from a random stream that checkpoints save and restore.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, the
    file written there replaces ``path`` (``durable``: fsync first, so a power cut cannot
    leave an empty file under the final name). On an exception the temporary file is
    removed and ``path`` is left as it was. The parent folder is created when missing.

    For writers that want a path (``np.save``, ``figure.savefig``, ``torch.save``); keep the
    suffix of ``path`` so such writers do not append their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, payload: bytes | str, *, durable: bool = True) -> None:
    """Write ``payload`` (bytes, or text as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
