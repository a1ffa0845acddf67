"""Atomic file writing: nothing at the destination until the file is complete.

Every module that writes a file to a path (stream files, model files, key files, the
CLI's outputs) goes through here, so the guarantee is the same everywhere:

- On Linux the data go to an *unnamed* file (``O_TMPFILE``) in the destination's folder,
  given permissions ``mode`` (default 0600, whatever the umask). It has no name until
  it is published, so no signal, not even SIGKILL, and no crash leaves anything behind
  while it is written: the kernel frees it with the last descriptor. That also holds for
  plaintext being decrypted. Two moments give it a name before the destination's:
  publishing with ``overwrite=True`` (an unnamed file cannot be renamed over a file, so
  it is linked to a temporary name beside the destination, then renamed: for a few
  system calls), and :meth:`AtomicFile.writable_name` where ``/proc`` is not mounted (it
  links the file to a temporary name, then on as a named file). That name is a named
  temporary file as below: the signals below remove it, SIGKILL or a crash in that
  window can leave it.
- Elsewhere (or where the file system refuses ``O_TMPFILE``) a named temporary file,
  created exclusively as ``mkstemp`` would, ``.NAME.XXXXXXXX.gpucrypt-tmp``. While one
  exists, SIGTERM and SIGHUP (and SIGPIPE, when its action is the default; Python
  ignores it and raises ``BrokenPipeError`` instead) remove it before the process dies,
  when they still have their default action and the file was made in the main thread.
  SIGKILL cannot be caught: there a named temporary file can stay behind.
- :class:`TemporaryFolder` gives the same signal cleanup to a folder filled and then
  renamed into place (checkpoint folders), removing the whole tree.
- On success the data are fsynced and the file is published at the destination, then
  the folder is fsynced (where folders can be opened) so that it is durable. With
  ``overwrite=False`` publishing is a hard link, which fails when the destination
  appeared in the meantime (:class:`OutputExists`), so two writers racing for one new
  path cannot both win; with ``overwrite=True`` it is a rename over the destination.
- On any error (including KeyboardInterrupt) the temporary file is dropped and the
  destination is untouched: it appears complete or not at all. Dropping it (and removing
  a :class:`TemporaryFolder`) runs to its end even if Ctrl-C comes meanwhile, pressed
  again while the first one's clean-up runs (:func:`gpucrypt._interrupts.uninterrupted`):
  that Ctrl-C is raised once the clean-up is done.
- Errors name the destination, never a temporary file: those of opening and publishing,
  and those of a write that fails part-way (a full disk, a quota, a file-size limit),
  whether it went through :meth:`AtomicFile.write` or to its descriptor (the library's
  workers write with ``pwrite``): ``OSError.filename`` is the destination's path as the
  caller gave it.
- A destination that is a symbolic link is refused (``OSError``, ELOOP) rather than
  replaced by a file (its target would keep the old data) or written through (a planted
  link would choose where the data go). :func:`replace_head`, which rewrites a file that
  was just read through the name it was given, follows the link to that file.

:func:`open_output` also wraps a caller's file object in the same interface
(``write``/``commit``/``abort``, a context manager), without atomicity: the caller owns it.
"""
from __future__ import annotations

import contextlib
import errno
import _thread
import io
import os
import stat
import sys
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no file locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["AtomicFile", "OutputExists", "write_atomically", "write_atomically_with",
           "replace_head", "open_output", "FileObjectOutput", "write_all", "wait_ready",
           "fsync_folder", "TemporaryFolder", "ScratchFile", "replacement_for",
           "held_exclusively"]

#: permissions of files written here unless the caller says otherwise
DEFAULT_MODE = 0o600

#: ``O_TMPFILE`` where the platform has it (0 turns unnamed files off: the named fallback)
_TMPFILE = getattr(os, "O_TMPFILE", 0)
#: where an unnamed file has a name that opens it (``/proc/self/fd/N``)
_PROC_FD = "/proc/self/fd"
#: errors with which a file system says it has no ``O_TMPFILE`` (old kernels: EISDIR)
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP)


class OutputExists(FileExistsError):
    """The destination appeared while the file was being written, and ``overwrite`` was off."""

    def __init__(self, path: str):
        super().__init__(errno.EEXIST, "output exists", path)


def write_all(file: Any, data: Any) -> None:
    """Write every byte of ``data`` to ``file``, looping over a raw file's partial writes
    and waiting where a non-blocking one would block."""
    view = memoryview(data)
    while len(view):
        n = file.write(view)
        if n is None:
            if not _may_block(file):  # buffered writers, objects that return nothing, and a
                return                # raw file over a blocking descriptor wrote everything
            wait_ready(file, writing=True)  # nothing written: it would block (or it says)
            continue
        if n >= len(view):
            return
        view = view[n:]


