"""Write files and folders atomically: to a temporary sibling, renamed into place on success.

A crash or an exception leaves the destination as it was (absent or the previous version), never a
partial file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it to `dest` (replacing it).

    Args:
        dest: the final file (or folder, with `directory=True`).
        directory: create the temporary path as an empty folder instead of a file name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700: give the usual permissions
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
    try:
        yield tmp
        if directory and dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(dest: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
