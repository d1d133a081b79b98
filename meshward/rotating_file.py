"""Whole JSON lines appended to a file that rotates by size (decision log, spans file).

:class:`RotatingFile` appends lines with one ``os.write`` per batch, renames the file to
``PATH.1`` … ``PATH.<backups>`` before a line would take it past ``max_bytes`` (so a
line is never split across files, and readers following the file see rotation as a
rename), creates files 0600, and never renames what is not a regular file
(``/dev/stderr``, a FIFO). A batch the disk refuses is taken back, so the file never
ends in half a line, and reported as :class:`LinesNotWrittenError`.
"""

from __future__ import annotations

import contextlib
import os
import stat


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
