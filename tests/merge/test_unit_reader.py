"""UnitReader: reads one unit ahead into reused buffers; a wrong prefetch hint never changes what `get` returns."""

from __future__ import annotations

import numpy as np
import pytest

from mergescale.config import load_config
from mergescale.errors import MergeInputError
from mergescale.merge.inputs import open_inputs, plan_merge
from mergescale.merge.reader import UnitReader, read_rows
from tests.helpers import load_sd, write_like

BAD = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture
def setup(micro, tmp_path):
    sd = load_sd(micro.experts[1])
    sd[BAD][1, 2] = float("nan")
    bad = write_like(micro.experts[1], tmp_path / "bad", sd)
    cfg = load_config({"method": "task_arithmetic", "base": str(micro.base),
                       "experts": [micro.expert_strs[0], str(bad)], "tile_mb": 0.002})
    inputs = open_inputs(cfg)
    yield inputs, plan_merge(cfg, inputs)
    inputs.close()


def reference(inputs, unit):
    """The unit's stored bytes, read plainly (fresh buffers), base first."""
    return [r.copy() for r in read_rows(inputs, unit, mapped=False)]


def same(got, want):
    return all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("read", ["pread", "mmap"])
def test_stream_equals_plain_reads_and_buffers_are_reused(setup, read):
    inputs, plan = setup
    reader = UnitReader(inputs, "ignore", read)
    ptrs = set()
    for unit, raws in reader.stream(plan.units):
        assert same(raws, reference(inputs, unit)), unit
        ptrs.add(raws[1].ctypes.data)
    reader.close()
    assert len(plan.units) > 10
    if read == "pread":
        assert len(ptrs) <= 4  # two buffer sets in turn (a set grows at most once or twice)


def test_mapped_tiles_are_private(setup):
    """A kernel or conversion that writes into a mapped tile must never change the input file."""
    inputs, plan = setup
    unit = plan.units[3]
    before = reference(inputs, unit)
    raws = UnitReader(inputs, "ignore", "mmap").get(unit)
    raws[1].fill(0x7F)
    assert same(read_rows(inputs, unit, mapped=False), before)


def test_wrong_hint_is_dropped_and_right_hint_is_used(setup):
    inputs, plan = setup
    units = plan.units
    reader = UnitReader(inputs, "ignore", "pread")
    reads = []
    plain_read = reader._read
    reader._read = lambda unit, slot, check=True: (reads.append(unit.id), plain_read(unit, slot, check))[1]
    first = list(reader.stream(units[:3], then=units[10]))  # hint: unit 10 comes next
    assert [u.id for u, _ in first] == [0, 1, 2]
    reader._pending[1].result()  # the hinted read runs on the reader's thread
    assert reads == [0, 1, 2, 10]  # each unit read once, the hinted one ahead of time
    assert same(reader.get(units[5]), reference(inputs, units[5]))  # another actor took unit 10's batch
    assert reads == [0, 1, 2, 10, 5]
    reader.prefetch(units[7])
    pending = reader._pending
    assert same(reader.get(units[7]), reference(inputs, units[7])) and reader._pending is None
    assert pending[1].done()  # the prefetched read was the one used
    assert reads == [0, 1, 2, 10, 5, 7]  # and not read again
    reader.close()


def test_errors_and_warnings_of_a_dropped_prefetch_do_not_leak(setup):
    inputs, plan = setup
    bad = next(u for u in plan.units if u.name == BAD)
    good = next(u for u in plan.units if u.name != BAD)
    reader = UnitReader(inputs, "error")
    reader.prefetch(bad)
    warnings: list[str] = []
    assert same(reader.get(good, warnings), reference(inputs, good)) and warnings == []
    reader.prefetch(bad)
    with pytest.raises(MergeInputError, match="non-finite"):
        reader.get(bad)
    reader.close()
    warn = UnitReader(inputs, "warn")
    warn.prefetch(bad)
    warn.get(good, warnings)
    assert warnings == []
    warn.prefetch(bad)
    warn.get(bad, warnings)
    assert len(warnings) == 1 and BAD in warnings[0]
    warn.close()