def _may_block(file: Any) -> bool:
    """Whether None from ``file.write()`` may mean "would block, nothing written", as a raw
    file's does: not for buffered writers and other objects (which return nothing when
    they wrote everything), nor over a blocking descriptor. A raw file without one could
    mean either: :func:`wait_ready` then refuses, saying so, rather than lose data."""
    if not isinstance(file, io.RawIOBase):
        return False
    try:
        return not os.get_blocking(file.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True


def wait_ready(file: Any, writing: bool) -> None:
    """Block until the non-blocking ``file`` can be read (or written), after a read or
    write of it returned None ("would block"): without this its data would be taken as
    ended or as written. BlockingIOError when it has no descriptor to wait on."""
    try:
        fd = file.fileno()
    except (AttributeError, OSError, ValueError):
        side = "output" if writing else "input"
        call = "write() returned None" if writing else "read returned None"
        raise BlockingIOError(errno.EAGAIN, f"the {side}'s {call}, which a raw file means as "
                              f"'would block', and it has no file descriptor to wait on: give "
                              f"a blocking file object as the {side} (a raw file's "
                              f"{'write() returns' if writing else 'reads return'} the byte "
                              f"count)") from None
    import select  # here: only non-blocking files need it

    if hasattr(select, "poll"):  # any descriptor number (select() stops at FD_SETSIZE)
        poller = select.poll()
        poller.register(fd, select.POLLOUT if writing else select.POLLIN)
        poller.poll()
    else:
        select.select([] if writing else [fd], [fd] if writing else [], [])


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


# --------------------------------------------------------------------------- temporary files
def _temp_name(folder: str, base: str) -> str:
    return os.path.join(folder, f".{base}.{os.urandom(4).hex()}.gpucrypt-tmp")


def _create_exclusively(folder: str, base: str) -> tuple[int, str]:
    """``mkstemp``'s guarantee without importing ``tempfile`` (a tenth of a small file's
    run): a fresh name ``.BASE.XXXXXXXX.gpucrypt-tmp``, created with O_EXCL (never an
    existing file or a planted link), mode 0600, not inherited by child processes."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temp = _temp_name(folder, base)
        try:
            return os.open(temp, flags, 0o600), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder} after 100 tries")


def _create_unnamed(folder: str) -> int | None:
    """A descriptor of a new unnamed file in ``folder`` (mode 0600), or None where
    ``O_TMPFILE`` cannot be used there or such a file could not be published (the
    caller falls back to a named file)."""
    if not _TMPFILE:
        return None
    try:
        fd = os.open(folder, _TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE:
            return None
        raise
    try:
        if _linker_for(folder) is None:
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    return fd


_AT_FDCWD, _AT_EMPTY_PATH = -100, 0x1000  # Linux's values


def _link_empty_path(fd: int, path: str) -> None:
    """``linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH)``: allowed to the file's opener
    since Linux 6.10, to CAP_DAC_READ_SEARCH before. Through ctypes: only where /proc is
    not mounted (:func:`_link_proc` needs none)."""
    import ctypes  # only here: ctypes is about 7 million instructions of a small file's run

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", _AT_FDCWD, os.fsencode(path), _AT_EMPTY_PATH) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def _link_proc(fd: int, path: str) -> None:
    """``linkat(fd, "/proc/self/fd/N", AT_FDCWD, path, AT_SYMLINK_FOLLOW)``: the magic
    link followed to the unnamed file (open(2)'s O_TMPFILE example). ``src_dir_fd`` is
    what makes CPython call ``linkat`` with AT_SYMLINK_FOLLOW: with the default one it
    calls ``link``, which links the /proc symlink itself and fails (EXDEV). The path is
    absolute, so the kernel ignores which descriptor that is."""
    os.link(os.path.join(_PROC_FD, str(fd)), path, src_dir_fd=fd, follow_symlinks=True)


#: folder -> the way an unnamed file is linked in there, None for no way
_LINKERS: dict[str, Callable[[int, str], None] | None] = {}


def _linker_for(folder: str) -> Callable[[int, str], None] | None:
    """How to publish unnamed files in ``folder`` (found once per process and folder by
    linking a throwaway one: an unnamed file can be linked only once, so a way that
    failed only at the end would leave a finished file without a name; mounts, bind
    mounts included, decide, so the folder is the unit)."""
    if folder in _LINKERS:
        return _LINKERS[folder]
    probe = os.open(folder, _TMPFILE | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    found = None
    try:
        for linker in (_link_proc, _link_empty_path):  # the first needs no ctypes
            name = _temp_name(folder, "probe")
            try:
                linker(probe, name)
            except (OSError, AttributeError):  # AttributeError: no libc through ctypes
                continue
            _remove(name)
            found = linker
            break
    finally:
        os.close(probe)
    _LINKERS[folder] = found
    return found


def _set_mode(fd: int, mode: int) -> None:
    """``mode`` exactly (creation modes pass through the umask)."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def _remove(temp: str) -> None:
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- signal cleanup
#: named temporary files and folders alive now, removed by the signal handler: path ->
#: True for a folder (its whole tree goes), False for a file
_LIVE: dict[str, bool] = {}
_LIVE_LOCK = _thread.allocate_lock()  # threading.Lock, without importing threading
#: signals our handler is installed for (each had the default action before)
_HANDLED: set[int] = set()


def _cleanup_signals() -> list[int]:
    # signal (its enums: about a millisecond) is imported where a named temporary file
    # or folder needs it, not by every small file's run (an unnamed file needs no
    # handler until it is linked beside its destination to replace it)
    import signal

    names = ("SIGTERM", "SIGHUP", "SIGPIPE")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def _on_signal(signum: int, frame: Any) -> None:
    """Remove every named temporary file and folder, then die of the signal as the
    default would."""
    import signal

    for temp, tree in list(_LIVE.items()):
        try:
            if tree:
                # shutil was imported by _track (an import here, inside a handler that may
                # interrupt another import, could wait on that import's lock)
                import shutil

                shutil.rmtree(temp, ignore_errors=True)
            else:
                os.unlink(temp)
        except OSError:
            pass
    _LIVE.clear()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _track(temp: str, tree: bool = False) -> None:
    """Remember ``temp`` for the signal handler, installing it (main thread only, and only
    over a default action: a program's own handlers are left alone). ``tree``: ``temp``
    is a folder, removed with everything in it."""
    import threading  # here: only named temporary files and names need it

    if tree:
        import shutil  # noqa: F401  (now, not in the handler: see _on_signal)

    with _LIVE_LOCK:
        _LIVE[temp] = tree
        if threading.current_thread() is not threading.main_thread():
            return
        import signal

        for signum in _cleanup_signals():
            if signum not in _HANDLED and signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _on_signal)
                _HANDLED.add(signum)


