"""Writing files safely: one file, or one directory of files, replaced as a unit.

Every file dpmjax writes (grids, DPM-Solver-v3 statistics, training configs and logs,
pictures) goes through the two functions here:

* :func:`write_file` writes into a temporary file in the target's directory, flushes it
  to disk (``fsync``) and moves it onto the target with ``os.replace``, which POSIX makes
  atomic: a reader, or a later run after a crash, sees the old file or the new one, never
  a mix or a prefix.
* :func:`replace_directory` writes a set of files that belong together (``l.npz``,
  ``sb.npz`` and ``lambdas.npy``) into a new directory beside the target and renames it
  into place, so the set changes as one unit. On Linux an existing target is swapped
  with ``renameat2(RENAME_EXCHANGE)`` (one atomic step); elsewhere it is moved aside
  first, so a crash between the two renames leaves the target missing (the old set
  waits under a hidden ``.NAME.old-*`` name beside it), never a mix of two sets.

New files get the permissions the user's umask gives ordinary files (``0o666 & ~umask``,
e.g. 0644 under umask 022, 0600 under 077), new directories ``0o777 & ~umask``: the same
as ``open(path, "w")`` and ``mkdir`` would give, not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from typing import BinaryIO, Callable, Iterable, Mapping

Writer = Callable[[BinaryIO], None]


def umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new ordinary file under the current umask."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """Permissions of a new directory under the current umask."""
    return 0o777 & ~umask()


def _fsync_dir(path: str) -> None:
    """Flush a directory's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(path: str, write: Writer) -> None:
    """Create ``path`` (it must not exist), fill it through ``write(binary_file)`` and fsync it."""
    with open(path, "xb") as f:  # created with 0o666 & ~umask, like any new file
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _named(e: BaseException, path: str) -> BaseException:
    """An OSError without a file name gets the target's (not the temporary file's) name."""
    if isinstance(e, OSError) and e.errno and not e.filename:
        return OSError(e.errno, f"{e.strerror or e} (nothing was replaced)", path)
    return e


def write_file(path: str | os.PathLike, write: Writer) -> str:
    """Replace the file ``path`` atomically with what ``write(binary_file)`` writes.

    ``write`` receives a binary file open on a fresh temporary file in ``path``'s
    directory; when it returns, the file is flushed to disk and moved onto ``path``. If
    ``write`` (or anything else) fails, the temporary file is removed and ``path`` is left
    as it was. A symbolic link named as ``path`` is followed: the file it points to is
    replaced and the link stays. The directory must exist. Returns the path written (the
    link's target for a link).

    Example::

        write_file("grid.json", lambda f: f.write(text.encode("utf-8")))
    """
    path = os.path.realpath(os.fspath(path))
    directory, name = os.path.split(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory; give a file name", path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    except OSError as e:  # the directory is missing or not writable: say so about the target
        raise OSError(e.errno, f"{e.strerror}: cannot create a file in {directory!r} (nothing was written)",
                      path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        named = _named(e, path)
        if named is not e:
            raise named from e
        raise
    _fsync_dir(directory)
    return path


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # an old kernel, or a file system without the exchange
    raise OSError(err, os.strerror(err), b)


def replace_directory(target: str | os.PathLike, files: Mapping[str, Writer], *,
                      owned: Iterable[str] = (), what: str = "directory") -> str:
    """Write the files ``{name: write(binary_file)}`` as the directory ``target``, as one unit.

    The files are written (and flushed to disk) into a new hidden directory beside
    ``target``, which is then renamed to ``target``: readers see the complete old set or
    the complete new set. A failure while writing removes the new directory and leaves
    ``target`` as it was.

    ``target`` may be missing (its parent directories are created), or an existing
    directory holding only files of the set (``files``' names and the names in ``owned``,
    e.g. files of an older layout): it is replaced and its old files deleted. Anything
    else is refused with ``ValueError`` before anything is written, so nothing the set
    does not own is ever deleted: a file (not a directory), or a directory with other
    entries. A symbolic link to a directory is followed (the directory it names is
    replaced, the link stays). The new directory keeps an existing target's permissions;
    a new one gets ``0o777 & ~umask``. ``what`` names the directory in messages. Returns
    the path written.
    """
    target = os.path.realpath(os.fspath(target))
    names = set(files)
    for name in names:
        if not name or os.sep in name or name in (".", "..") or name.startswith("."):
            raise ValueError(f"{name!r} is not a plain file name")
    mode = dir_mode()
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"{what} {target} exists and is not a directory; give a directory name")
        foreign = sorted(set(os.listdir(target)) - names - set(owned))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ValueError(f"{what} {target} holds other entries ({shown}); not replacing it: "
                             "give a new or empty directory")
        mode = stat.S_IMODE(os.stat(target).st_mode)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        for file_name, write in files.items():
            _write_new(os.path.join(new, file_name), write)
        os.chmod(new, mode)
        _fsync_dir(new)
        if not os.path.lexists(target):
            os.rename(new, target)
            new = None
        elif _exchange(new, target):  # `new` now holds the old set
            pass
        else:
            aside = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old-")
            os.rename(target, os.path.join(aside, "old"))
            os.rename(new, target)
            shutil.rmtree(aside)
            new = None
    except BaseException as e:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        named = _named(e, target)
        if named is not e:
            raise named from e
        raise
    if new is not None:  # the old set, swapped out
        shutil.rmtree(new, ignore_errors=True)
    _fsync_dir(parent)
    return target
