"""One unit of a merge, from its rows as read to its rows as written: the code every runner (this process, or each
Ray actor) runs, so a unit's bytes do not depend on who merges it.

A unit's rows arrive as their stored bytes, one flat array per model, base first (reader.UnitReader). `merge_unit`:
  not a float tensor     copied from the base (or the first expert)
  thresholds not known   (per-tensor TIES of a tensor that is this one unit) found here: in one pass with the merge
                         (kernels.select_and_merge), else from the unit's magnitudes (`own_thresholds`)
  the method's kernel    where it reads and writes these dtypes on the CPU (kernels.merge)
  otherwise              the torch definition (methods.Method.merge), chunk by chunk, in float32
A kernel that meets NaN or inf declines, and the unit takes the torch path after the non-finite policy. The
statistics passes count a unit's magnitudes the same way (`count_unit`). `merge_stream` is the merge pass over a
list of units: reads one ahead, writes one behind. A tensor split into several units whose per-tensor thresholds
the merge pass finds itself is merged by a `HeldTensor`.

No torch at import: a process merging with the kernels alone never loads it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mergescale.checkpoint.read import release_free_heap, torch_dtype
from mergescale.config import MergeConfig
from mergescale.merge import kernels, statistics
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit
from mergescale.merge.methods import UnitContext, get_method
from mergescale.merge.reader import UnitReader, check_finite, checked_writes, read_rows, tensors_of
from mergescale.merge.selection import KthQuery, StreamingSelector
from mergescale.merge.statistics import Bracket, MergeStats, StatisticsWork, plan_tensor, scope_of

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# float32 elements per model in one chunk of the torch path. Every method is elementwise given its statistics, so
# merging a unit chunk by chunk gives exactly the bytes of merging it whole; but dozens of full passes over a
# large tile (plus fresh pages for every temporary) run several times slower than the same passes over chunks
# that stay in cache.
CHUNK_ELEMS = 1 << 18
# Thresholds of a tensor held in one unit: a selection among all its magnitudes (a sort-like pass) for small
# tensors; the streaming radix select (two counting passes, the same answer) for larger ones.
KTHVALUE_MAX = 1 << 14


@dataclass
class MergeJob:
    """What every unit of one merge shares: the config, inputs and plan, the method, and the statistics found for
    it (thresholds, sums), on the device the torch path runs on."""

    config: MergeConfig
    inputs: MergeInputs
    plan: MergePlan
    stats: MergeStats = field(default_factory=MergeStats)
    device: str = "cpu"

    def __post_init__(self):
        self.method = get_method(self.config.method)
        self.params = self.config.method_params
        sel = self.method.selection(self.params)
        self.global_selection = sel is not None and sel.scope == "global"
        self.n_experts = len(self.inputs.experts)
        self.has_base = self.inputs.base is not None

    def context(self, unit: Unit) -> UnitContext:
        info = plan_tensor(self.plan, unit.name)
        return UnitContext(
            name=unit.name, shape=info.shape, element_offset=unit.row_start * info.row_numel, seed=self.config.seed,
            thresholds=self.stats.thresholds.get(scope_of(unit.name, self.global_selection),
                                                 [dict() for _ in range(self.n_experts)]),
            sums=self.stats.sums.get(unit.name))

    def kernel_models(self, unit: Unit, raws: list[np.ndarray]) -> tuple | None:
        """The rows as the kernels read them (flat arrays of their stored dtype, base first), or None: a dtype the
        kernels do not read, models of different dtypes, or the torch path on an accelerator."""
        codes = {c.tensors[unit.name].dtype for c in self.inputs.all}
        if self.device != "cpu" or len(codes) != 1 or next(iter(codes)) not in kernels.RAW_CODES:
            return None
        dtype = kernels.RAW_CODES[next(iter(codes))]
        return tuple(r.view(dtype) for r in raws)

    def tensors(self, unit: Unit, raws: list[np.ndarray]):
        """(base or None, experts) as torch tensors of their stored dtype (views of the bytes), on the device."""
        tiles = tensors_of(self.inputs, unit, raws)
        if self.device != "cpu":
            tiles = [t.to(self.device) for t in tiles]
        return (tiles[0], tiles[1:]) if self.has_base else (None, tiles)

    def deferred_check(self, unit: Unit, raws: list[np.ndarray], warnings: list[str] | None):
        """The non-finite policy for rows read unchecked, for `merge_unit` to run when it needs to."""
        return lambda: check_finite(self.inputs, unit, raws, self.config.on_nonfinite, warnings)


# ------------------------------------------------------------------------------------------------------------
# One unit


def merge_unit(job: MergeJob, unit: Unit, raws: list[np.ndarray], check=None):
    """The unit's merged rows in the output dtype: a flat numpy array (the kernels', or a copy of a non-float
    tensor's bytes) or a CPU tensor (the torch path). `check()` (the non-finite policy of rows read unchecked) runs
    unless a kernel merged the unit: a kernel that succeeds has seen only finite inputs."""
    info = plan_tensor(job.plan, unit.name)
    if not info.is_float:  # a copy: the rows' read buffer is reused while this one is being written
        return raws[0].copy()
    method, params = job.method, job.params
    out_code = job.plan.out_dtypes[unit.name]
    ctx = job.context(unit)
    models = job.kernel_models(unit, raws)
    dst = None
    if models is not None and out_code in kernels.RAW_CODES:
        dst = np.empty(models[0].shape[0], kernels.RAW_CODES[out_code])
    sel = method.selection(params)
    own_thresholds_needed = sel is not None and scope_of(unit.name, job.global_selection) not in job.stats.thresholds
    own_sums_needed = method.row_stats is not None and ctx.sums is None
    n = (unit.row_end - unit.row_start) * info.row_numel
    if own_thresholds_needed and dst is not None and job.has_base and method.row_stats is None:
        ranks = sel.ranks(n)
        if n > KTHVALUE_MAX and len(ranks) == 1 and None not in ranks.values():
            ((_, k),) = ranks.items()  # one bound to find: the fused select-and-merge, when its sample brackets it
            if kernels.select_and_merge(method, params, ctx, models, dst, [k] * job.n_experts) is not None:
                return dst
    if check is not None and (own_thresholds_needed or own_sums_needed):
        check()  # before statistics of this unit's own values, which NaN or inf would make meaningless
        check = None
    if own_thresholds_needed:
        ctx = dataclasses.replace(ctx, thresholds=own_thresholds(job, unit, raws, ctx, models))
    if own_sums_needed:
        from mergescale.merge.torch_math import column_totals

        ctx = dataclasses.replace(ctx, sums=column_totals(unit_row_sums(job, unit, raws)))
    if dst is not None and kernels.merge(method, params, job.config.weights, ctx, models, job.has_base, dst):
        return dst
    if check is not None:
        check()
    return _torch_merge(job, unit, raws, ctx, out_code)


def _torch_merge(job: MergeJob, unit: Unit, raws: list[np.ndarray], ctx: UnitContext, out_code: str):
    import torch

    base, experts = job.tensors(unit, raws)
    ref = experts[0]
    out = torch.empty(ref.shape, dtype=torch_dtype(out_code), device=ref.device)
    row_numel = ref[0].numel() if ref.dim() and ref.shape[0] else 1
    for sub, b, es in chunks(ctx, base, experts):
        merged = job.method.merge(b, es, job.config.weights, job.params, sub)
        if ref.dim() == 0 or merged.shape == ref.shape:
            out.copy_(merged)
        else:
            r = (sub.element_offset - ctx.element_offset) // row_numel
            out[r:r + merged.shape[0]].copy_(merged)
    return out.cpu()


def own_thresholds(job: MergeJob, unit: Unit, raws: list[np.ndarray], ctx: UnitContext,
                   models: tuple | None) -> list[dict[str, float]]:
    """Per-expert thresholds of a tensor that is this one unit, from its rows in memory: the k-th smallest
    magnitudes directly for a small tensor, by the streaming radix select for a larger one (the same values)."""
    n = (unit.row_end - unit.row_start) * plan_tensor(job.plan, unit.name).row_numel
    ranks = {tag: k for tag, k in job.method.selection(job.params).ranks(n).items() if k is not None}
    if n <= KTHVALUE_MAX:
        mags = unit_magnitudes(job, unit, raws, ctx, models)
        return [{tag: _kth_smallest(m, k) for tag, k in ranks.items()} for m in mags]
    selector = StreamingSelector([KthQuery(i, k, tag) for i in range(job.n_experts) for tag, k in ranks.items()])
    while not selector.done:
        count_unit(job, selector, unit, raws, lambda i: i, ctx=ctx, models=models)
        selector.finish_pass()
    thresholds = [dict() for _ in range(job.n_experts)]
    for q in selector.queries:
        thresholds[q.stream][q.tag] = q.value
    return thresholds


def _kth_smallest(m, k: int) -> float:
    """The k-th smallest (1-based) of a numpy array or tensor of magnitudes: the value the streaming selection
    finds (selection.kth_smallest for a tensor, which also gives NaN inputs the torch path's answer)."""
    if isinstance(m, np.ndarray):
        return float(np.partition(m, k - 1)[k - 1])
    from mergescale.merge.selection import kth_smallest

    return kth_smallest(m, k)


def unit_magnitudes(job: MergeJob, unit: Unit, raws: list[np.ndarray], ctx: UnitContext | None = None,
                    models: tuple | None = None) -> list:
    """Each expert's magnitudes over the unit (flat): the kernels' where they can (numpy), else the method's torch
    `magnitudes` (tensors)."""
    ctx = ctx or job.context(unit)
    models = models if models is not None else job.kernel_models(unit, raws)
    if models is not None and job.has_base:
        got = kernels.magnitudes(job.method, job.params, ctx, models)
        if got is not None:
            return list(got)
    base, experts = job.tensors(unit, raws)
    return [m.reshape(-1) for m in job.method.magnitudes(_f32(base), [_f32(e) for e in experts], job.params, ctx)]


def count_unit(job: MergeJob, selector: StreamingSelector, unit: Unit, raws: list[np.ndarray], stream_of,
               check=None, ctx: UnitContext | None = None, models: tuple | None = None) -> None:
    """Add the unit's magnitudes (expert i is stream `stream_of(i)`) to the counts of the selector's current pass:
    one kernel pass over the stored rows for all experts where the kernels count them, else the torch
    `magnitudes` chunk by chunk (counts add exactly: chunking never changes them). `check()` runs unless the
    kernels counted."""
    ctx = ctx or job.context(unit)
    models = models if models is not None else job.kernel_models(unit, raws)
    ws = selector.expert_windows(job.n_experts, stream_of)
    got = kernels.histograms(job.method, job.params, ctx, models, ws) if models is not None and job.has_base else None
    if got is not None:
        selector.add_expert_counts(stream_of, ws, got)
        return
    if check is not None:
        check()
    base, experts = job.tensors(unit, raws)
    for sub, b, es in chunks(ctx, base, experts):
        for i, mags in enumerate(job.method.magnitudes(b, es, job.params, sub)):
            selector.add_values(stream_of(i), mags)


def unit_row_sums(job: MergeJob, unit: Unit, raws: list[np.ndarray]) -> torch.Tensor:
    """The method's per-row sums of the unit, chunk by chunk (rows are independent, so the result is the same)."""
    import torch

    base, experts = job.tensors(unit, raws)
    return torch.cat([job.method.row_stats(b, es, job.params) for _, b, es in chunks(None, base, experts)])


def _f32(t):
    import torch

    return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)