def _untrack(temp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(temp, None)
        if _LIVE or not _HANDLED:
            return
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        for signum in list(_HANDLED):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, signal.SIG_DFL)
            _HANDLED.discard(signum)


class TemporaryFolder:
    """A new empty folder ``.NAME.XXXXXXXX.gpucrypt-tmp`` (mode 0700) beside ``dst``, for
    filling and then renaming to ``dst``: the way a folder of files appears complete or
    not at all (:mod:`gpucrypt.files.checkpoints`).

    ``with TemporaryFolder(dst) as temp:`` gives its path. Whatever is still at that
    path when the block ends (normally or by an exception, KeyboardInterrupt included)
    is removed with its whole tree, so the block renames the folder into place before
    it ends. While the block runs, SIGTERM, SIGHUP and SIGPIPE remove the tree before
    the process dies, under the conditions of the module docstring (default actions,
    main thread): the files put in it (decrypted weights, say) are named, unlike an
    unnamed file's data. SIGKILL, a crash or a power cut can leave the folder behind:
    it is safe to delete. The removal runs to its end even if Ctrl-C is pressed again
    meanwhile (that Ctrl-C is raised once it is done); should part of the tree resist
    it, a ``UserWarning`` names the folder. An error making the folder names ``dst``.
    """

    def __init__(self, dst: str | os.PathLike):
        dst = os.path.abspath(os.fspath(dst))
        self._dst = dst
        self._parent, self._base = os.path.dirname(dst), os.path.basename(dst)
        self.path: str | None = None

    def __enter__(self) -> str:
        for _ in range(100):
            temp = _temp_name(self._parent, self._base)
            # tracked before it exists, so that no signal finds it untracked; should
            # the name be taken (32 random bits), a signal in these few microseconds
            # would remove that other gpucrypt temporary: far the smaller risk
            _track(temp, tree=True)
            try:
                os.mkdir(temp, 0o700)
            except FileExistsError:
                _untrack(temp)
                continue
            except OSError as exc:  # not made (a read-only or missing folder): said of dst
                _untrack(temp)
                raise _naming(exc, self._dst) from None
            except BaseException:  # KeyboardInterrupt may come as mkdir returns, made
                try:
                    os.rmdir(temp)  # empty: ours, as a taken name raised FileExistsError
                except OSError:
                    pass
                finally:
                    _untrack(temp)
                raise
            self.path = temp
            return temp
        raise FileExistsError(f"no free temporary name in {self._parent} after 100 tries")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path is not None:
            from .._interrupts import uninterrupted

            # a second Ctrl-C (pressed as the first one's clean-up seemed slow: unlinking
            # large shards takes a while) cut rmtree short and left the folder, decrypted
            # files included, untracked: held until the tree is gone
            uninterrupted(self._remove)

    def _remove(self) -> None:
        import shutil

        path = self.path
        shutil.rmtree(path, ignore_errors=True)  # nothing there once renamed
        _untrack(path)
        self.path = None
        if os.path.lexists(path):
            import warnings

            warnings.warn(f"the temporary folder {path} could not be removed whole; it may "
                          f"hold decrypted files: delete it by hand",
                          stacklevel=_outside_gpucrypt())


def _naming(exc: OSError, path: str, strerror: str | None = None) -> OSError:
    """``exc`` about ``path`` (the user's destination), not a temporary file or folder
    (``strerror``, if given, in place of its own). Of ``exc``'s class where that class
    is made as OSError is (errno, strerror, filename), else a plain ``OSError`` of the
    same errno (which picks the subclass: FileExistsError for EEXIST)."""
    args = (exc.errno, exc.strerror if strerror is None else strerror, path)
    try:
        return type(exc)(*args)
    except TypeError:  # OutputExists(path), an error class of a caller's own
        return OSError(*args)


