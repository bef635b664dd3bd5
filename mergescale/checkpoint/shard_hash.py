"""sha256 of output shards, computed while the merge runs rather than by reading everything back at the end.

Each shard's hash is a running sha256 over the bytes [0, front) that are already final. The single-process writer
feeds it as it writes a shard front to back (`wrote`). When other processes write rows in any order (Ray actors),
the coordinator reports each span once the actor has made it durable (`durable`), and a background thread reads
back and hashes the contiguous run of durable bytes in front of each shard's hash. Either way `digest` hashes only
what is left after the front, so a 128 GB output is not re-read as one serial step at commit.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HASH_CHUNK = 16 * 2**20


def hash_file_range(path: Path, sha, start: int, end: int, stop: threading.Event | None = None) -> int:
    """Feed bytes [start, end) of `path` to `sha`; returns where it stopped (end, or earlier when `stop` is set).

    Opens the file afresh on every call: on NFS that revalidates the cache (close-to-open), so bytes another node
    wrote and fdatasync'ed are read as written."""
    buf = bytearray(min(HASH_CHUNK, max(end - start, 1)))
    view = memoryview(buf)
    pos = start
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while pos < end and not (stop is not None and stop.is_set()):
            n = f.readinto(view[: min(len(buf), end - pos)])
            if not n:
                raise OSError(f"{path}: file ends at byte {pos}, expected {end} bytes")
            sha.update(view[:n])  # hashlib releases the GIL on large buffers: shards hash in parallel threads
            pos += n
    return pos


class ShardHashes:
    """Running sha256 per shard file. `fronts[i]` = (sha, front): the hash of bytes [0, front) of shard i."""

    def __init__(self, paths: list[Path], headers: list[bytes]):
        self.paths = paths
        self.fronts: dict[int, tuple[object, int] | None] = {
            i: (hashlib.sha256(h), len(h)) for i, h in enumerate(headers)
        }
        self._spans: dict[int, dict[int, int]] = {i: {} for i in range(len(paths))}  # shard -> {start: end}
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    # -- one writer, front to back ------------------------------------------------------------------------------
    def wrote(self, shard: int, offset: int, data: memoryview) -> None:
        """Bytes just written at `offset`: extend the hash if they continue its front (else commit hashes later)."""
        state = self.fronts.get(shard)
        if state is not None and state[1] == offset:
            state[0].update(data)
            self.fronts[shard] = (state[0], offset + len(data))

    # -- many writers, any order ------------------------------------------------------------------------------
    def durable(self, shard: int, start: int, end: int) -> None:
        """Bytes [start, end) of a shard are final and synced by their writer: hash them in the background once
        everything before them is."""
        if end <= start:
            return
        with self._lock:
            self._spans[shard][start] = end
            state = self.fronts.get(shard)
            if shard in self._busy or state is None or state[1] not in self._spans[shard]:
                return
            self._busy.add(shard)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="mergescale-hash")
        self._pool.submit(self._advance, shard)

    def _advance(self, shard: int) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    sha, front = self.fronts[shard]
                    end, spans = front, self._spans[shard]
                    while end in spans:
                        end = spans.pop(end)
                    if end == front:
                        self._busy.discard(shard)
                        return
                reached = hash_file_range(self.paths[shard], sha, front, end, self._stop)
                with self._lock:
                    self.fronts[shard] = (sha, reached)
                    if reached < end:  # stopped early: keep the rest for later
                        self._spans[shard][reached] = end
        except BaseException:  # noqa: BLE001 - unreadable now: digest() starts that shard over
            self.fronts[shard] = None
        with self._lock:
            self._busy.discard(shard)

    def stop(self) -> None:
        """Stop background hashing (the fronts stay valid); digest() finishes the rest."""
        if self._pool is not None:
            self._stop.set()
            self._pool.shutdown(wait=True)
            self._pool = None
            self._stop.clear()

    # -- commit ----------------------------------------------------------------------------------------------
    def digests(self, sizes: list[int]) -> list[str]:
        """Every shard's sha256, hashing from each front to the end of the file (shards in parallel)."""
        self.stop()

        def finish(i: int) -> str:
            state = self.fronts.get(i)
            sha, front = state if state is not None else (hashlib.sha256(), 0)
            hash_file_range(self.paths[i], sha, front, sizes[i])
            return sha.hexdigest()

        with ThreadPoolExecutor(min(4, os.cpu_count() or 1, max(len(self.paths), 1))) as pool:
            return list(pool.map(finish, range(len(self.paths))))
