"""Output paths of the command line, checked before any work is done.

The writing itself is :mod:`dpmjax._files`: every file goes to a temporary file in the
same directory, which then replaces the target with ``os.replace`` (atomic on POSIX), so
a write that fails halfway (a full disk, a file-size limit, Ctrl-C) leaves the previous
file untouched and no partial file behind.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable


class OutputError(ValueError):
    """An output path that cannot or must not be written."""


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output_file(path: str, *, flag: str = "--out", explicit: bool = True,
                      protected: Iterable[str] = ()) -> str:
    """Validate an output file path before any work is done; returns its absolute path.

    Refuses (``OutputError``, naming ``flag``): an empty path; a missing parent directory
    (none is created); a directory, device or other non-regular file; a read-only file;
    a file that exists when the path was not given explicitly (``explicit=False``: a
    default name); and any path inside one of the ``protected`` directories (a run
    directory, whose files belong to the run).
    """
    if not path:
        raise OutputError(f"{flag} must name a file")
    full = os.path.abspath(path)
    for directory in protected:
        if _inside(full, directory):
            raise OutputError(f"{flag} {path} is inside the run directory {os.path.abspath(directory)}; "
                              "its files belong to the run: write elsewhere")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise OutputError(f"{flag} {path}: the directory {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the directory {parent} is not writable")
    if os.path.lexists(full):
        if os.path.isdir(full):
            raise OutputError(f"{flag} {path} is a directory; give a file name")
        st = os.stat(full)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{flag} {path} is not a regular file; not replacing it")
        if not st.st_mode & 0o222:
            raise OutputError(f"{flag} {path} is read-only; not replacing it")
        if not explicit:
            raise OutputError(f"{path} already exists; pass {flag} {path} to replace it, or another name")
    return full


def check_output_dir(path: str, *, flag: str = "--out") -> str:
    """Validate a directory to write into (created later, with its parents, if missing)."""
    if not path:
        raise OutputError(f"{flag} must name a directory")
    full = os.path.abspath(path)
    probe = full
    while not os.path.lexists(probe):  # the nearest existing ancestor must be a writable directory
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = f"{path} is" if probe == full else f"{probe} (a parent of {path}) is"
        raise OutputError(f"{flag} {what} not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the directory {probe} is not writable")
    return full
