"""What each tensor's merge needs beyond its own rows, and how it is planned and gathered.

Whole-model TIES thresholds (scope GLOBAL) or per-tensor ones of tensors split into several units, and per-tensor
sums (model_stock); which units a statistics pass reads; the sample of rows that places each threshold query's
first counting window (mergescale.merge.selection); and counting down units so that each stream is finished as
soon as all of it has been counted. Used by the single-process executor and by the Ray coordinator alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mergescale.config import MergeConfig
from mergescale.checkpoint.read import SAFETENSORS_DTYPES
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.methods import METHODS, UnitContext
from mergescale.merge.selection import KthQuery, StreamingSelector, sample_bracket, window_around

if TYPE_CHECKING:
    import torch

# No torch or numba at import: a Ray coordinator plans and runs the statistics passes with this module (the
# actors count; it adds their counts), so it loads neither. What reads or sums tensor values imports torch itself.

GLOBAL = "*"



@dataclass
class MergeStats:
    """thresholds[scope][expert] = {"min": .., "max": ..}, scope = GLOBAL or a tensor name; sums[tensor] = float64."""

    thresholds: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_json(self) -> dict:
        # Python floats round-trip exactly through JSON, so a resumed run uses bitwise the same statistics.
        return {"thresholds": self.thresholds, "sums": {k: v.tolist() for k, v in self.sums.items()}}

    def global_thresholds(self) -> dict | None:
        """The whole-model thresholds, for the manifest (per-tensor ones are too many to list)."""
        return {GLOBAL: self.thresholds[GLOBAL]} if GLOBAL in self.thresholds else None

    @classmethod
    def from_json(cls, d: dict) -> "MergeStats":
        if not d["sums"]:
            return cls(d["thresholds"], {})
        import torch

        return cls(d["thresholds"], {k: torch.tensor(v, dtype=torch.float64) for k, v in d["sums"].items()})


@dataclass
class StatisticsWork:
    """What must be read before the merge pass: units for the two selection passes, units for row sums."""

    global_selection: bool
    selection_units: list[Unit]
    sum_units: list[Unit]
    selector: StreamingSelector | None


def statistics_work(method: str, params, plan: MergePlan, n_experts: int) -> StatisticsWork:
    """Whole-model thresholds need every float unit; per-tensor statistics of tensors split into several units
    need those units. A tensor that is a single unit gets its statistics inline, from the rows read to merge it.
    `method` is the method's name: what it needs is in its signature (method_params), without torch."""
    sig = METHODS[method]
    sel = sig.selection(params)
    tiled = [t for t in plan.tensors if t.is_float and len(plan.units_of[t.name]) > 1]
    queries, sel_units = [], []
    if sel is not None and sel.scope == "global":
        sel_units = [u for t in plan.tensors if t.is_float for u in plan.units_of[t.name]]
        queries = selection_queries(method, params, GLOBAL, plan.float_numel, n_experts)
    elif sel is not None:
        sel_units = [u for t in tiled for u in plan.units_of[t.name]]
        queries = [q for t in tiled for q in selection_queries(method, params, t.name, t.numel, n_experts)]
    return StatisticsWork(
        global_selection=sel is not None and sel.scope == "global",
        selection_units=sel_units,
        sum_units=[u for t in tiled for u in plan.units_of[t.name]] if sig.row_stats is not None else [],
        selector=StreamingSelector(queries) if queries else None,
    )


def restrict(work: StatisticsWork, skip=frozenset(), only: set[str] | None = None) -> StatisticsWork:
    """The per-tensor statistics of `work` without the tensors in `skip`, or of only those in `only`."""
    if not skip and only is None:
        return work
    if work.global_selection:
        raise ValueError("whole-model thresholds cannot be restricted to some tensors")

    def keep(name: str) -> bool:
        return name not in skip and (only is None or name in only)

    queries = [q for q in work.selector.queries if keep(q.stream[0])] if work.selector is not None else []
    return StatisticsWork(False, [u for u in work.selection_units if keep(u.name)],
                          [u for u in work.sum_units if keep(u.name)], StreamingSelector(queries) if queries else None)


def selection_queries(method: str, params, scope: str, n: int, n_experts: int) -> list[KthQuery]:
    ranks = METHODS[method].selection(params).ranks(n)
    return [KthQuery((scope, i), k, tag) for i in range(n_experts) for tag, k in ranks.items() if k is not None]


def thresholds_from(queries: list[KthQuery], n_experts: int) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for q in queries:
        scope, i = q.stream
        out.setdefault(scope, [dict() for _ in range(n_experts)])[i][q.tag] = q.value
    return out


def scope_of(name: str, global_selection: bool) -> str:
    return GLOBAL if global_selection else name


