"""Write files and folders atomically: to a temporary sibling, renamed into place on success.

A crash or an exception leaves the destination as it was (absent or the previous version), never a
partial file. Temporaries are hidden siblings named after the writing process,
`.{name}.tmp-{pid}-{random}` (and `.{name}.old-{pid}` while a folder is swapped): a process killed
outright (SIGKILL, power loss) cannot remove them, so the next write of the same destination removes
those whose process is gone (`remove_stale`), and leaves a live concurrent writer's alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without signalling)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale(dest: str | Path) -> list[Path]:
    """Remove the temporaries that writers of `dest` left when they were killed.

    Siblings `.{name}.tmp-{pid}-*` and `.{name}.old-{pid}` whose process `pid` no longer runs are
    removed, except that a stale `.old-{pid}` is renamed back to `dest` when `dest` is missing (the
    writer died between moving the previous version aside and moving the new one in). Temporaries
    of a live process, and names without a pid (written by older versions), are left alone.

    Returns the paths removed or restored.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(tmp|old)-(\d+)(-.*)?$")
    done = []
    for entry in sorted(dest.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or (m.group(1) == "old" and m.group(3)) or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not dest.exists() and not dest.is_symlink():
            try:
                entry.rename(dest)  # the previous version, back in place
            except OSError:
                continue
        else:
            _remove(entry)
        done.append(entry)
    return done


@contextlib.contextmanager
def atomic_path(dest: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it to `dest` (replacing it).

    Stale temporaries of `dest` left by killed writers are removed first (`remove_stale`).

    Args:
        dest: the final file (or folder, with `directory=True`).
        directory: create the temporary path as an empty folder instead of a file name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest)
    prefix = f".{dest.name}.tmp-{os.getpid()}-"
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
        if directory and (dest.exists() or dest.is_symlink()):
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            _remove(old)  # a previous swap by a process that had this pid
            dest.rename(old)
            try:
                tmp.rename(dest)
            except BaseException:
                old.rename(dest)  # put the previous version back
                raise
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
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