def _written(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``OSError`` naming no file that a write raised: one raised
    inside :func:`write_all` or :func:`gpucrypt.pipeline.pwrite_all` (the positional
    writes of the library's workers, which go to a descriptor and so name no file). Not
    told by its errno: a read of the source can fail with ENOSPC too (a source caching
    what it reads onto a full disk), and it is IN's. An audit event that could not be
    written is the log's error, never the output's."""
    if not isinstance(exc, OSError) or exc.filename is not None:
        return False
    audit = sys.modules.get("gpucrypt.audit")
    if audit is not None and isinstance(exc, audit.AuditLogError):
        return False
    pipeline = sys.modules.get("gpucrypt.pipeline")
    writers = {write_all.__code__} | ({pipeline.pwrite_all.__code__} if pipeline else set())
    tb = exc.__traceback__
    while tb is not None:  # raised in (or below) one of the writes to the unpublished file
        if tb.tb_frame.f_code in writers:
            return True
        tb = tb.tb_next
    return False


def _name_written(exc: BaseException, path: str) -> None:
    """Give ``exc`` the name ``path`` if it is a write's error naming no file
    (:func:`_written`): the same exception goes on, its type and traceback kept."""
    if _written(exc):
        exc.filename = path


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>
_SYNC_FILE_RANGE: list = []  # [the libc function or None], looked up once


def _sync_file_range():
    """libc's ``sync_file_range`` (Linux; Python's os module has no binding), or None."""
    if not _SYNC_FILE_RANGE:
        function = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                function.restype = ctypes.c_int
            except (ImportError, OSError, AttributeError):
                function = None
        _SYNC_FILE_RANGE.append(function)
    return _SYNC_FILE_RANGE[0]


# --------------------------------------------------------------------------- AtomicFile
class AtomicFile:
    """A file at ``path`` that appears complete or not at all (see the module docstring).

    ``write(data)`` appends to the unpublished file; ``commit()`` fsyncs it and publishes
    it at ``path``; ``abort()`` drops it (both are idempotent once done). As a context
    manager it commits when the block ends normally and aborts when it raises.
    ``overwrite=False``: ``commit`` raises :class:`OutputExists` (a ``FileExistsError``)
    when ``path`` exists by then, and the file is dropped. Errors (``OSError``) name
    ``path``.
    """

    def __init__(self, path: str | os.PathLike, mode: int = DEFAULT_MODE, *,
                 overwrite: bool = True):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self._folder = os.path.dirname(os.path.abspath(self.path))
        self._temp: str | None = None  # the temporary file's name; None when unnamed
        # the name an unnamed file is being linked to beside the destination (to replace
        # it), from before the link until it is renamed: what abort() removes if it is
        # still this file's (see _name_beside)
        self._beside: str | None = None
        if os.path.islink(self.path):
            # publishing renames over the link itself: its target would keep the old data
            # while the user believes it replaced; writing through instead would let a
            # planted link choose where the data go. Refused, with what to do.
            raise OSError(errno.ELOOP, f"it is a symbolic link (to "
                          f"{os.readlink(self.path)}); gpucrypt does not write through "
                          f"links: give the file it points to as the output, or remove "
                          f"the link first", self.path)
        if os.path.isdir(self.path):  # found only at publishing otherwise, after the work,
            # as "Device or resource busy" ('.') or "Not a directory" ('out/')
            raise IsADirectoryError(errno.EISDIR, "it is a folder: give the output file's own "
                                    "path (a name inside that folder, say)", self.path)
        try:
            existing = os.stat(self.path).st_mode
        except OSError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing):
            # a file renamed over a device or a FIFO replaces the node: as root,
            # stream.decrypt(src, "/dev/null", key) put the plaintext where /dev/null was
            # (not EEXIST: FileExistsError reads as "exists: overwrite it", which is the harm)
            raise OSError(errno.EINVAL, f"it is a {file_kind(existing)}, which a new file "
                          f"would replace: give a regular file's path (gpucrypt.stream's "
                          f"functions also write to such a node in place, as a stream)",
                          self.path)
        self._create(mode)

    def _create(self, mode: int) -> None:
        """Make the unpublished file in ``self._folder``, with permissions ``mode``."""
        try:
            fd = _create_unnamed(self._folder)
            if fd is None:
                fd, self._temp = _create_exclusively(self._folder, os.path.basename(self.path))
                _track(self._temp)
        except OSError as exc:
            raise _naming(exc, self.path) from None
        self._file = open(fd, "wb", buffering=0)
        self._open = True
        try:
            if mode != 0o600 or self._temp is None:
                _set_mode(fd, mode)
        except BaseException:
            self.abort()
            raise

    @property
    def unnamed(self) -> bool:
        """True when the data go to an unnamed (``O_TMPFILE``) file."""
        return self._temp is None

    def write(self, data: Any) -> None:
        try:
            write_all(self._file, data)
        except OSError as exc:
            if exc.filename is None:  # the unpublished file's: named as the destination
                exc.filename = self.path
            raise

    def fileno(self) -> int:
        """The unpublished file's descriptor, for positional writes (``os.pwrite``) from
        several threads at once; the file's size is whatever they reach. A write error
        of theirs leaving the ``with`` block is named as the destination (see
        :meth:`__exit__`)."""
        return self._file.fileno()

    def start_writeback(self, offset: int, length: int) -> None:
        """Have the kernel start writing ``length`` bytes from ``offset`` (written already)
        to disk now, without waiting (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``;
        elsewhere nothing). A large file written in pieces is then mostly on disk when
        :meth:`commit` fsyncs it, which otherwise waits for every byte at once."""
        start = _sync_file_range()
        if start is not None and length > 0:
            start(self._file.fileno(), offset, length, _SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored

    def writable_name(self) -> str:
        """A name that opens the unpublished file (for writers that only take a name):
        ``/proc/self/fd/N`` for an unnamed file, else the temporary file's name.

        Without ``/proc`` (unnamed files are then linked with ``AT_EMPTY_PATH``) an
        unnamed file has no such name: it is linked to a named temporary file beside
        the destination, and is from then on a named one (its data kept, removed on
        abort and by the signals of the module docstring)."""
        if self._temp is None:
            proc = os.path.join(_PROC_FD, str(self._file.fileno()))
            if os.path.exists(proc):
                return proc
            try:
                name = self._name_beside()
            except OSError as exc:
                raise _naming(exc, self.path) from None
            self._temp, self._beside = name, None  # tracked: _forget_temp untracks it
        return self._temp

    def _link_to(self, path: str) -> None:
        """Give the file the name ``path`` (FileExistsError if it is taken)."""
        if self._temp is not None:
            os.link(self._temp, path)
        else:
            _LINKERS[self._folder](self._file.fileno(), path)

    def commit(self) -> None:
        if not self._open:
            return
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as exc:  # the unpublished file's (delayed allocation: ENOSPC)
                if exc.filename is None:
                    exc.filename = self.path
                raise
            self._publish()
        except BaseException:
            self.abort()  # no temporary file (of plaintext, on decryption) stays behind
            raise
        self._close()
        fsync_folder(self._folder)

    def _publish(self) -> None:
        try:
            if not self.overwrite:
                self._link(self.path)
            elif self._temp is not None:
                os.replace(self._temp, self.path)
                self._forget_temp()
            else:  # an unnamed file cannot be renamed: link it beside, then rename that
                os.replace(self._name_beside(), self.path)
                self._drop_beside()  # renamed: nothing left there to remove
        except OutputExists:
            raise
        except OSError as exc:
            raise _naming(exc, self.path) from None

    def _link(self, path: str) -> None:
        """Publish the file at ``path`` unless ``path`` exists (a hard link cannot
        replace a file: the no-overwrite check and the publishing are one step)."""
        try:
            self._link_to(path)
        except FileExistsError:
            raise OutputExists(path) from None
        except OSError as exc:
            if self._temp is None or exc.errno not in (errno.EPERM, errno.ENOTSUP,
                                                       errno.EOPNOTSUPP):
                raise
            # a file system without hard links: check, then rename (a narrow race remains)
            if os.path.lexists(path):
                raise OutputExists(path) from None
            os.rename(self._temp, path)
        if self._temp is not None:
            _remove(self._temp)
            self._forget_temp()

    def _name_beside(self) -> str:
        """Link the unnamed file to a fresh ``.NAME.XXXXXXXX.gpucrypt-tmp`` beside ``path``
        and return that name, tracked for the signal handler (the caller untracks it):
        the name holds the whole file, plaintext when decrypting. It is tracked before
        the link exists, so that no signal finds it untracked; should the name be taken
        (32 random bits), a signal in those microseconds would remove that other
        gpucrypt temporary file: far the smaller risk."""
        for _ in range(100):
            temp = self._beside = _temp_name(self._folder, os.path.basename(self.path))
            _track(temp)
            try:
                self._link_to(temp)
                return temp
            except FileExistsError:
                self._beside = None  # someone else's name: not ours to remove
                _untrack(temp)
                continue
            # any other exception (KeyboardInterrupt from Ctrl-C included, which may come
            # as the link returns, the name already made) leaves self._beside set: the
            # caller's abort() removes it if it is this file
        raise FileExistsError(f"no free temporary name in {self._folder} after 100 tries")

    def _drop_beside(self) -> None:
        """Remove the name beside the destination if it still holds this file (same
        inode: a name taken by someone else meanwhile stays), and forget it. Called
        while the file is open (its inode is the test)."""
        temp, self._beside = self._beside, None
        if temp is None:
            return
        try:
            held, there = os.fstat(self._file.fileno()), os.lstat(temp)
            if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                os.unlink(temp)
        except OSError:
            pass  # gone (renamed into place, or never made)
        finally:
            _untrack(temp)

    def _forget_temp(self) -> None:
        if self._temp is not None:
            _untrack(self._temp)
            self._temp = None

    def _close(self) -> None:
        self._open = False
        self._file.close()

    def abort(self) -> None:
        if not self._open:
            return
        from .._interrupts import uninterrupted

        # a Ctrl-C pressed again (the first one's clean-up is this) could stop it between
        # closing the file and removing its name: held until the name is gone
        uninterrupted(self._drop)

    def _drop(self) -> None:
        try:
            self._drop_beside()  # while the file is open: its inode says which name is its
        finally:
            self._close()
            if self._temp is not None:
                _remove(self._temp)
                self._forget_temp()

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        # a positional write to fileno() that failed (the library's workers: pwrite) names
        # no file: it is this file's, so it is named as the destination
        _name_written(exc, self.path)
        self.abort()


class ScratchFile(AtomicFile):
    """A file filled as an :class:`AtomicFile` is, then read back and dropped, never
    published: where work must be whole and verified before any of it goes out, and its
    writer puts the bytes out of order (``gpucrypt decrypt-model`` to a FIFO: a
    safetensors file, filled by :func:`gpucrypt.models.export_safetensors` as it would
    fill a destination, then sent in order).

    It is made in ``folder`` as an AtomicFile is in its destination's folder: on Linux an
    unnamed file (``O_TMPFILE``), which no signal, not even SIGKILL, leaves behind (the
    kernel frees it with its last descriptor). Where that is missing, a named temporary
    file ``.NAME.XXXXXXXX.gpucrypt-tmp``, and where ``/proc`` is missing a writer's name
    (:meth:`writable_name`) links the unnamed file to one: while it is filled that name is
    removed by SIGTERM and SIGHUP, and SIGKILL can leave it (the module docstring's
    conditions); :meth:`commit` removes it, so that the file has no name while it is read
    back (sent to a FIFO whose reader may take its time). ``commit()`` (the end of a
    ``with`` block, of ``write_atomically_with``) publishes nothing and keeps the file
    open for reading through :meth:`fileno`; :meth:`abort` closes it, which frees it.
    Errors name ``path``: ``folder``/``name``, a name never made.
    """

    def __init__(self, folder: str | os.PathLike, name: str):
        self.path = os.path.join(os.fspath(folder), name)
        self.overwrite = False
        self._folder = os.path.abspath(os.fspath(folder))
        self._temp: str | None = None
        self._beside: str | None = None
        self._create(DEFAULT_MODE)

    def commit(self) -> None:
        """Nothing is published: a name the file has is removed (the file stays open,
        whole, for reading; :meth:`abort` drops it)."""
        if self._open and self._temp is not None:
            from .._interrupts import uninterrupted

            uninterrupted(self._unname)

    def _unname(self) -> None:
        _remove(self._temp)
        self._forget_temp()


class FileObjectOutput:
    """A caller's writable binary file object behind :class:`AtomicFile`'s interface.

    ``commit()`` flushes it; ``abort()`` does nothing (what was written stays: the
    caller owns the object). Neither closes it.
    """

    def __init__(self, fileobj: Any):
        self._file = fileobj

    def write(self, data: Any) -> None:
        write_all(self._file, data)

    def room(self, nbytes: int) -> memoryview | None:
        """For an ``io.BytesIO``: the next ``nbytes`` of its own buffer, as if written
        (the position moves past them), for the caller to fill in place: no staging
        buffer and no copy. Every view of it must be gone before the object is used
        again (it cannot grow while its buffer is exported). None for other objects."""
        if type(self._file) is not io.BytesIO or nbytes <= 0:
            return None
        start = self._file.tell()
        self._file.seek(start + nbytes - 1)
        self._file.write(b"\0")  # grows the buffer once, to its final size
        return self._file.getbuffer()[start:start + nbytes]

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


class _StreamedPath(FileObjectOutput):
    """A FIFO or a character device named by path (``/dev/null``), written in place as a
    stream, as stdout is; closed when the work ends."""

    def __init__(self, path: Any):
        super().__init__(open(open_streamed(path), "wb", buffering=0))

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        self._file.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()  # flushed: unbuffered


def open_streamed(path: Any) -> int:
    """A descriptor writing to the FIFO or character device at ``path`` (a symbolic link
    followed, as :func:`streamed_path` follows it), opened without ``O_CREAT`` or
    ``O_TRUNC`` and checked once open: a regular file swapped in at ``path`` after the
    check that chose to stream there is refused (``OSError`` naming ``path``), where an
    ``open(path, "wb")`` truncated it and wrote through (decrypt's plaintext, into any
    file the user may write). A FIFO's open waits here for its reader."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise OSError(errno.EINVAL, f"it became a {file_kind(mode)} while gpucrypt ran "
                          f"(it was a FIFO or a device): nothing was written to it",
                          os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def streamed_path(path: Any) -> bool:
    """Whether ``path`` exists and is a FIFO or a character device (a symbolic link
    followed: ``/dev/stdout``): written in place as a stream, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words, for messages."""
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return kind
    return "special file"


def regular_size(where: Any) -> int | None:
    """The size of the regular file at ``where`` (a path, or an open file's descriptor),
    else None: a FIFO's or a device's ``st_size`` (0) says nothing of what passes through
    it, and a path that cannot be stat'ed has none to tell."""
    try:
        st = os.fstat(where) if isinstance(where, int) else os.stat(where)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def open_regular(path: Any, not_regular: Callable[[str], Exception], buffering: int = -1,
                 block_devices: bool = False):
    """``path`` opened for reading when it is a regular file (or, with ``block_devices``, a
    block device: seekable, with a size), else ``not_regular(kind)`` raised (kind in
    words: "FIFO", "character device", ...). What is read is what was
    opened, so a FIFO or device put in a checked file's place later is refused too.
    ``O_NONBLOCK``: a FIFO's open would otherwise wait for a writer forever, before any
    check could see it. A file another process holds a lease on (Samba, an NFS server)
    answers such an open EWOULDBLOCK at once, where a blocking open waits for the lease to
    break: it is tried again for as long as the kernel gives a lease holder
    (``/proc/sys/fs/lease-break-time``), as the blocking open would have waited."""
    import time

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    deadline = None
    while True:
        try:
            fd = os.open(path, flags)
            break
        except BlockingIOError:  # a lease being broken (never a FIFO: its open returns)
            now = time.monotonic()
            deadline = deadline or now + _lease_break_seconds()
            if now >= deadline:
                raise
            time.sleep(0.05)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or block_devices and stat.S_ISBLK(mode)):
            raise not_regular(file_kind(mode))
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)  # (no effect on a regular file: the usual flags back)
        return open(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


#: (st_dev, st_ino) of the files this thread holds under :func:`held_exclusively`
_HOLDING = _thread._local()


@contextlib.contextmanager
def held_exclusively(path: Any, not_regular: Callable[[str], Exception], *,
                     required_as: Any = None) -> Iterator[Any]:
    """The regular file at ``path`` opened for reading (:func:`open_regular`) and held under
    an exclusive ``flock`` until the block ends: how a read-modify-write of a file that
    ends in a rename over it (a keyset's save, a file's rekey, a header rewritten) excludes
    another one of gpucrypt's, which would otherwise publish a copy of the version both
    read and undo the first one's change. Yields ``None``, holding nothing, when there is
    no file, or with ``required_as`` (the path as the caller was given it) raises
    ``FileNotFoundError`` naming that.

    The lock is the file's own, not a lock file's: nothing is left behind and only read
    access is needed. A writer that waited on the old file, replaced meanwhile, locks the
    file now at ``path`` instead (and reads that one), so waiting serialises the whole
    change. Held again by the thread holding it (a rekey rewriting the header), the file
    is opened anew and not locked a second time: a flock of a second open of it would wait
    for this thread forever. The wait has no end: another program holding a flock on the
    file (``flock(1)``, a backup tool) holds the change up until it lets go. Where
    ``flock`` is missing (not POSIX) or refused, the file is yielded unlocked: some network
    file systems (NFS emulates flock with POSIX locks, which a file opened read-only
    cannot take) serialise nothing then."""
    held = getattr(_HOLDING, "files", None)
    if held is None:
        held = _HOLDING.files = set()
    while True:
        gone = False
        try:
            f = open_regular(path, not_regular)
        except FileNotFoundError:
            gone = True  # (yielded outside the except: a caller's error would chain it)
        if gone:
            if required_as is not None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                        os.fspath(required_as))
            yield None
            return
        with f:
            first = os.fstat(f.fileno())
            if (first.st_dev, first.st_ino) in held:  # this thread's own hold, outside
                yield f
                return
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when f is closed
                except OSError:
                    pass  # no locks on this file system
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (first.st_dev, first.st_ino):
                continue  # replaced (or removed) while we waited: lock what is there now
            held.add((first.st_dev, first.st_ino))
            try:
                yield f
            finally:
                held.discard((first.st_dev, first.st_ino))
            return


