"""O_DIRECT shard writing (checkpoint/direct_io.py): the file's bytes are exactly what buffered writes give, for any
run of consecutive writes, jumps, flushes and staging boundaries; merges write the same files either way."""

from __future__ import annotations

import errno
import os
import random

import pytest

from mergescale.checkpoint import direct_io
from mergescale.checkpoint.direct_io import ALIGN, DirectStream
from tests.helpers import merge, shard_digests


def direct_supported(path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def segments(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """(offset, length) pieces covering [0, size): mostly front to back, some runs moved out of order (a jump)."""
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 40))))
    pieces = [(a, b - a) for a, b in zip([0] + cuts, cuts + [size])]
    for _ in range(rng.randint(0, 3)):  # move a piece elsewhere: the stream must flush and start again
        i, j = rng.randrange(len(pieces)), rng.randrange(len(pieces))
        pieces.insert(j, pieces.pop(i))
    return pieces


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("stage_blocks", [1, 3, 1024])
def test_stream_writes_exactly_the_bytes_of_buffered_writes(tmp_path, monkeypatch, seed, stage_blocks):
    monkeypatch.setattr(direct_io, "STAGE_BYTES", stage_blocks * ALIGN)  # small stages: many full-stage writes
    rng = random.Random(seed)
    size = rng.choice([ALIGN * 5 + 123, ALIGN * 40, 300_001])
    data = rng.randbytes(size)
    header = rng.randbytes(rng.randint(8, 2 * ALIGN))  # the shard header, written buffered first, as PartialOutput does
    path = tmp_path / "shard.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, header, 0)
    os.ftruncate(fd, len(header) + size)
    if not direct_supported(path):
        pytest.skip(f"{tmp_path}: file system without O_DIRECT")
    stream = DirectStream(path, fd)
    for offset, length in segments(rng, size):
        stream.write(len(header) + offset, data[offset:offset + length])
        if rng.random() < 0.2:
            stream.flush()  # what PartialOutput.sync does before journaling
    stream.close()
    os.close(fd)
    assert path.read_bytes() == header + data


def test_close_without_flush_drops_only_staged_bytes(tmp_path):
    path = tmp_path / "shard.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 3 * ALIGN)
    if not direct_supported(path):
        pytest.skip(f"{tmp_path}: file system without O_DIRECT")
    stream = DirectStream(path, fd)
    stream.write(0, b"a" * ALIGN)
    stream.flush()
    stream.write(ALIGN, b"b" * ALIGN)  # staged, never flushed: an interrupted run that did not journal it
    stream.close(flush=False)
    os.close(fd)
    assert path.read_bytes() == b"a" * ALIGN + bytes(2 * ALIGN)


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3, "trim_scope": "tensor"}),
                                            ("dare_linear", {"p": 0.3})])
def test_direct_and_buffered_merges_write_the_same_files(micro, tmp_path, method, params):
    cfg = {"method": method, "base": str(micro.base), "experts": micro.expert_strs, "parameters": params,
           "tile_mb": 700 / 2**20, "seed": 2, "out_shard_size": "20KB"}
    direct = merge({**cfg, "write": "direct"}, tmp_path / "direct")
    buffered = merge({**cfg, "write": "buffered"}, tmp_path / "buffered")
    assert direct["outputs"] == buffered["outputs"]
    assert shard_digests(tmp_path / "direct") == shard_digests(tmp_path / "buffered")
    assert {k: v["sha256"] for k, v in direct["outputs"].items()} == shard_digests(tmp_path / "direct")


def test_no_o_direct_falls_back_to_buffered(micro, tmp_path, monkeypatch, caplog):
    real_open = os.open
    tried = []

    def open_without_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", open_without_direct)
    cfg = {"method": "task_arithmetic", "base": str(micro.base), "experts": micro.expert_strs,
           "tile_mb": 700 / 2**20, "out_shard_size": "20KB"}
    with caplog.at_level("INFO", logger="mergescale.checkpoint.direct_io"):
        got = merge(cfg, tmp_path / "fallback")
    monkeypatch.undo()
    want = merge({**cfg, "write": "buffered"}, tmp_path / "buffered")
    assert len(tried) == 1  # tried once, then the whole run wrote buffered
    assert "no O_DIRECT" in caplog.text
    assert got["outputs"] == want["outputs"]
    assert shard_digests(tmp_path / "fallback") == shard_digests(tmp_path / "buffered")


def test_a_failed_direct_write_surfaces_and_close_still_works(tmp_path, monkeypatch):
    path = tmp_path / "shard.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 4 * ALIGN)
    if not direct_supported(path):
        pytest.skip(f"{tmp_path}: file system without O_DIRECT")
    monkeypatch.setattr(direct_io, "STAGE_BYTES", ALIGN)
    stream = DirectStream(path, fd)
    real_pwrite = os.pwrite

    def full_disk(f, data, offset):
        if f == stream.fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(f, data, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        stream.write(0, b"x" * (2 * ALIGN))
    with pytest.raises(OSError, match="No space left"):
        stream.write(3 * ALIGN, b"y" * ALIGN + b"z" * 10)  # a new run: flushing the old one fails the same way
    stream.close(flush=False)  # what PartialOutput.close does after the error: no BufferError, descriptor closed
    with pytest.raises(OSError):
        os.fstat(stream.fd)
    os.close(fd)