def tile_context(config: MergeConfig, info, unit: Unit, stats: MergeStats, scope: str, n_experts: int) -> UnitContext:
    return UnitContext(
        name=unit.name,
        shape=info.shape,
        element_offset=unit.row_start * info.row_numel,
        seed=config.seed,
        thresholds=stats.thresholds.get(scope, [dict() for _ in range(n_experts)]),
        sums=stats.sums.get(unit.name),
    )


def pending_units(selector: StreamingSelector, units: list[Unit], global_sel: bool) -> list[Unit]:
    """The units a pass must read: those of scopes with a query still unresolved."""
    scopes = {stream[0] for stream in selector.windows()}
    return [u for u in units if scope_of(u.name, global_sel) in scopes]


def units_per_scope(units: list[Unit], global_sel: bool) -> dict[str, int]:
    left: dict[str, int] = {}
    for u in units:
        scope = scope_of(u.name, global_sel)
        left[scope] = left.get(scope, 0) + 1
    return left


def finish_complete_streams(selector: StreamingSelector, left: dict[str, int], done: list[Unit], global_sel: bool,
                            n_experts: int) -> None:
    """Count down the units of each scope still to be fed this pass; finish a scope's streams at zero."""
    for u in done:
        scope = scope_of(u.name, global_sel)
        left[scope] -= 1
        if left[scope] == 0:
            for i in range(n_experts):
                selector.finish_stream((scope, i))


# Magnitudes per selection stream in the sample that places the first windows: enough that a bracket of
# bf16 experts' task vectors spans fewer bit patterns than a window has bins (one pass instead of two).
SAMPLE_VALUES = 1 << 18
SAMPLE_ROW_STRIDE = 8  # read this many times more rows, keep every 8th value: more rows, same sample size
SAMPLE_BLOCK_ROWS = 16


def sample_windows(config, method, params, plan: MergePlan, inputs: MergeInputs, work: "StatisticsWork",
                   raw: bool = False) -> None:
    """Start every query at a window around its answer, bracketed from a sample of evenly spaced rows of the
    tensors it covers (a few MB read), so that one counting pass usually finds it exactly. A bracket that
    misses costs passes, never exactness (selection.StreamingSelector starts over).

    raw=True: the magnitudes come from the fused kernels on mapped bytes (kernels.magnitude_arrays; `method` may
    then be None), without torch; the same values, so the same windows. Where the kernels cannot (a non-finite
    value), the sample is taken with torch after all."""
    sel = work.selector
    tensors = sorted({u.name for u in work.selection_units}, key=[t.name for t in plan.tensors].index)
    samples, stream_numel = None, None
    if raw:
        samples, stream_numel = _samples(config, None, params, plan, inputs, tensors, work.global_selection, raw=True)
    if samples is None:
        if method is None:
            from mergescale.merge.methods import get_method

            method = get_method(config.method)
        samples, stream_numel = _samples(config, method, params, plan, inputs, tensors, work.global_selection)
    sorted_samples = {stream: np.sort(np.concatenate(parts)) for stream, parts in samples.items()}
    for q in sel.queries:
        sample = sorted_samples.get(q.stream)
        if sample is None or not np.isfinite(sample).all():
            continue
        q.window = window_around(*sample_bracket(sample, q.k, stream_numel[q.stream[0]]))


def _samples(config, method, params, plan: MergePlan, inputs: MergeInputs, tensors: list[str], global_selection: bool,
             raw: bool = False):
    """({stream: [magnitudes (float32 numpy) of each sampled block]}, {scope: elements}) for the tensors' selection
    streams: the same evenly spaced rows of every expert, so that the i-th sampled values of the experts are one
    element. raw=True: from the kernels, or (None, None) where they cannot."""
    stream_numel: dict = {}
    for name in tensors:
        scope = scope_of(name, global_selection)
        stream_numel[scope] = stream_numel.get(scope, 0) + plan_tensor(plan, name).numel
    samples: dict = {}
    for name in tensors:
        info, scope = plan_tensor(plan, name), scope_of(name, global_selection)
        if not info.shape:
            continue
        frac = min(1.0, SAMPLE_ROW_STRIDE * SAMPLE_VALUES / stream_numel[scope])
        n_rows = min(info.rows, max(1, math.ceil(info.rows * frac)))
        n_blocks = math.ceil(n_rows / SAMPLE_BLOCK_ROWS)  # blocks of rows: one read per model, one kernel call
        size = math.ceil(n_rows / n_blocks)
        for r in sorted({min(info.rows - size, int((i + 0.5) * info.rows / n_blocks)) for i in range(n_blocks)}):
            unit = Unit(-1, name, r, r + size)
            if raw:
                mags = _raw_magnitudes(config, unit, inputs)
            else:
                mags = _magnitudes(config, method, params, info, unit, inputs, scope)
            if mags is None:
                return None, None
            for i, m in enumerate(mags):
                samples.setdefault((scope, i), []).append(m[::SAMPLE_ROW_STRIDE])
    return samples, stream_numel