def chunks(ctx: UnitContext | None, base, experts, chunk_elems: int | None = None):
    """Yield (ctx of the chunk, base rows, expert rows) as float32, row slices of about chunk_elems elements.

    Tiles may be float32 or still in their stored dtype (each chunk is converted on its own). Tiles on an
    accelerator are one chunk (its kernels want large tensors)."""
    ref = experts[0]
    if ref.dim() == 0 or ref.device.type != "cpu":
        yield ctx, _f32(base), [_f32(e) for e in experts]
        return
    rows = ref.shape[0]
    row_numel = ref[0].numel() if rows else 1
    step = max(1, (chunk_elems or CHUNK_ELEMS) // max(1, row_numel))
    if step >= rows:
        yield ctx, _f32(base), [_f32(e) for e in experts]
        return
    for r in range(0, rows, step):
        sub = dataclasses.replace(ctx, element_offset=ctx.element_offset + r * row_numel) if ctx is not None else None
        yield sub, (_f32(base[r:r + step]) if base is not None else None), [_f32(e[r:r + step]) for e in experts]


# ------------------------------------------------------------------------------------------------------------
# The merge pass over units, and what the statistics passes read


def merge_stream(job: MergeJob, reader: UnitReader, units: list[Unit], warnings: list[str], write,
                 then: Unit | None = None, held: dict[str, Bracket] | None = None):
    """Merge units in order, yielding each after its merge: reads run one unit ahead (`reader`; after the last
    unit it reads `then`), writes one unit behind (`write(unit, tile)` on another thread, in unit order, after the
    merged values pass the non-finite policy), the math in between. When the generator finishes, every write has
    returned; a write's error is raised at the next unit. The units of a tensor in `held` are merged by a
    HeldTensor and written after its last one."""

    def tiles():
        # Unchecked reads: merge_unit applies the non-finite policy only where a kernel saw NaN or inf (or no
        # kernel ran), which spares a scan of every input byte.
        current = None
        for unit, raws in reader.stream(units, warnings, then, check=False):
            if job.plan.starts_split_tensor(unit):
                # A split tensor: whole tiles (or, held, the whole tensor's rows), where the merge's memory peaks.
                # First return the heap that smaller tiles left free.
                release_free_heap()
            if held and unit.name in held:
                if current is None or current.name != unit.name:
                    current = HeldTensor(job, unit.name, held[unit.name], warnings, reader.digests)
                finished = current.add(unit, raws)
                if finished:
                    current = None  # its rows live on only in the writes queued below
                yield from finished
                continue
            yield unit, merge_unit(job, unit, raws, job.deferred_check(unit, raws, warnings))

    yield from write_behind(tiles(), checked_writes(job.config, write, warnings))


def write_behind(tiles, write):
    """For each (unit, tile) of `tiles` (a generator, pulled as this one is): `write(unit, tile)` on a thread while
    the next tile is made, then yield the unit. One write in flight, so memory stays one output tile over and a
    write's error surfaces at the next unit; when this finishes, every write has returned."""
    with ThreadPoolExecutor(1, thread_name_prefix="mergescale-write") as writer:
        in_flight = None
        for unit, tile in tiles:
            if in_flight is not None:
                in_flight.result()
            in_flight = writer.submit(write, unit, tile)
            yield unit
        if in_flight is not None:
            in_flight.result()


def sample_windows(job: MergeJob, work: StatisticsWork) -> None:
    """Start every threshold query of `work` at a window around its answer, from the magnitudes of a sample of
    evenly spaced rows of the tensors it covers (a few MB read): one counting pass then usually finds it."""
    tensors = sorted({u.name for u in work.selection_units}, key=[t.name for t in job.plan.tensors].index)
    statistics.start_windows(work, *_sample(job, tensors, job.global_selection))


def held_brackets(job: MergeJob, todo: set[int]) -> dict[str, Bracket]:
    """The split tensors that the merge pass can merge without a selection pass first (statistics.held_candidates),
    with their brackets from a sample of their rows."""
    codes = kernels.RAW_CODES if kernels.available() else {}
    candidates = statistics.held_candidates(job.config, job.method, job.params, job.plan, job.inputs, todo, codes)
    if not candidates:
        return {}
    samples, _ = _sample(job, [t.name for t, _ in candidates], False)
    return statistics.brackets_from_samples(job.config, job.plan, job.inputs, candidates, samples)


def _sample(job: MergeJob, tensors: list[str], global_selection: bool) -> tuple[dict, dict]:
    blocks, stream_numel = statistics.sample_units(job.plan, tensors, global_selection)
    samples: dict = {}
    for scope, unit in blocks:  # the passes report non-finite values; a sample that holds them is not used
        mags = unit_magnitudes(job, unit, read_rows(job.inputs, unit, mapped=job.config.read == "mmap"))
        statistics.add_sample(samples, scope, [m if isinstance(m, np.ndarray) else m.cpu().numpy() for m in mags])
    return samples, stream_numel


def local_statistics(job: MergeJob, reader: UnitReader, work: StatisticsWork, warnings: list[str],
                     progress: bool = False, what: str = "") -> MergeStats:
    """The statistics passes of `work` on this process's reads (statistics.gather)."""
    from mergescale.merge.inputs import progress_bar, unit_read_bytes

    def count_pass(pass_no: int, units: list[Unit], selector: StreamingSelector, done) -> None:
        bar = progress_bar(sum(unit_read_bytes(job.inputs, u) for u in units), f"thresholds pass {pass_no}{what}",
                           progress)
        for unit, raws in reader.stream(units, warnings, check=False):
            scope = scope_of(unit.name, job.global_selection)
            count_unit(job, selector, unit, raws, lambda i: (scope, i), job.deferred_check(unit, raws, warnings))
            done([unit])
            bar.update(unit_read_bytes(job.inputs, unit))
        bar.close()

    def row_sums(units: list[Unit]) -> dict:
        return {unit.id: unit_row_sums(job, unit, raws) for unit, raws in reader.stream(units, warnings)}

    if work.selector is not None:
        sample_windows(job, work)
    return statistics.gather(work, job.plan, job.n_experts, count_pass, row_sums)


class HeldTensor:
    """Per-tensor TIES of a tensor split into several units, in the merge pass alone (no selection pass first).

    Each unit is merged against the tensor's sampled brackets (`held_brackets`) into the tensor's output rows, held
    here, and the few elements whose trim depends on where in its bracket a threshold lies are listed
    (kernels.bracketed_tile); after the last unit their magnitudes give the exact thresholds, they are merged
    again, and the rows go to the writer. The same bytes as selecting first, one read of the rows fewer. A missed
    bracket, a NaN or inf, or more listed elements than the sample said: the selection pass of this tensor runs
    after all (`_fallback`), so it costs a read, never exactness."""

    def __init__(self, job: MergeJob, name: str, bracket: Bracket, warnings: list[str],
                 digests: InputDigests | None = None):
        self.job, self.name, self.bracket, self.warnings, self.digests = job, name, bracket, warnings, digests
        self.info = plan_tensor(job.plan, name)
        self.row_numel = self.info.row_numel
        self.out = np.empty(self.info.numel, kernels.RAW_CODES[job.plan.out_dtypes[name]])
        self.units: list[Unit] = []
        self.parts: list | None = []

    def _rows(self, unit: Unit) -> np.ndarray:
        return self.out[unit.row_start * self.row_numel:unit.row_end * self.row_numel]

    def add(self, unit: Unit, raws: list[np.ndarray]):
        """Merge one unit (in row order); after the last one, return [(unit, its merged rows)] for every unit."""
        job = self.job
        self.units.append(unit)
        if self.parts is not None:
            models = job.kernel_models(unit, raws)
            b = self.bracket
            part = None if models is None else kernels.bracketed_tile(
                job.method, job.params, job.context(unit), models, self._rows(unit), b.lo, b.hi, b.share)
            self.parts = None if part is None else self.parts + [part]
        if unit.row_end < self.info.rows:
            return []
        b, thresholds = self.bracket, None
        if self.parts is not None:
            thresholds = kernels.finish_bracketed(job.params, self.name, b.lo, b.hi, b.ks, self.parts, self.out)
        self.parts = None
        if thresholds is None:
            self._fallback()
        rows, self.out = [(u, self._rows(u)) for u in self.units], None
        return rows

    def _fallback(self) -> None:
        """The selection pass of this tensor, then its merge unit by unit, with a reader of its own."""
        log.info("tensor %s: sampled threshold brackets missed (or non-finite values); selecting first", self.name)
        job = self.job
        reader = UnitReader(job.inputs, job.config.on_nonfinite, job.config.read, digests=self.digests)
        try:
            work = statistics.restrict(statistics.statistics_work(job.config.method, job.params, job.plan,
                                                                  job.n_experts), only={self.name})
            job.stats.thresholds.update(local_statistics(job, reader, work, []).thresholds)
            for unit, raws in reader.stream(self.units, check=False):
                tile = merge_unit(job, unit, raws, job.deferred_check(unit, raws, self.warnings))
                self._rows(unit)[:] = tile if isinstance(tile, np.ndarray) else _bits(tile)
        finally:
            reader.close()


def _bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 or float32 CPU tensor's values as the kernels store them (flat; bf16 as its uint16 bits)."""
    import torch

    flat = t.contiguous().reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else flat.numpy()
