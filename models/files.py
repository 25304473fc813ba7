"""Atomic writes: a file or a directory appears complete under its final name, or not at all.

Everything the project writes (bundles, reports, resolved configs, result tables, HTML)
goes through these helpers: the content is written to a temporary sibling
(``.<name>.tmp-<random>``) and renamed into place, so a crash or ``kill -9`` leaves at
worst a temporary that :func:`remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _temporary_sibling(path: Path, kind: str = "tmp", suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` for a writer that takes a path (Parquet,
    a figure); it is renamed over ``path`` when the block succeeds, deleted otherwise.
    It keeps ``path``'s suffix, so writers that pick a format by suffix still can."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path, suffix=path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, flush it to disk and rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, key-sorted JSON atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes of ``path`` left beside it; return what went."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [
        p
        for kind in ("tmp", "old")
        for p in path.parent.glob(f".{path.name}.{kind}-*")
        if not p.is_symlink()
    ]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` as a whole.

    An existing directory at ``path`` is moved aside only once the new one is complete
    and removed after the swap; on any error the temporary directory is deleted and
    ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = _temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists() or final.is_symlink():
            old = _temporary_sibling(final, "old")
            final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            if old is not None:
                old.rename(final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
