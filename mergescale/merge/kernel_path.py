"""A merge pass that runs only the fused kernels, on mapped rows as numpy arrays: no torch in the process.

average, task_arithmetic, dare_linear and dare_ties without an extra trim (density 1, its default) need no
statistics, so on the CPU merging a unit is one fused kernel call (kernels.merge_arrays) between mapping its rows
and writing the result (method_params.kernels_alone). Doing just that here lets a Ray actor merging with them
start without importing torch: ~1.4 s of a fresh actor's ~2.8 s start on a 2-core node, a fifth of the wall
time of a 1 GB-per-model merge (docs/BENCHMARKS.md).

The bytes are the executor's: executor.merge_unit runs the same kernel on the same stored values (as torch views).
A unit the kernels do not merge (an integer tensor, a dtype other than bf16/float32 in or out, a non-finite
value) goes to the caller's `fallback(unit)`, which merges it the executor's way, non-finite policy included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mergescale.config import MergeConfig
from mergescale.merge import kernels
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.method_params import kernels_alone
from mergescale.merge.reader import UnitReader
from mergescale.merge.writer import write_behind


def possible(config: MergeConfig) -> bool:
    """Whether this config's merge pass can run here, as far as the config tells: numba, a method and parameters
    whose units are each one kernel call (method_params.kernels_alone), and mapped reads (config.read)."""
    return kernels.available() and kernels_alone(config.method, config.method_params) and config.read == "mmap"


def usable(config: MergeConfig, inputs: MergeInputs) -> bool:
    """`possible`, and safetensors inputs (pickled weights live in memory as tensors). The caller also wants the
    CPU."""
    return possible(config) and not any(c.is_pickle for c in inputs.all)


@dataclass(frozen=True)
class _UnitContext:
    """What kernels.merge_arrays reads of a unit (the fields of methods.TileContext it uses)."""

    name: str
    seed: int
    element_offset: int
    thresholds: None = None


def merge_unit_arrays(config: MergeConfig, plan: MergePlan, inputs: MergeInputs, unit: Unit, base, experts):
    """The unit's merged rows as a flat numpy array of the output dtype, from its rows' stored bytes (flat uint8
    arrays, base first or None: `UnitReader(raw=True)`); None when the kernels do not merge this unit."""
    info = inputs.all[0].tensors[unit.name]
    codes = {c.tensors[unit.name].dtype for c in inputs.all}
    code, out_code = codes.pop(), plan.out_dtypes[unit.name]
    if not info.is_float or codes or code not in kernels.RAW_CODES or out_code not in kernels.RAW_CODES:
        return None
    stored = kernels.RAW_CODES[code]
    models = tuple(a.view(stored) for a in ([base] if base is not None else []) + list(experts))
    out = np.empty(models[0].shape[0], kernels.RAW_CODES[out_code])
    ctx = _UnitContext(unit.name, config.seed, unit.row_start * info.row_numel)
    if kernels.merge_arrays(config.method, config.method_params, config.weights, ctx, models, base is not None, out):
        return out
    return None


def merge_stream(config: MergeConfig, plan: MergePlan, inputs: MergeInputs, reader: UnitReader, units: list[Unit],
                 warnings: list[str], write, fallback, then: Unit | None = None):
    """executor.merge_stream with the kernels alone: units in order, reads one ahead (`reader`, made with
    raw=True; after the last unit it reads `then`), writes one behind (`write(unit, tile)`, writer.write_behind),
    and `fallback(unit)` -> tile for a unit the kernels do not merge. Yields each unit after its merge."""

    def tiles():
        for unit, base, experts in reader.stream(units, warnings, then, check=False):
            tile = merge_unit_arrays(config, plan, inputs, unit, base, experts)
            yield unit, (tile if tile is not None else fallback(unit))

    yield from write_behind(tiles(), write)
