"""A merge pass that runs only the fused kernels, on mapped rows as numpy arrays: no torch in the process.

On the CPU, every unit of average, task_arithmetic, dare_linear, ties and dare_ties is fused kernel calls between
mapping its rows and writing the result (method_params.kernels_merge). TIES's thresholds are found by kernels
too: a tensor held whole in one unit brackets its thresholds from a sample and merges in one pass
(kernels.select_and_merge_arrays), or counts its magnitudes pass by pass (kernels.histogram_arrays, the same
radix selection as the executor's); whole-model thresholds and those of tensors split into units come from the
statistics pass (`thresholds_of`), whose counts `feed_selection` gives. Doing just that here lets a Ray actor
start without importing torch: ~1.4 s of a fresh actor's ~2.8 s start on a 2-core node, and ~180 MB of its
memory.

The bytes are the executor's: executor.merge_unit runs the same kernels on the same stored values (as torch
views), and a k-th smallest magnitude is one value however it is found. A unit the kernels do not merge (an
integer tensor, a dtype other than bf16/float32 in or out, a non-finite value) goes to the caller's
`fallback(unit)`, which merges it the executor's way, non-finite policy included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mergescale.config import MergeConfig
from mergescale.merge import kernels
from mergescale.checkpoint.read import release_free_heap
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.methods import METHODS
from mergescale.merge.reader import UnitReader, checked_writes
from mergescale.merge.selection import KthQuery, StreamingSelector
from mergescale.checkpoint.write import write_behind


def possible(config: MergeConfig) -> bool:
    """Whether this config's merge pass can run here, as far as the config tells: numba, a method the kernels
    merge (method_params.kernels_merge), and mapped reads (config.read)."""
    return kernels.available() and METHODS[config.method].kernels_merge() and config.read == "mmap"


def usable(config: MergeConfig, inputs: MergeInputs) -> bool:
    """`possible`, and safetensors inputs (pickled weights live in memory as tensors). The caller also wants the
    CPU."""
    return possible(config) and not any(c.is_pickle for c in inputs.all)


@dataclass(frozen=True)
class _UnitContext:
    """What the kernels read of a unit (the fields of methods.TileContext they use)."""

    name: str
    seed: int
    element_offset: int
    thresholds: list | None = None


def unit_context(config: MergeConfig, inputs: MergeInputs, unit: Unit, thresholds: list | None = None) -> _UnitContext:
    return _UnitContext(unit.name, config.seed, unit.row_start * inputs.all[0].tensors[unit.name].row_numel, thresholds)


def stored_arrays(inputs: MergeInputs, unit: Unit, base, experts) -> tuple | None:
    """A unit's stored rows (flat uint8 arrays, base first or None) as flat arrays of the dtype the kernels read,
    base first or not at all; None when the kernels do not read it (not floating, mixed or other dtypes)."""
    info = inputs.all[0].tensors[unit.name]
    codes = {c.tensors[unit.name].dtype for c in inputs.all}
    code = codes.pop()
    if not info.is_float or codes or code not in kernels.RAW_CODES:
        return None
    stored = kernels.RAW_CODES[code]
    return tuple(a.view(stored) for a in ([base] if base is not None else []) + list(experts))


def _models(inputs: MergeInputs, plan: MergePlan, unit: Unit, base, experts):
    """(stored_arrays, the output's dtype), or None when the kernels do not read or write these dtypes."""
    models, out_code = stored_arrays(inputs, unit, base, experts), plan.out_dtypes[unit.name]
    if models is None or out_code not in kernels.RAW_CODES:
        return None
    return models, kernels.RAW_CODES[out_code]


def merge_unit_arrays(config: MergeConfig, plan: MergePlan, inputs: MergeInputs, unit: Unit, base, experts,
                      thresholds: list | None = None):
    """The unit's merged rows as a flat numpy array of the output dtype, from its rows' stored bytes (flat uint8
    arrays, base first or None: `UnitReader(raw=True)`); None when the kernels do not merge this unit.
    `thresholds`: the unit's per-expert thresholds from a statistics pass, if the method selects and has them
    (else a tensor held in this one unit finds its own, as executor.merge_unit does)."""
    got = _models(inputs, plan, unit, base, experts)
    if got is None:
        return None
    models, out_dtype = got
    out = np.empty(models[0].shape[0], out_dtype)
    ctx = unit_context(config, inputs, unit, thresholds)
    sel = METHODS[config.method].selection(config.method_params)
    if sel is not None and thresholds is None:
        ctx = _own_thresholds(config, ctx, models, out, base is not None)
        if ctx is None or ctx.thresholds is None:  # not handled here, or merged already by the fused select
            return None if ctx is None else out
    if kernels.merge_arrays(config.method, config.method_params, config.weights, ctx, models, base is not None, out):
        return out
    return None


def _own_thresholds(config: MergeConfig, ctx: _UnitContext, models: tuple, out: np.ndarray, has_base: bool):
    """executor.fused_select_merge and inline_statistics for a tensor whose rows are all in this unit: `ctx` with
    no thresholds when the one-pass select-and-merge already wrote `out`; else `ctx` with the exact thresholds;
    None when the kernels cannot (no base, a non-finite value)."""
    if not has_base:
        return None
    method, params, n_e, n = config.method, config.method_params, len(models) - 1, models[0].shape[0]
    all_ranks = METHODS[method].selection(params).ranks(n)
    ranks = {tag: k for tag, k in all_ranks.items() if k is not None}
    # one bound to find (TIES's "min"): one pass, unless the tensor is too small to sample (then None at once)
    if len(all_ranks) == len(ranks) == 1:
        if kernels.select_and_merge_arrays(method, params, ctx, models, out, list(ranks.values()) * n_e) is not None:
            return ctx
    selector = StreamingSelector([KthQuery(i, k, tag) for i in range(n_e) for tag, k in ranks.items()])
    while not selector.done:
        if not count(selector, method, params, ctx, models, lambda i: i):
            return None
        selector.finish_pass()
    thresholds = [dict() for _ in range(n_e)]
    for q in selector.queries:
        thresholds[q.stream][q.tag] = q.value
    return dataclasses.replace(ctx, thresholds=thresholds)


def count(selector: StreamingSelector, method: str, params, ctx, models: tuple, stream_of) -> bool:
    """Add one unit's counts of each expert's magnitudes (expert i is stream `stream_of(i)`) for the selector's
    current windows; False (nothing added) when the kernels do not count this unit."""
    ws = selector.expert_windows(len(models) - 1, stream_of)
    got = kernels.histogram_arrays(method, params, ctx, models, ws)
    if got is None:
        return False
    selector.add_expert_counts(stream_of, ws, got)
    return True


def feed_selection(selector: StreamingSelector, config: MergeConfig, plan: MergePlan, inputs: MergeInputs,
                   scope: str, unit: Unit, base, experts) -> bool:
    """executor.feed_selection on a unit's stored bytes: its counts for streams (scope, expert). False when the
    kernels do not count it (the caller then feeds it the executor's way)."""
    got = _models(inputs, plan, unit, base, experts)
    if got is None or base is None:
        return False
    ctx = unit_context(config, inputs, unit)
    return count(selector, config.method, config.method_params, ctx, got[0], lambda i: (scope, i))


def merge_stream(config: MergeConfig, plan: MergePlan, inputs: MergeInputs, reader: UnitReader, units: list[Unit],
                 warnings: list[str], write, fallback, then: Unit | None = None, thresholds_of=None):
    """executor.merge_stream with the kernels alone: units in order, reads one ahead (`reader`, made with
    raw=True; after the last unit it reads `then`), writes one behind (`write(unit, tile)`, writer.write_behind),
    and `fallback(unit)` -> tile for a unit the kernels do not merge. `thresholds_of(unit)`: the statistics pass's
    thresholds for the unit, or None. Merged values go through the non-finite policy (reader.check_merged)
    before they are written. Yields each unit after its merge."""

    def tiles():
        for unit, base, experts in reader.stream(units, warnings, then, check=False):
            if plan.starts_split_tensor(unit):
                release_free_heap()  # a split tensor, where memory peaks: as executor.merge_stream
            thr = thresholds_of(unit) if thresholds_of is not None else None
            tile = merge_unit_arrays(config, plan, inputs, unit, base, experts, thr)
            yield unit, (tile if tile is not None else fallback(unit))

    yield from write_behind(tiles(), checked_writes(config, write, warnings))
