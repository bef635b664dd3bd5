"""Writing a shard front to back without the page cache (O_DIRECT), for the single-process merge's writer.

A buffered `pwrite` copies every output byte into freshly allocated page-cache pages: on the 2-core benchmark
machine that took ~1.9 CPU-s per GiB written (benchmarks/write_cost.py), twice the sha256 of the manifest, and
it fills the page cache with output nobody reads back during the merge. O_DIRECT hands the disk whole aligned
blocks from one reused buffer instead: ~0.3 CPU-s per GiB, the copy into that buffer.

O_DIRECT wants the file offset, the length and the buffer address aligned, which merged tensors' byte ranges are
not. So a `DirectStream` stages consecutive writes in a page-aligned buffer, writes whole ALIGN blocks of it
directly, and writes the unaligned edges (the start of a run, what is left at a flush) through the ordinary
descriptor. The two never write the same page. A write that does not continue the run flushes it and starts
another. Durability is unchanged: callers flush, then fdatasync, before they record anything as written.
"""

from __future__ import annotations

import logging
import mmap
import os

log = logging.getLogger(__name__)

ALIGN = 4096  # the page size: direct and buffered writes never share a page (logical blocks are <= this)
STAGE_BYTES = 4 << 20  # one staged run: a 4 MB direct write is as fast as a larger one here, and RSS stays low


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class DirectStream:
    """Consecutive writes to one file, whole aligned blocks with O_DIRECT, the edges through `buffered_fd`.

    Raises OSError from the constructor where the file system has no O_DIRECT (tmpfs, some network file
    systems): the caller then writes buffered."""

    def __init__(self, path, buffered_fd: int):
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        self.buffered_fd = buffered_fd
        self._stage: mmap.mmap | None = None  # anonymous mappings are page-aligned
        self.start: int | None = None  # file offset of the staged bytes (aligned); None: no run in progress
        self.fill = 0

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if self.start is None or offset != self.start + self.fill:
            self.flush()
            head = min(len(view), -offset % ALIGN)  # up to the next aligned offset: buffered
            if head:
                pwrite_all(self.buffered_fd, view[:head], offset)
                view, offset = view[head:], offset + head
            if offset % ALIGN:  # the whole write was the head: the next one starts a new run
                return
            self.start, self.fill = offset, 0
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGE_BYTES)
        with memoryview(self._stage) as stage:  # released even if a write fails, so close() can unmap
            pos = 0
            while pos < len(view):
                k = min(len(view) - pos, STAGE_BYTES - self.fill)
                stage[self.fill:self.fill + k] = view[pos:pos + k]
                self.fill += k
                pos += k
                if self.fill == STAGE_BYTES:
                    pwrite_all(self.fd, stage, self.start)
                    self.start += STAGE_BYTES
                    self.fill = 0

    def flush(self) -> None:
        """Write out the staged bytes: whole blocks directly, the rest buffered. Ends the run."""
        start, fill, self.start, self.fill = self.start, self.fill, None, 0
        if start is not None and fill:
            with memoryview(self._stage) as stage:
                whole = fill - fill % ALIGN
                if whole:
                    pwrite_all(self.fd, stage[:whole], start)
                if fill > whole:
                    pwrite_all(self.buffered_fd, stage[whole:fill], start + whole)

    def close(self, flush: bool = True) -> None:
        """Flush (unless dropping the staged bytes: an abandoned run) and release the descriptor and buffer."""
        try:
            if flush:
                self.flush()
        finally:
            os.close(self.fd)
            stage, self._stage = self._stage, None
            if stage is not None:
                try:
                    stage.close()
                except BufferError:  # a failed write's traceback still holds a view of it: freed with it
                    pass


def open_stream(path, buffered_fd: int) -> DirectStream | None:
    """A DirectStream, or None (logged) where O_DIRECT is not supported; the caller then writes buffered."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return DirectStream(path, buffered_fd)
    except OSError as e:
        log.info("%s: no O_DIRECT here (%s); writing through the page cache", path, e)
        return None
