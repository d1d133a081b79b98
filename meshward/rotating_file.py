"""Whole JSON lines appended to a file that rotates by size (decision log, spans file).

:class:`RotatingFile` appends lines with one ``os.write`` per batch, renames the file to
``PATH.1`` … ``PATH.<backups>`` before a line would take it past ``max_bytes`` (so a
line is never split across files, and readers following the file see rotation as a
rename), creates files 0600, and never renames what is not a regular file
(``/dev/stderr``, a FIFO). A batch the disk refuses is taken back, so the file never
ends in half a line, and reported as :class:`LinesNotWrittenError`.

:class:`LineFollower` is the reading side: the whole lines appended since the last
poll, across such a rotation (it finishes the old file, then reads the new one from its
start) and across truncation in place (read again from the start); a torn last line is
held back until its newline arrives.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO


class LinesNotWrittenError(Exception):
    """Writing failed: ``unwritten`` of the batch's lines are not in the file."""

    def __init__(self, unwritten: int, error: OSError) -> None:
        super().__init__(str(error))
        self.unwritten = unwritten
        self.error = error


class RotatingFile:
    """Appends whole lines to ``path``, rotating by rename at ``max_bytes``.

    Only regular files rotate (``/dev/stderr`` or a FIFO is written as it is). One
    writer per file: the size is tracked, not re-read.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be 0 or more, not {backups}")
        self.path = os.fspath(path)
        self.name = self.path
        self.max_bytes = max_bytes
        self.backups = backups
        self._size = 0
        self._rotates = True
        self._fd: int | None = None
        self._fd = self._open()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        info = os.fstat(fd)
        self._size = info.st_size
        self._rotates = stat.S_ISREG(info.st_mode)
        return fd

    def write(self, lines: list[bytes]) -> None:
        """Write ``lines`` (each ending in a newline), rotating between lines as needed."""
        chunk: list[bytes] = []
        pending = 0
        written = 0
        try:
            for line in lines:
                if (
                    self._rotates
                    and self._size + pending > 0
                    and self._size + pending + len(line) > self.max_bytes
                ):
                    if chunk:
                        self._write(b"".join(chunk))
                        written += len(chunk)
                        chunk, pending = [], 0
                    self._rotate()
                chunk.append(line)
                pending += len(line)
            if chunk:
                self._write(b"".join(chunk))
        except OSError as error:
            raise LinesNotWrittenError(len(lines) - written, error) from error

    def _write(self, data: bytes) -> None:
        if self._fd is None:  # a rotation failed to reopen: try again
            self._fd = self._open()
        fd = self._fd
        start = self._size
        view = memoryview(data)
        try:
            while view:
                count = os.write(fd, view)
                view = view[count:]
                self._size += count
        except OSError:
            # Take back a partly written batch: the file never ends in half a line.
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size > start:
                    os.ftruncate(fd, start)
                    self._size = start
            raise

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.backups == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            for index in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._fd = self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LineFollower:
    """The lines appended to ``path`` since the last :meth:`poll` (module docstring).

    Nothing is opened until :meth:`start`; a file that appears later is read from its
    start. I/O errors are raised as ``OSError`` (a missing file is not one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._inode = 0
        self._partial = b""

    def start(self, *, from_end: bool = True) -> None:
        """Open the file if it exists, at its end (``from_end``) or its start."""
        if self.path.exists():
            self._open(at_end=from_end)

    def _open(self, *, at_end: bool) -> None:
        handle = self.path.open("rb")
        try:
            if at_end:
                handle.seek(0, os.SEEK_END)
            self._inode = os.fstat(handle.fileno()).st_ino
        except OSError:
            handle.close()
            raise
        self._file = handle
        self._partial = b""

    @property
    def offset(self) -> int:
        """How far into the current file it has read (0 before the file exists)."""
        return self._file.tell() if self._file is not None else 0

    def poll(self) -> list[bytes]:
        """The complete, non-empty lines appended since the last poll (no newlines)."""
        out = self._drain() if self._file is not None else []
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return out
        if self._file is None:
            self._open(at_end=False)
        elif info.st_ino != self._inode:  # rotated: finish the old file, then the new one
            out += self._drain()
            self._file.close()
            self._open(at_end=False)
        elif info.st_size < self._file.tell():  # truncated in place
            self._file.seek(0)
            self._partial = b""
        out += self._drain()
        return out

    def _drain(self) -> list[bytes]:
        assert self._file is not None
        data = self._file.read()
        if not data:
            return []
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line for line in lines if line]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
