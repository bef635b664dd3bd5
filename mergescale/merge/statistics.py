"""What each tensor's merge needs beyond its own rows, and how it is planned and gathered.

Whole-model TIES thresholds (scope GLOBAL) or per-tensor ones of tensors split into several units, and per-tensor
sums (model_stock); which units a statistics pass reads; the sample of rows that places each threshold query's
first counting window (mergescale.merge.selection); and counting down units so that each stream is finished as
soon as all of it has been counted. Used by the single-process executor and by the Ray coordinator alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mergescale.config import MergeConfig
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.methods import MergeMethod, TileContext, column_totals
from mergescale.merge.reader import read_unit
from mergescale.merge.selection import KthQuery, StreamingSelector, sample_bracket, window_around

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
        return cls(d["thresholds"], {k: torch.tensor(v, dtype=torch.float64) for k, v in d["sums"].items()})


@dataclass
class StatisticsWork:
    """What must be read before the merge pass: units for the two selection passes, units for row sums."""

    global_selection: bool
    selection_units: list[Unit]
    sum_units: list[Unit]
    selector: StreamingSelector | None


def statistics_work(method: MergeMethod, params, plan: MergePlan, n_experts: int) -> StatisticsWork:
    """Whole-model thresholds need every float unit; per-tensor statistics of tensors split into several units
    need those units. A tensor that is a single unit gets its statistics inline, from the rows read to merge it."""
    sel = method.selection(params)
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
        sum_units=[u for t in tiled for u in plan.units_of[t.name]] if method.row_stats is not None else [],
        selector=StreamingSelector(queries) if queries else None,
    )


def selection_queries(method: MergeMethod, params, scope: str, n: int, n_experts: int) -> list[KthQuery]:
    ranks = method.selection(params).ranks(n)
    return [KthQuery((scope, i), k, tag) for i in range(n_experts) for tag, k in ranks.items() if k is not None]


def thresholds_from(queries: list[KthQuery], n_experts: int) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    for q in queries:
        scope, i = q.stream
        out.setdefault(scope, [dict() for _ in range(n_experts)])[i][q.tag] = q.value
    return out


def scope_of(name: str, global_selection: bool) -> str:
    return GLOBAL if global_selection else name


def tile_context(config: MergeConfig, info, unit: Unit, stats: MergeStats, scope: str, n_experts: int) -> TileContext:
    return TileContext(
        name=unit.name,
        shape=info.shape,
        element_offset=unit.row_start * info.row_numel,
        seed=config.seed,
        thresholds=stats.thresholds.get(scope, [dict() for _ in range(n_experts)]),
        stats=stats.sums.get(unit.name),
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


def sample_windows(config, method, params, plan: MergePlan, inputs: MergeInputs, work: "StatisticsWork") -> None:
    """Start every query at a window around its answer, bracketed from a sample of evenly spaced rows of the
    tensors it covers (a few MB read), so that one counting pass usually finds it exactly. A bracket that
    misses costs passes, never exactness (selection.StreamingSelector starts over)."""
    sel = work.selector
    tensors = sorted({u.name for u in work.selection_units}, key=[t.name for t in plan.tensors].index)
    stream_numel: dict = {}
    for name in tensors:
        scope = scope_of(name, work.global_selection)
        stream_numel[scope] = stream_numel.get(scope, 0) + plan_tensor(plan, name).numel
    samples: dict = {}
    for name in tensors:
        info, scope = plan_tensor(plan, name), scope_of(name, work.global_selection)
        if not info.shape:
            continue
        frac = min(1.0, SAMPLE_ROW_STRIDE * SAMPLE_VALUES / stream_numel[scope])
        n_rows = min(info.rows, max(1, math.ceil(info.rows * frac)))
        n_blocks = math.ceil(n_rows / SAMPLE_BLOCK_ROWS)  # blocks of rows: one read per model, one torch call
        size = math.ceil(n_rows / n_blocks)
        for r in sorted({min(info.rows - size, int((i + 0.5) * info.rows / n_blocks)) for i in range(n_blocks)}):
            unit = Unit(-1, name, r, r + size)
            base, experts = read_unit(inputs, unit, "ignore", convert=True)  # the passes report them
            ctx = tile_context(config, info, unit, MergeStats(), scope, len(experts))
            for i, mags in enumerate(method.magnitudes(base, experts, params, ctx)):
                samples.setdefault((scope, i), []).append(mags.reshape(-1)[::SAMPLE_ROW_STRIDE])
    sorted_samples = {stream: torch.sort(torch.cat(parts)).values for stream, parts in samples.items()}
    for q in sel.queries:
        sample = sorted_samples.get(q.stream)
        if sample is None or not torch.isfinite(sample).all():
            continue
        q.window = window_around(*sample_bracket(sample, q.k, stream_numel[q.stream[0]]))


def sums_from(plan: MergePlan, parts: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole-tensor sums from per-unit row statistics, concatenated in row order (any tiling, any actor count)."""
    by_tensor: dict[str, list[Unit]] = {}
    for u in plan.units:
        if u.id in parts:
            by_tensor.setdefault(u.name, []).append(u)
    return {name: column_totals(torch.cat([parts[u.id] for u in units])) for name, units in by_tensor.items()}


def plan_tensor(plan: MergePlan, name: str):
    if not hasattr(plan, "_by_name"):
        plan._by_name = {t.name: t for t in plan.tensors}
    return plan._by_name[name]
