"""Small file-system helpers: every output is written to a temporary path, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_atomic(path: str | os.PathLike, save: Callable[[str], Any]) -> None:
    """``save(tmp)`` to a temporary path beside ``path`` that keeps its suffixes (Keras
    wants ``.keras`` and ``.weights.h5``), then a rename: a process killed mid-save leaves
    the previous file or none, never a truncated one that a resume would trust."""
    p = Path(path)
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(".weights.h5") else p.suffix
    tmp = p.with_name(f".{p.name[:len(p.name) - len(suffix)]}.tmp{suffix}")
    try:
        save(str(tmp))
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Writes JSON to ``path`` through a temporary file in the same folder."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside ``final``; renames it into place on success.

    On an exception the temporary directory is removed and ``final`` is untouched. With
    ``overwrite``, an existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(final)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
