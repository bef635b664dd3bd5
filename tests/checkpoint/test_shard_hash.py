"""Output shard sha256s computed during the merge equal hashlib over the finished files, whatever order the bytes
became final in, whichever spans were never reported, and however the background hashing was interrupted."""

from __future__ import annotations

import hashlib
import random
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergescale.checkpoint import shard_hash
from mergescale.checkpoint.layout import OutputLayout
from mergescale.checkpoint.shard_hash import ShardHashes
from mergescale.checkpoint.write import PartialOutput


def make_shards(tmp_path, sizes, seed):
    rng = random.Random(seed)
    paths, headers, data = [], [], []
    for i, size in enumerate(sizes):
        header = rng.randbytes(8 + rng.randrange(40))
        body = rng.randbytes(size)
        p = tmp_path / f"shard-{i}.safetensors"
        p.write_bytes(header + body)
        paths.append(p)
        headers.append(header)
        data.append(header + body)
    return paths, headers, data


def cut(rng, start, end, pieces):
    points = sorted({start, end, *(rng.randrange(start, end + 1) for _ in range(pieces))})
    return list(zip(points, points[1:]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), pieces=st.integers(0, 30), drop=st.floats(0, 0.5),
       chunk=st.sampled_from([7, 64, 4096]))
def test_spans_in_any_order_with_gaps_give_file_sha256(tmp_path_factory, seed, pieces, drop, chunk):
    tmp_path = tmp_path_factory.mktemp("h")
    rng = random.Random(seed)
    sizes = [rng.randrange(0, 5000) for _ in range(rng.randrange(1, 4))]
    paths, headers, data = make_shards(tmp_path, sizes, seed)
    old = shard_hash.HASH_CHUNK
    shard_hash.HASH_CHUNK = chunk  # many reads per span
    try:
        h = ShardHashes(paths, headers)
        spans = [(i, a, b) for i, hd in enumerate(headers) for a, b in cut(rng, len(hd), len(data[i]), pieces)]
        rng.shuffle(spans)
        reported = [s for s in spans if rng.random() >= drop]  # the rest: never reported (a resumed run's gaps)
        threads = [threading.Thread(target=lambda part: [h.durable(*s) for s in part], args=(reported[j::3],))
                   for j in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = h.digests([len(d) for d in data])
    finally:
        shard_hash.HASH_CHUNK = old
    assert got == [hashlib.sha256(d).hexdigest() for d in data]


def test_front_advances_in_background_before_commit(tmp_path):
    paths, headers, data = make_shards(tmp_path, [300_000], 1)
    h = ShardHashes(paths, headers)
    spans = cut(random.Random(2), len(headers[0]), len(data[0]), 20)
    for a, b in reversed(spans[1:]):  # everything but the first span: the front cannot move
        h.durable(0, a, b)
    h.stop()
    assert h.fronts[0][1] == len(headers[0])
    h.durable(0, *spans[0])  # now the whole file is durable
    h.stop()  # waits for the background pass to finish
    assert h.fronts[0][1] in (len(headers[0]), len(data[0]))  # stop may interrupt, never passes the end
    assert h.digests([len(data[0])]) == [hashlib.sha256(data[0]).hexdigest()]


def test_front_reaches_the_end_without_commit(tmp_path):
    paths, headers, data = make_shards(tmp_path, [100_000], 3)
    h = ShardHashes(paths, headers)
    h.durable(0, len(headers[0]), len(data[0]))
    for _ in range(200):
        if h.fronts[0][1] == len(data[0]):
            break
        threading.Event().wait(0.01)
    assert h.fronts[0][1] == len(data[0])
    assert h.fronts[0][0].hexdigest() == hashlib.sha256(data[0]).hexdigest()


def test_single_writer_hashes_on_the_fly_and_skips_out_of_order(tmp_path):
    paths, headers, data = make_shards(tmp_path, [1000, 1000], 4)
    h = ShardHashes(paths, headers)
    n = len(headers[0])
    h.wrote(0, n, memoryview(data[0][n : n + 500]))  # continues the front
    h.wrote(1, len(headers[1]) + 10, memoryview(data[1][len(headers[1]) + 10 :]))  # not at the front: ignored
    assert h.fronts[0][1] == n + 500 and h.fronts[1][1] == len(headers[1])
    assert h.digests([len(d) for d in data]) == [hashlib.sha256(d).hexdigest() for d in data]


def test_unreadable_shard_is_hashed_from_scratch_at_commit(tmp_path):
    paths, headers, data = make_shards(tmp_path, [5000], 5)
    h = ShardHashes(paths, headers)
    paths[0].rename(tmp_path / "moved")
    h.durable(0, len(headers[0]), len(data[0]))  # the background read fails: its front is dropped
    h.stop()
    assert h.fronts[0] is None
    (tmp_path / "moved").rename(paths[0])
    assert h.digests([len(data[0])]) == [hashlib.sha256(data[0]).hexdigest()]


@pytest.mark.parametrize("direct", [True, False])
def test_writer_hashes_every_tile_as_written_beside_the_write(tmp_path, direct):
    """PartialOutput.write_rows hashes each tile on its hasher thread while it writes it: once the writes have
    returned and the hasher has caught up, each shard's front is at its end (nothing is read back at commit) and
    equals hashlib over the file. The caller drops every tile as soon as write_rows returns, as the merge does."""
    rng = np.random.default_rng(6)
    specs = [("a", "BF16", (300, 70)), ("b", "F32", (129, 33)), ("c", "BF16", (1000, 9))]
    layout = OutputLayout.plan(specs, max_shard_size=60_000)
    assert len(layout.shard_names) == 2
    partial = PartialOutput(tmp_path / "out", layout, "key", direct=direct)
    partial.open()
    for name, code, (rows, cols) in specs:  # front to back, in row tiles of a few sizes
        dtype = np.uint16 if code == "BF16" else np.float32
        r = 0
        while r < rows:
            step = min(rows - r, int(rng.integers(1, 90)))
            partial.write_rows(name, r, rng.integers(0, 2**15, size=(step, cols)).astype(dtype))
            r += step
    partial._wait_hashed()
    assert [partial.hashes.fronts[i][1] for i in range(2)] == layout.shard_sizes
    partial._end_stream()
    files = [partial.dir / n for n in layout.shard_names]
    expected = {n: hashlib.sha256(f.read_bytes()).hexdigest() for n, f in zip(layout.shard_names, files)}
    assert {n: d["sha256"] for n, d in partial.shard_digests().items()} == expected
    partial.close()