def _magnitudes(config, method, params, info, unit: Unit, inputs: MergeInputs, scope: str):
    from mergescale.merge.reader import read_unit

    base, experts = read_unit(inputs, unit, "ignore", convert=True)  # the passes report non-finite values
    ctx = tile_context(config, info, unit, MergeStats(), scope, len(experts))
    return [m.reshape(-1).numpy() for m in method.magnitudes(base, experts, params, ctx)]


def _raw_magnitudes(config, unit: Unit, inputs: MergeInputs):
    from mergescale.merge import kernel_path, kernels

    if inputs.base is None:
        return None
    base, *experts = (c.map_bytes(unit.name, unit.row_start, unit.row_end) for c in inputs.all)
    models = kernel_path.stored_arrays(inputs, unit, base, experts)
    if models is None:
        return None
    return kernels.magnitude_arrays(config.method, config.method_params, kernel_path.unit_context(config, inputs, unit), models)


# ------------------------------------------------------------------------------------------------------------
# Split tensors merged in one pass (per-tensor TIES without a selection pass; see executor.HeldTensor)


@dataclass
class Bracket:
    """Per-expert brackets lo[j] <= threshold_j <= hi[j] of one tensor (very likely, checked by counting), the
    threshold ranks ks[j], and the sample's share of elements with some magnitude inside its bracket."""

    lo: list[float]
    hi: list[float]
    ks: list[int]
    share: float


def held_budget(config, inputs: MergeInputs) -> int:
    """Bytes a held tensor may take (its output rows + listed elements): half a tile per model, what one unit's
    bf16 inputs take (a tile counts float32), so peak memory stays a few tiles whatever the model size."""
    return len(inputs.all) * config.tile_bytes // 2


def held_brackets(config, method, params, plan: MergePlan, inputs: MergeInputs, todo: set[int]) -> dict[str, Bracket]:
    """The split tensors that the merge pass can merge without a selection pass first, with their brackets.

    A tensor qualifies when the method trims per tensor with a fused select-and-merge kernel, its stored and
    output dtypes are ones the kernels read and write, all of its units are still to do (a resumed run has no
    rows of it written), and its merged rows plus the elements the brackets list fit `held_budget`, so that
    peak memory still does not grow with the model."""
    from mergescale.merge import kernels

    ties_kernel = method.kernel is not None and method.kernel.merge == "ties"
    sel = method.selection(params) if ties_kernel and method.row_stats is None else None
    if sel is None or sel.scope == "global" or inputs.base is None or not kernels.available():
        return {}
    n_e, budget = len(inputs.experts), held_budget(config, inputs)
    candidates = []
    for t in plan.tensors:
        units = plan.units_of[t.name]
        ranks = sel.ranks(t.numel) if t.is_float else {}
        if (not t.is_float or len(units) < 2 or any(u.id not in todo for u in units) or len(ranks) != 1
                or None in ranks.values() or plan.out_dtypes[t.name] not in kernels.RAW_CODES
                or {c.tensors[t.name].dtype for c in inputs.all} != {t.dtype} or t.dtype not in kernels.RAW_CODES
                or t.numel * SAFETENSORS_DTYPES[plan.out_dtypes[t.name]][0] > budget):  # too big to sample for
            continue
        candidates.append((t, next(iter(ranks.values()))))
    if not candidates:
        return {}
    samples, _ = _samples(config, method, params, plan, inputs, [t.name for t, _ in candidates], False)
    out: dict[str, Bracket] = {}
    for t, k in candidates:
        parts = [np.concatenate(samples[(t.name, i)]) for i in range(n_e)]
        if not all(np.isfinite(p).all() for p in parts):
            continue  # the selection pass reports them
        lo, hi = zip(*(sample_bracket(np.sort(p), k, t.numel) for p in parts))
        inside = np.zeros(parts[0].shape, dtype=bool)
        for p, a, b in zip(parts, lo, hi):
            if a != b:  # a bracket of one value lists nothing (kernels._ties_kernel)
                inside |= (p >= a) & (p <= b)
        share = float(inside.mean())
        held = t.numel * (SAFETENSORS_DTYPES[plan.out_dtypes[t.name]][0] + share * (4 * n_e + 12))
        if held <= budget:
            out[t.name] = Bracket(list(lo), list(hi), [k] * n_e, share)
    return out


def sums_from(plan: MergePlan, parts: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-tensor sums from per-unit row statistics, concatenated in row order (any tiling, any actor count)."""
    import torch

    from mergescale.merge.torch_math import column_totals

    by_tensor: dict[str, list[Unit]] = {}
    for u in plan.units:
        if u.id in parts:
            by_tensor.setdefault(u.name, []).append(u)
    return {name: column_totals(torch.cat([parts[u.id] for u in units])) for name, units in by_tensor.items()}


def plan_tensor(plan: MergePlan, name: str):
    if not hasattr(plan, "_by_name"):
        plan._by_name = {t.name: t for t in plan.tensors}
    return plan._by_name[name]
