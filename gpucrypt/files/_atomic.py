"""Atomic file writing: a temporary file in the destination's folder, fsync, rename.

Every module that writes a file to a path (stream files, model files, key files, the
CLI's safetensors output) goes through here, so the guarantee is the same everywhere:

- the temporary file is created in the destination's folder (so the rename never
  crosses file systems) exclusively, as ``mkstemp`` would, named ``.NAME.XXXXXXXX.gpucrypt-tmp``, and
  given permissions ``mode`` (default 0600, whatever the umask);
- on success its data are fsynced, it is renamed over the destination, and the folder
  is fsynced (where folders can be opened) so the rename is durable;
- on any error (including KeyboardInterrupt) the temporary file is removed and the
  destination is untouched: it appears complete or not at all.

:func:`open_output` also wraps a caller's file object in the same interface
(``write``/``commit``/``abort``, a context manager), without atomicity: the caller owns it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

__all__ = ["AtomicFile", "write_atomically", "write_atomically_with", "open_output",
           "FileObjectOutput", "write_all", "fsync_folder"]

#: permissions of files written here unless the caller says otherwise
DEFAULT_MODE = 0o600


def write_all(file: Any, data: Any) -> None:
    """Write every byte of ``data`` to ``file``, looping over a raw file's partial writes."""
    view = memoryview(data)
    while len(view):
        n = file.write(view)
        if n is None or n >= len(view):  # buffered writers write everything
            return
        view = view[n:]


def fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_exclusively(folder: str, base: str) -> tuple[int, str]:
    """``mkstemp``'s guarantee without importing ``tempfile`` (a tenth of a small file's
    run): a fresh name ``.BASE.XXXXXXXX.gpucrypt-tmp``, created with O_EXCL (never an
    existing file or a planted link), mode 0600, not inherited by child processes."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tag = os.urandom(4).hex()
        temp = os.path.join(folder, f".{base}.{tag}.gpucrypt-tmp")
        try:
            return os.open(temp, flags, 0o600), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder} after 100 tries")


def _temp_beside(path: str, mode: int) -> tuple[int, str]:
    """(fd, name) of a fresh temporary file with permissions ``mode`` in ``path``'s folder."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = _create_exclusively(folder, os.path.basename(path))
    if mode != 0o600:  # created 0600
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            _remove(temp)
            raise
    return fd, temp


def _remove(temp: str) -> None:
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass


def _rename_into_place(temp: str, path: str) -> None:
    os.replace(temp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


class AtomicFile:
    """A file at ``path`` that appears complete or not at all (see the module docstring).

    ``write(data)`` appends to the temporary file; ``commit()`` fsyncs it and renames it
    over ``path``; ``abort()`` removes it (both are idempotent once done). As a context
    manager it commits when the block ends normally and aborts when it raises.
    """

    def __init__(self, path: str | os.PathLike, mode: int = DEFAULT_MODE):
        self.path = os.fspath(path)
        fd, self._temp = _temp_beside(self.path, mode)
        self._file = open(fd, "wb", buffering=0)

    def write(self, data: Any) -> None:
        write_all(self._file, data)

    def fileno(self) -> int:
        """The temporary file's descriptor, for positional writes (``os.pwrite``) from
        several threads at once; the file's size is whatever they reach."""
        return self._file.fileno()

    def commit(self) -> None:
        if self._temp is None:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self.abort()  # no temporary file (of plaintext, on decryption) stays behind
            raise
        self._file.close()
        temp, self._temp = self._temp, None
        try:
            _rename_into_place(temp, self.path)
        except BaseException:
            _remove(temp)
            raise

    def abort(self) -> None:
        if self._temp is not None:
            self._file.close()
            _remove(self._temp)
            self._temp = None

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class FileObjectOutput:
    """A caller's writable binary file object behind :class:`AtomicFile`'s interface.

    ``commit()`` flushes it; ``abort()`` does nothing (what was written stays: the
    caller owns the object). Neither closes it.
    """

    def __init__(self, fileobj: Any):
        self._file = fileobj

    def write(self, data: Any) -> None:
        write_all(self._file, data)

    def commit(self) -> None:
        if hasattr(self._file, "flush"):
            self._file.flush()

    def abort(self) -> None:
        pass

    def __enter__(self) -> "FileObjectOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()


def open_output(dst: Any, mode: int = DEFAULT_MODE) -> AtomicFile | FileObjectOutput:
    """An :class:`AtomicFile` for a path (str or PathLike), else ``dst`` itself wrapped as a
    :class:`FileObjectOutput`; TypeError if it is neither a path nor writable."""
    if isinstance(dst, (str, os.PathLike)):
        return AtomicFile(dst, mode)
    if hasattr(dst, "write"):
        return FileObjectOutput(dst)
    raise TypeError(f"dst must be a path or a writable binary file object, "
                    f"not {type(dst).__name__}")


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = DEFAULT_MODE) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``."""
    with AtomicFile(path, mode) as f:
        f.write(data)


def write_atomically_with(path: str | os.PathLike, write: Callable[[str], None],
                          mode: int = DEFAULT_MODE) -> None:
    """Atomically create ``path`` with a writer that only takes a file name (a library's
    ``save_file(..., filename)``): ``write(temp_path)`` fills the temporary file, which is
    then fsynced and renamed over ``path``. ``write`` must write to that name in place
    (not replace it with another file)."""
    path = os.fspath(path)
    fd, temp = _temp_beside(path, mode)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        _rename_into_place(temp, path)
    except BaseException:
        _remove(temp)
        raise