def _lease_break_seconds() -> float:
    """How long the kernel lets a lease holder take to let go (45 s by default)."""
    try:
        with open("/proc/sys/fs/lease-break-time") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 45.0


def open_output(dst: Any, mode: int = DEFAULT_MODE) -> AtomicFile | FileObjectOutput:
    """An :class:`AtomicFile` for a path (str or PathLike), or for a path that is a FIFO
    or a character device a stream written in place (:func:`streamed_path`); ``dst``
    itself when it is an AtomicFile (the caller chose its options; it is committed or
    aborted with the work); else ``dst`` wrapped as a :class:`FileObjectOutput`;
    TypeError if it is neither a path nor writable."""
    if isinstance(dst, AtomicFile):
        return dst
    if isinstance(dst, io.TextIOBase):  # its write() takes str only
        raise TypeError("dst is a text file: open it in binary mode ('wb')")
    if isinstance(dst, (str, os.PathLike)):
        if streamed_path(dst):
            return _StreamedPath(dst)
        return AtomicFile(dst, mode)
    if hasattr(dst, "write"):
        return FileObjectOutput(dst)
    raise TypeError(f"dst must be a path or a writable binary file object, "
                    f"not {type(dst).__name__}")


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = DEFAULT_MODE) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode``."""
    with AtomicFile(path, mode) as f:
        f.write(data)


def write_atomically_with(path: str | os.PathLike | AtomicFile, write: Callable[[str], None],
                          mode: int = DEFAULT_MODE) -> None:
    """Atomically create ``path`` (or publish an :class:`AtomicFile` of the caller's) with
    a writer that only takes a file name (a library's ``save_file(..., filename)``):
    ``write(name)`` fills the unpublished file through ``name``, which is then fsynced
    and published. ``write`` must write to that name in place (open it for writing; not
    replace or rename it)."""
    target = path if isinstance(path, AtomicFile) else AtomicFile(path, mode)
    with target:
        write(target.writable_name())


def replacement_for(target: str) -> AtomicFile:
    """The unpublished file that will replace the regular file ``target`` (a resolved path),
    with its permission bits, its extended attributes (POSIX ACLs, user attributes) and,
    as far as this process may set them, its owner and group, so that a shared group's
    members keep their access (a new file has the rewriting user's group). Nothing more: an ACL
    the new file took from its folder's default ACL, which the old file did not have, is
    removed (with the old group bits as its mask, it gave users the old file did not).
    Set-user-ID and set-group-ID are dropped: a rewritten file is new data (the kernel
    clears them at a write by anyone without CAP_FSETID anyway), and for a file whose
    owner could not be kept they would have made it the rewriter's own, set-user-ID.
    Other hard links to ``target`` keep the old file, whatever it held (an envelope with
    a revoked recipient's stanza, data under a revoked key): a ``UserWarning`` says so,
    at the first caller outside gpucrypt, as the links cannot be found to be rewritten
    too."""
    old = os.stat(target)
    if old.st_nlink > 1:
        import warnings

        warnings.warn(f"{target} has {old.st_nlink - 1} other hard link(s): they keep the old "
                      f"file, with its old header and data, and only this name gets the new "
                      f"one; remove the other links (find them with 'find / -samefile "
                      f"{target}') if the old file must not remain", stacklevel=_outside_gpucrypt())
    mode = old.st_mode & 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)
    sink = AtomicFile(target, mode=mode)
    try:
        fd = sink.fileno()
        _keep_owner(fd, old)
        _copy_extended_attributes(target, fd)  # after the chown: ACLs name users
        os.fchmod(fd, mode)  # last: the ACL's mask is the old group bits again
    except BaseException:
        sink.abort()
        raise
    return sink


def _outside_gpucrypt() -> int:
    """The ``stacklevel`` that points a warning issued by this function's caller at the
    first frame outside the gpucrypt package (the user's call, however deep inside
    gpucrypt the warning is raised)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(1), 1  # 1: the caller, which warns
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _copy_extended_attributes(target: str, fd: int) -> None:
    """Give the file ``fd`` exactly ``target``'s extended attributes, as far as this process
    may: each of ``target``'s copied (a POSIX ACL that gave another user access,
    ``user.*``), and each the new file has that ``target`` lacks removed (an access ACL
    inherited from the folder's default ACL). One it may not set or remove (a
    ``security.*`` label, a file system without them) is left, as ``cp -p`` leaves it."""
    try:
        names = os.listxattr(target)
        present = os.listxattr(fd)
    except (OSError, AttributeError):  # none here, or no such call on this platform
        return
    for name in names:
        try:
            os.setxattr(fd, name, os.getxattr(target, name))
        except OSError:
            continue
    for name in set(present) - set(names):
        try:
            os.removexattr(fd, name)
        except OSError:
            continue


def _keep_owner(fd: int, old: os.stat_result) -> None:
    """Give the file ``fd`` the owner and group of ``old`` where this process may: both
    (root, CAP_CHOWN), else the group (one this user is in), else neither. Any refusal is
    taken as "may not": EPERM, and EINVAL for an id a user namespace does not map (a
    rootless container)."""
    me = os.fstat(fd)
    for owner, group in ((old.st_uid, old.st_gid), (-1, old.st_gid)):
        if (me.st_uid == old.st_uid or owner == -1) and me.st_gid == old.st_gid:
            return
        try:
            os.fchown(fd, owner, group)
            return
        except OSError:
            continue


def replace_head(path: str | os.PathLike, f: Any, head: bytes) -> None:
    """Atomically replace the file at ``path`` by ``head`` followed by the rest of ``f`` (the
    same file, open for reading and positioned just after its old head), keeping the
    file's permissions: how a header is rewritten without touching what follows.

    A symbolic link is followed: the file ``f`` was read from is the one rewritten (in its
    own folder), and the link stays a link (replacing the link instead would leave the
    old head, a revoked recipient's envelope say, in the file it points to). The owner and
    group are kept where this process may set them (:func:`replacement_for`)."""
    path = os.path.realpath(path)
    with replacement_for(path) as sink:
        sink.write(head)
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            sink.write(chunk)
