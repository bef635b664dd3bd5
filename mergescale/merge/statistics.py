"""What each tensor's merge needs beyond its own rows, and how it is planned and gathered.

Whole-model TIES thresholds (scope GLOBAL) or per-tensor ones of tensors split into several units, and per-tensor
sums (slerp, model_stock); which units a statistics pass reads; which rows a sample reads to place each threshold
query's first counting window (mergescale.merge.selection); the passes themselves (`gather`), counting down units
so that each stream is finished as soon as all of it has been counted; and which split tensors the merge pass
can merge without a selection pass (held tensors). The reading and counting is the runner's (this process, or
Ray actors), with the unit pipeline's functions (mergescale.merge.pipeline); the bookkeeping here is the same for
both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mergescale.checkpoint.read import SAFETENSORS_DTYPES
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.methods import METHODS
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


def sample_units(plan: MergePlan, tensors: list[str], global_selection: bool) -> tuple[list[tuple[str, Unit]], dict]:
    """([(scope, rows to sample)], {scope: elements}): evenly spaced blocks of rows of the tensors, read alike from
    every expert, so that the i-th sampled values of the experts are one element; about SAMPLE_VALUES magnitudes
    per scope's stream once every SAMPLE_ROW_STRIDE-th is kept (`add_sample`)."""
    stream_numel: dict = {}
    for name in tensors:
        scope = scope_of(name, global_selection)
        stream_numel[scope] = stream_numel.get(scope, 0) + plan_tensor(plan, name).numel
    blocks = []
    for name in tensors:
        info, scope = plan_tensor(plan, name), scope_of(name, global_selection)
        if not info.shape:
            continue
        frac = min(1.0, SAMPLE_ROW_STRIDE * SAMPLE_VALUES / stream_numel[scope])
        n_rows = min(info.rows, max(1, math.ceil(info.rows * frac)))
        n_blocks = math.ceil(n_rows / SAMPLE_BLOCK_ROWS)  # blocks of rows: one read per model, one kernel call
        size = math.ceil(n_rows / n_blocks)
        for r in sorted({min(info.rows - size, int((i + 0.5) * info.rows / n_blocks)) for i in range(n_blocks)}):
            blocks.append((scope, Unit(-1, name, r, r + size)))
    return blocks, stream_numel


def add_sample(samples: dict, scope: str, magnitudes: list[np.ndarray]) -> None:
    """Keep every SAMPLE_ROW_STRIDE-th of each expert's magnitudes of a sampled block."""
    for i, m in enumerate(magnitudes):
        samples.setdefault((scope, i), []).append(m[::SAMPLE_ROW_STRIDE])


def start_windows(work: StatisticsWork, samples: dict, stream_numel: dict) -> None:
    """Start every query at a window around its answer, bracketed from the sample of the tensors it covers, so that
    one counting pass usually finds it exactly. A bracket that misses costs passes, never exactness
    (selection.StreamingSelector starts over); a stream whose sample holds NaN or inf starts from the whole range."""
    sorted_samples = {stream: np.sort(np.concatenate(parts)) for stream, parts in samples.items()}
    for q in work.selector.queries:
        sample = sorted_samples.get(q.stream)
        if sample is None or not np.isfinite(sample).all():
            continue
        q.window = window_around(*sample_bracket(sample, q.k, stream_numel[q.stream[0]]))


def gather(work: StatisticsWork, plan: MergePlan, n_experts: int, count_pass, row_sums) -> MergeStats:
    """The statistics passes of `work`, whoever reads the units: thresholds in one to three counting passes (each
    `count_pass(pass number, units, selector, done)` counts the units' magnitudes into the selector's windows and
    calls done(units) as units are complete, which finishes each scope's streams as soon as all of it is in),
    whole-tensor sums in one (`row_sums(units)` -> {unit id: per-row sums})."""
    stats = MergeStats()
    sel = work.selector
    if sel is not None:
        pass_no = 0
        while not sel.done:
            pass_no += 1
            todo = pending_units(sel, work.selection_units, work.global_selection)
            left = units_per_scope(todo, work.global_selection)

            def done(units, left=left):
                finish_complete_streams(sel, left, units, work.global_selection, n_experts)

            count_pass(pass_no, todo, sel, done)
            sel.finish_pass()
        stats.thresholds = thresholds_from(sel.queries, n_experts)
    if work.sum_units:
        stats.sums = sums_from(plan, row_sums(work.sum_units))
    return stats


# ------------------------------------------------------------------------------------------------------------
# Split tensors merged in one pass (per-tensor TIES without a selection pass; see pipeline.HeldTensor)


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


def held_candidates(config, method, params, plan: MergePlan, inputs: MergeInputs, todo: set[int],
                    kernel_codes) -> list[tuple]:
    """The split tensors that the merge pass may merge without a selection pass first, with their threshold rank:
    the method trims per tensor with the TIES kernel, the tensor's stored and output dtypes are ones the kernels
    read and write (`kernel_codes`), all of its units are still to do (a resumed run has no rows of it written),
    and its merged rows fit `held_budget`, so that peak memory still does not grow with the model."""
    ties_kernel = method.kernel is not None and method.kernel.merge == "ties"
    sel = method.selection(params) if ties_kernel and method.row_stats is None else None
    if sel is None or sel.scope == "global" or inputs.base is None:
        return []
    budget = held_budget(config, inputs)
    candidates = []
    for t in plan.tensors:
        units = plan.units_of[t.name]
        ranks = sel.ranks(t.numel) if t.is_float else {}
        if (not t.is_float or len(units) < 2 or any(u.id not in todo for u in units) or len(ranks) != 1
                or None in ranks.values() or plan.out_dtypes[t.name] not in kernel_codes
                or {c.tensors[t.name].dtype for c in inputs.all} != {t.dtype} or t.dtype not in kernel_codes
                or t.numel * SAFETENSORS_DTYPES[plan.out_dtypes[t.name]][0] > budget):  # too big to sample for
            continue
        candidates.append((t, next(iter(ranks.values()))))
    return candidates


def brackets_from_samples(config, plan: MergePlan, inputs: MergeInputs, candidates: list[tuple],
                          samples: dict) -> dict[str, Bracket]:
    """Each candidate's brackets from its sample, if the rows and the elements they list fit `held_budget`."""
    n_e, budget = len(inputs.experts), held_budget(config, inputs)
    out: dict[str, Bracket] = {}
    for t, k in candidates:
        parts = [np.concatenate(samples[(t.name, i)]) for i in range(n_e)]
        if not all(np.isfinite(p).all() for p in parts):
            continue  # the selection pass reports them
        lo, hi = zip(*(sample_bracket(np.sort(p), k, t.numel) for p in parts))
        inside = np.zeros(parts[0].shape, dtype=bool)
        for p, a, b in zip(parts, lo, hi):
            if a != b:  # a bracket of one value lists nothing (kernels.ties._ties_kernel)
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
