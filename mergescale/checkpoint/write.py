"""Writing a merged model: a layout planned up front, rows written in place, one atomic commit.

Because every output tensor's shape and dtype is known before any math runs, the whole output (which shard each
tensor goes to, its byte offset, every shard's header) is planned first (layout.py). Shard files are created at
full size with their headers, and each merged tile is written straight to its final byte range with `pwrite`. So
no tensor is ever assembled in memory, tiles may arrive in any order (Ray actors write their own rows), and a
crashed run can resume: a journal in the partial directory lists the units whose bytes are durable.

Everything goes into a hidden sibling directory `.NAME.partial`; `commit` fsyncs it, writes the index and the
manifest, and renames it to NAME. A directory named NAME is therefore always complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mergescale.checkpoint.direct_io import DirectStream, open_stream, pwrite_all
from mergescale.checkpoint.layout import OutputLayout  # noqa: F401 - imported from here by callers that write outputs
from mergescale.checkpoint.output_dir import MANIFEST, METADATA_FILES, partial_dir, replace_refusal
from mergescale.checkpoint.shard_hash import ShardHashes
from mergescale.errors import MergeInputError, OutputInTheWay

if TYPE_CHECKING:
    import torch

# No torch at import: a Ray driver plans the layout and commits with this module, and write_rows takes numpy
# tiles too (the kernels' output in merge/pipeline.py); it loads torch only for a torch tile.

log = logging.getLogger(__name__)
_RUN_FILES = ("run.json", "done.journal", "stats.json", "stats.json.tmp")  # what a partial output holds to resume


def _libc_sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):  # not Linux / no libc symbol: the final fsync does all the work
        return None


_SYNC_FILE_RANGE = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now (Linux sync_file_range(SYNC_FILE_RANGE_WRITE),
    which does not wait), so the disk works while we compute instead of all at the final fsync. Durability still
    comes only from fdatasync/fsync."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, 2)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: a rename or a new file in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartialOutput:
    """The hidden directory a merge writes into; `commit` turns it into the real output directory."""

    def __init__(self, out: str | Path, layout: OutputLayout, run_key: str, direct: bool = False):
        self.out = Path(out)
        self.dir = partial_dir(self.out)
        self.layout = layout
        self.run_key = run_key  # config + inputs + layout fingerprint: a partial dir is resumable only if it matches
        self._fds: dict[int, int] = {}
        # direct=True (one writer going front to back: the single-process merge): rows go through a DirectStream
        # (checkpoint/direct_io.py), one shard at a time, bypassing the page cache
        self._direct = direct
        self._stream: tuple[int, DirectStream] | None = None
        self.hashes: ShardHashes | None = None  # the process that commits hashes the shards as they become final
        self._hasher: ThreadPoolExecutor | None = None  # write_rows' sha256, beside its write (`_hash_behind`)
        self._hashing = None  # the future of the last tile handed to the hasher
        self.done: dict[int, bytes] = {}  # journaled units: id -> the digest of the input rows they were merged from
        self._opened = False  # this object created or reopened the directory (only then may abort remove it)

    # -- opening: fresh or resumed ----------------------------------------------------------------------------
    def open(self, resume: bool = True) -> dict[int, bytes]:
        """Create the partial directory, or reopen a matching one; returns the units already durable, each with the
        digest of the input rows it was merged from (merge.input_digests: the caller proves them before trusting
        a unit). A directory of another run (config, inputs or layout) is removed, one mergescale did not write
        (no run.json, not empty) is an error."""
        marker = self.dir / "run.json"
        if self.dir.exists():
            if not marker.is_file() and any(self.dir.iterdir()):
                raise MergeInputError(f"{self.dir} exists and was not written by mergescale (no run.json); "
                                      "move it away")
            same = marker.is_file() and _read_json(marker).get("run_key") == self.run_key
            if resume and same:
                done = self._read_journal() if self._shards_complete() else None
                if done is not None:
                    self.done = done
                    for i in range(len(self.layout.shard_names)):
                        self._fds[i] = os.open(self.dir / self.layout.shard_names[i], os.O_RDWR)
                    self.hashes = ShardHashes([self.dir / n for n in self.layout.shard_names], self.layout.headers)
                    self._opened = True
                    return dict(self.done)
            elif resume and marker.is_file():
                log.warning("%s was left by a run of another config, other inputs or another mergescale version: "
                            "starting over", self.dir)
            shutil.rmtree(self.dir)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir()
        self._opened = True
        # first, so that a directory without it is never one of ours (`open` and output_dir.check_output refuse it)
        _write_json(marker, {"run_key": self.run_key, "started": time.time()})
        for i, (name, size, header) in enumerate(zip(self.layout.shard_names, self.layout.shard_sizes,
                                                     self.layout.headers)):
            fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[i] = fd
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, size)
        self.hashes = ShardHashes([self.dir / n for n in self.layout.shard_names], self.layout.headers)
        self.done = {}
        return {}

    def attach(self) -> None:
        """Open the shard files of a partial directory another process created (a Ray actor writing its rows).
        The process that created it hashes the shards (`rows_durable`). Idempotent."""
        if self._fds:
            return
        for i, name in enumerate(self.layout.shard_names):
            self._fds[i] = os.open(self.dir / name, os.O_RDWR)

    def rows_durable(self, name: str, row_start: int, row_end: int) -> None:
        """Rows another process wrote and synced: hashed in the background once all bytes before them are."""
        t = self.layout.tensors[name]
        self.hashes.durable(t.shard, t.offset + row_start * t.row_bytes, t.offset + row_end * t.row_bytes)

    def sync(self) -> None:
        if self._stream is not None:  # staged bytes first: what the journal will call durable must be on disk
            self._stream[1].flush()
        for fd in self._fds.values():
            os.fdatasync(fd)

    def save_stats(self, stats: dict, digests: dict[int, bytes]) -> None:
        """Keep the statistics pass's result, and the digests of the input rows it came from, so a resumed run does
        not repeat it once those rows are proven unchanged."""
        tmp = self.dir / "stats.json.tmp"
        _write_json(tmp, {"stats": stats, "input_digests": {str(u): d.hex() for u, d in sorted(digests.items())}})
        os.rename(tmp, self.dir / "stats.json")

    def load_stats(self, parse):
        """(parse(the saved statistics), {unit id: input digest}), or None when none were saved."""
        path = self.dir / "stats.json"
        if not path.exists():
            return None
        saved = _read_json(path)
        try:
            digests = {int(u): bytes.fromhex(d) for u, d in saved["input_digests"].items()}
            return parse(saved["stats"]), digests
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warning("%s is not readable: the statistics passes run again", path)
            return None

    def journal(self, entries: dict[int, bytes]) -> None:
        """Record units whose bytes their writers have already made durable, each with the digest of its input
        rows."""
        if not entries:
            return
        with open(self.dir / "done.journal", "a") as f:
            f.write("".join(f"{u} {d.hex()}\n" for u, d in entries.items()))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(entries)

    def _shards_complete(self) -> bool:
        """Whether every planned shard file exists at its planned size: a run killed between writing run.json and
        creating its shards left a directory to start over in, not one to resume."""
        for name, size in zip(self.layout.shard_names, self.layout.shard_sizes):
            p = self.dir / name
            if not p.is_file() or p.stat().st_size != size:
                log.warning("%s: shard %s is missing or not its planned size (an interrupted start): starting over",
                            self.dir, name)
                return False
        return True

    def _read_journal(self) -> dict[int, bytes] | None:
        """The journaled units; None (and a log line saying why) when a line other than a torn last one is not a
        unit and its digest: nothing in the journal can then be trusted."""
        path = self.dir / "done.journal"
        if not path.exists():
            return {}
        *lines, _torn = path.read_text().split("\n")  # a last line without its newline: a crash mid-append
        done = {}
        for n, line in enumerate(lines, 1):
            uid, _, digest = line.partition(" ")
            try:
                if not uid.isdigit() or not digest:
                    raise ValueError(line)
                done[int(uid)] = bytes.fromhex(digest)
            except ValueError:
                log.warning("%s: line %d is not a unit and its input digest (%r): starting over", path, n, line[:80])
                return None
        return done

    # -- writing ---------------------------------------------------------------------------------------------
    def write_rows(self, name: str, row_start: int, tile: torch.Tensor | np.ndarray) -> int:
        """Write a tile (already in the output dtype; a tensor, or a numpy array of its stored bytes' dtype) at rows
        [row_start, ...) of tensor `name`."""
        t = self.layout.tensors[name]
        data = tile_bytes(tile)
        offset = t.offset + row_start * t.row_bytes
        fd = self._fds[t.shard]
        view = memoryview(data)
        if self.hashes is not None:  # on the fly while this process writes a shard front to back
            self._hash_behind(t.shard, offset, view)
        stream = self._direct_stream(t.shard) if self._direct else None
        if stream is not None:
            stream.write(offset, view)
        else:
            pwrite_all(fd, view, offset)
            start_writeback(fd, offset, len(view))
        return len(view)

    def _hash_behind(self, shard: int, offset: int, view: memoryview) -> None:
        """Hash a tile on a thread of its own while the caller writes it. sha256 (0.75 s per GiB on one thread
        here, docs/BENCHMARKS.md) was the longer half of the writer's time, and waiting for the disk the other: side
        by side they overlap. One tile in flight (this waits for the previous one), so tiles reach the hash in order
        and memory grows by one tile at most; the view keeps its tile alive until hashed."""
        self._wait_hashed()
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="mergescale-sha256")
        self._hashing = self._hasher.submit(self.hashes.wrote, shard, offset, view)

    def _wait_hashed(self, shutdown: bool = False) -> None:
        """Wait for the tile being hashed (raising its error); with shutdown, also stop the hasher thread."""
        hashing, self._hashing = self._hashing, None
        try:
            if hashing is not None:
                hashing.result()
        finally:
            if shutdown and self._hasher is not None:
                self._hasher.shutdown()
                self._hasher = None

    def _direct_stream(self, shard: int) -> DirectStream | None:
        if self._stream is not None and self._stream[0] != shard:  # the writer moved on: finish the last shard
            self._end_stream()
        if self._stream is None:
            stream = open_stream(self.dir / self.layout.shard_names[shard], self._fds[shard])
            if stream is None:
                self._direct = False
                return None
            self._stream = (shard, stream)
        return self._stream[1]

    def _end_stream(self, flush: bool = True) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream[1], None
            stream.close(flush=flush)

    def mark_done(self, entries: dict[int, bytes]) -> None:
        """Make the listed units (id -> input digest) durable: data first (fdatasync), then the journal lines that
        say so."""
        if not entries:
            return
        self.sync()
        self.journal(entries)

    # -- commit ----------------------------------------------------------------------------------------------
    def shard_digests(self) -> dict[str, dict]:
        self._wait_hashed(shutdown=True)  # the fronts must include every tile written
        sizes = self.layout.shard_sizes
        hashes = self.hashes or ShardHashes([self.dir / n for n in self.layout.shard_names], self.layout.headers)
        digests = hashes.digests(sizes)
        return {name: {"size": size, "sha256": d} for name, size, d in zip(self.layout.shard_names, sizes, digests)}

    def commit(self, metadata_source: Path, manifest: dict, config_updates: dict | None = None,
               overwrite: bool = False) -> dict:
        """fsync the shards, write index/config/tokenizer/manifest, then atomically rename into place.

        Returns the manifest as written (with each shard's size and sha256, and the files it holds). Something at
        the output path that this call may not replace (see output_dir.replace_refusal) is an OutputInTheWay error,
        the finished partial directory kept as it is: a rerun after moving it away resumes with nothing to merge."""
        self._check_target(overwrite)
        self._end_stream()
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        names = self.layout.shard_names
        if len(names) > 1:
            index = {
                "metadata": {"total_size": self.layout.total_tensor_bytes},
                "weight_map": {n: names[t.shard] for n, t in self.layout.tensors.items()},
            }
            _write_json(self.dir / "model.safetensors.index.json", index)
        for fname in METADATA_FILES:
            src = metadata_source / fname
            if not src.exists():
                continue
            if fname == "config.json" and config_updates:
                _write_json(self.dir / fname, {**json.loads(src.read_text()), **config_updates})
            else:
                shutil.copyfile(src, self.dir / fname)
                fsync_path(self.dir / fname)
        files = sorted({p.name for p in self.dir.iterdir()} - set(_RUN_FILES) | {MANIFEST})
        manifest = {**manifest, "outputs": self.shard_digests(), "files": files}
        _write_json(self.dir / MANIFEST, manifest)
        self._check_target(overwrite)  # again: seconds may have passed, and nothing has been removed yet
        for leftover in _RUN_FILES:
            (self.dir / leftover).unlink(missing_ok=True)
        fsync_path(self.dir)
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
            os.rename(self.dir, self.out)
            shutil.rmtree(old)
        else:
            os.rename(self.dir, self.out)
        fsync_path(self.out.parent)
        return manifest

    def _check_target(self, overwrite: bool) -> None:
        if not (self.out.exists() or self.out.is_symlink()):
            return
        refusal = "it appeared while merging" if not overwrite else replace_refusal(self.out)
        if refusal is not None:
            raise OutputInTheWay(f"cannot move the merged output into place at {self.out}: {refusal}. It is complete "
                                 f"in {self.dir}: move {self.out} away and rerun the same command to finish")

    def abort(self) -> None:
        """Remove the partial directory this object opened (a deterministic input error: nothing worth resuming)."""
        self.close()
        if self._opened:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_hasher(self) -> None:
        try:
            self._wait_hashed(shutdown=True)
        except Exception:  # noqa: BLE001 - on the way out: a resumed run hashes from the shard files again
            pass

    def close(self) -> None:
        """Leave the partial directory for a later resume (crash, interrupt). Staged rows are dropped: only units
        in the journal count as written, and those were flushed before they went in."""
        self._stop_hasher()
        if self.hashes is not None:
            self.hashes.stop()
        self._end_stream(flush=False)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def tile_bytes(tile) -> np.ndarray:
    """A merged tile (a numpy array of its stored dtype, or a CPU tensor) as the flat uint8 bytes written."""
    if isinstance(tile, np.ndarray):
        return np.ascontiguousarray(tile).reshape(-1).view(np.uint8)
    import torch

    return tile.contiguous().reshape(-1).view(torch.uint8).numpy()


def _read_json(path: Path) -> dict:
    """A JSON object from a file this module wrote; {} when it is not one (a crash mid-write)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
