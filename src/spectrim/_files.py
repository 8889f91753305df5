"""Files spectrim reads and writes: checksums, atomic writes, atomic folders.

* :func:`sha256_file` hashes a file; :func:`sha256_cached` remembers the answer for the
  rest of the process, keyed by the file's identity (path, device, inode, size and
  modification time), so a file is hashed once however often it is verified.
* :func:`atomic_write_bytes` / :func:`atomic_write_text` write to a temporary file in
  the destination's folder, flush it to disk and rename it over the destination: a
  reader sees the old file or the new one, never half of one.
* :func:`atomic_directory` does the same for a whole folder: the caller fills a
  temporary sibling, which replaces the destination only once it is complete (with
  Linux's ``renameat2(RENAME_EXCHANGE)`` the swap itself is one atomic step; elsewhere
  the old folder is renamed aside first and deleted last).
* :func:`check_output_dir` answers, before any long computation, whether a folder can
  be written there (and refuses a non-empty one unless told to overwrite it).

Example::

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'new')
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputExistsError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "sha256_cached",
    "sha256_file",
]

_CHUNK = 1 << 20


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty (pass ``overwrite=True``)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks.

    Example::

        >>> import tempfile
        >>> f = tempfile.NamedTemporaryFile(delete=False); f.close()
        >>> sha256_file(f.name)[:16]
        'e3b0c44298fc1c14'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_cached(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, computed once per process for a file that has not changed
    (same path, inode, size and modification time)."""
    p = Path(path)
    key = _identity(p)
    digest = _HASHES.get(key)
    if digest is None:
        digest = sha256_file(p)
        if _identity(p) == key:  # not modified while it was read
            _HASHES[key] = digest
    return digest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename); return the path.

    The parent folder is created if needed. On any error the destination is left as it
    was and the temporary file is removed.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return dest


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_output_dir(
    path: str | os.PathLike[str], *, overwrite: bool = False, what: str = "output folder"
) -> Path:
    """Check that a folder can be written at ``path``; return it as a ``Path``.

    Raises:
        NotADirectoryError: ``path`` exists and is a file.
        OutputExistsError: ``path`` is a non-empty folder and ``overwrite`` is false.
        PermissionError / OSError: nothing can be created next to ``path`` (read-only or
            virtual file system, missing permissions); the message names ``path``.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {out} exists and is not a directory")
    if _is_nonempty_dir(out) and not overwrite:
        raise OutputExistsError(
            f"{what} {out} exists and is not empty; choose a new folder or allow replacing "
            "it (overwrite=True, or --overwrite on the command line)"
        )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
        probe.rmdir()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise type(exc)(exc.errno, f"{what} {out}: cannot write in {parent} ({reason})") from None
    return out


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the complete folder ``tmp`` to ``dest``, replacing what is there."""
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if dest.is_dir() and not any(dest.iterdir()):
        os.rename(tmp, dest)  # POSIX: a directory may replace an empty one
        return
    if _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old content
        return
    # two renames: the old folder stays complete (aside) until the new one is in place
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    old.rmdir()
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path``; on success it replaces ``path``.

    Everything is written into the temporary folder; only when the ``with`` block ends
    without an exception is it flushed to disk and moved to ``path`` (replacing an existing
    folder only with ``overwrite=True``; an empty one is always replaced). If the block
    fails, or the process is killed, ``path`` is untouched and the temporary folder
    (``.NAME.tmp-*``) is removed or left behind for inspection; it is never read.

    Raises:
        OutputExistsError: ``path`` is a non-empty folder and ``overwrite`` is false.
    """
    dest = check_output_dir(path, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if _is_nonempty_dir(dest) and not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"{dest} was created by someone else meanwhile; not replaced")
        _replace_dir(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
