"""Atomic output: every file or folder ddpm_fast writes (images, sample shards, checkpoints,
model folders) appears whole under its name or not at all, even if the process is killed.

A writer fills a temporary sibling (".<name>.<random>.tmp"), fsyncs it and renames it into
place; a failure removes the temporary. Readers never see half a file.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a binary file to fill: a temporary file in the same folder, fsynced and renamed to
    `path` on success, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())     # mkstemp's 0600 would hide outputs from others
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:      # say which file could not be written
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` written to `path` atomically (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling folder to fill; on success it replaces `path` by a rename, on
    failure it is removed. Readers see the old folder or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: Path) -> None:
    """ValueError before any work if outputs could not be created under `folder` (or the nearest
    part of it that exists: missing folders are created when writing)."""
    existing = Path(folder).resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write under {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"cannot write under {folder}: {e.strerror or e}") from None
