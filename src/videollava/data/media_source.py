"""Where media bytes come from, read safely: a path, bytes or a file object, rewound for each reader.

Only regular files are read: a device or a named pipe could never end, so its type is refused
before it is opened. Every failure is a `MediaError` naming the file.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from videollava.errors import MediaError

MediaSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

_OS_PROBLEMS = {
    errno.ENOENT: "file not found (no such file or directory)",
    errno.ENOTDIR: "file not found (a part of the path is not a folder)",
    errno.ELOOP: "cannot open: too many levels of symbolic links (a symlink loop)",
    errno.EACCES: "cannot read: permission denied",
    errno.EPERM: "cannot read: permission denied",
    errno.ENAMETOOLONG: "cannot open: the path is too long",
    errno.EISDIR: "is a directory, not a media file",
}


def _os_problem(error: OSError) -> str:
    return _OS_PROBLEMS.get(error.errno, f"cannot read: {error.strerror or error}")


def _kind_problem(mode: int) -> str | None:
    """Why a file of this type cannot be media (reading a device or a pipe may never end)."""
    for is_kind, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if is_kind(mode):
            return f"is {what}, not a media file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def open_media_file(path: str | os.PathLike, name: str | None = None) -> BinaryIO:
    """Open a local file for reading only if it is a non-empty regular file (symlinks followed).

    The type is checked before opening, so a FIFO or a device is never opened, and again on the
    opened file, so one swapped in between is refused too.
    """
    label = name or os.fspath(path)
    try:
        problem = _kind_problem(os.stat(path).st_mode)
    except ValueError:  # an embedded NUL character
        raise MediaError(label, "invalid path: it contains a NUL character") from None
    except OSError as e:
        raise MediaError(label, _os_problem(e)) from None
    if problem:
        raise MediaError(label, problem)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise MediaError(label, _os_problem(e)) from None
    info = os.fstat(fd)
    problem = _kind_problem(info.st_mode) or ("empty file (0 bytes)" if info.st_size == 0 else None)
    if problem:
        os.close(fd)
        raise MediaError(label, problem)
    return os.fdopen(fd, "rb")


@dataclass
class RewindableSource:
    """A path, or an in-memory file that can be rewound for each reader.

    Recognising the kind of a file and decoding it read it several times (PIL, then PyAV).
    """

    name: str
    path: Path | None = None
    data: BinaryIO | None = None
    start: int = 0

    def open(self) -> str | BinaryIO:
        if self.path is not None:
            return str(self.path)
        assert self.data is not None
        self.data.seek(self.start)
        return self.data

    def head(self, n: int = 16) -> bytes:
        if self.path is not None:
            with open_media_file(self.path, self.name) as f:
                return f.read(n)
        assert self.data is not None
        self.data.seek(self.start)
        return self.data.read(n)


def rewindable_source(source: MediaSource, name: str | None) -> RewindableSource:
    """Check that `source` can be read and is not empty; `name` labels it in errors."""
    if isinstance(source, str | os.PathLike):
        label = name or os.fspath(source)
        with open_media_file(source, label):
            pass
        return RewindableSource(label, path=Path(source))
    label = name or "<bytes>"
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise MediaError(label, "empty file (0 bytes)")
        return RewindableSource(label, data=io.BytesIO(bytes(source)))
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        if seekable is not None and seekable():
            start = source.tell()
            first = source.read(1)
            source.seek(start)
            data, offset = source, start
        else:
            data, offset = io.BytesIO(source.read()), 0
            first = data.read(1)
        if not first:
            raise MediaError(label, "empty file (0 bytes)")
        return RewindableSource(label, data=data, start=offset)
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")
