"""The single-process streaming merge, top to bottom.

    open + validate inputs (headers only)  ->  plan units and the output layout  ->  statistics passes
    (whole-model TIES thresholds; whole-tensor stats of tiled tensors)  ->  merge pass: read one unit's rows
    from every model, merge in float32, cast, pwrite to the partial output  ->  commit atomically.

Peak memory is a few tiles per model (see MergePlan.estimated_peak_bytes), independent of model size. The
helpers `merge_unit`, `feed_selection` and `unit_row_stats` are the same code the Ray actors run
(mergescale.cluster.worker), so the two paths give identical bytes; what the statistics are and how their passes
are planned lives in mergescale.merge.statistics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from mergescale.config import MergeConfig
from mergescale.checkpoint.read import release_free_heap, torch_dtype
from mergescale.errors import InputsChanged, MergeInputError
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import (
    MergeInputs, MergePlan, Unit, human_bytes, output_room, prepare, progress_bar, unit_read_bytes,
)
from mergescale.checkpoint.output_dir import is_no_space, mount_point, space_error
from mergescale.merge.manifest import build_manifest, config_updates, run_key
from mergescale.merge import kernels
from mergescale.merge.methods import Method, UnitContext, get_method
from mergescale.merge.torch_math import column_totals
from mergescale.merge.reader import UnitReader, check_finite, checked_writes
from mergescale.merge.selection import KthQuery, StreamingSelector, kth_smallest
from mergescale.merge.statistics import (
    Bracket, MergeStats, finish_complete_streams, held_brackets, held_budget, pending_units, plan_tensor, restrict,
    sample_windows, scope_of, statistics_work, sums_from, thresholds_from, tile_context, units_per_scope,
)
from mergescale.checkpoint.write import PartialOutput, write_behind

log = logging.getLogger(__name__)
JOURNAL_EVERY_S = 10.0  # how often finished units are made durable (fdatasync + journal line)


# ------------------------------------------------------------------------------------------------------------
# Statistics passes: feeding units' magnitudes to the selector (the math of mergescale.merge.statistics)


def feed_selection(selector: StreamingSelector, config, method, params, plan, global_sel: bool, unit: Unit, base,
                   experts, check=None) -> None:
    """Add one unit's magnitudes (per expert) to the counts of the selector's current pass."""
    scope = scope_of(unit.name, global_sel)
    ctx = tile_context(config, plan_tensor(plan, unit.name), unit, MergeStats(), scope, len(experts))
    feed_counts(selector, method, params, ctx, base, experts, lambda i: (scope, i), check)


def feed_counts(selector: StreamingSelector, method: Method, params, ctx, base, experts, stream_of,
                check=None) -> None:
    """One unit's selection counts: from the fused kernel (one pass over the raw tiles for all experts) when it
    handles the unit, else from method.magnitudes chunk by chunk (counts add exactly: chunking never changes them).
    `check()` (the non-finite policy of tiles read unchecked) runs unless the kernel handled the unit, as in
    merge_unit."""
    ws = selector.expert_windows(len(experts), stream_of)
    k = method.kernel
    got = kernels.histograms(method.name, params, ctx, base, experts, ws) if k and k.magnitudes else None
    if got is not None:
        selector.add_expert_counts(stream_of, ws, got)
        return
    if check is not None:
        check()
    for sub, b, es in chunks(ctx, base, experts):
        for i, mags in enumerate(method.magnitudes(b, es, params, sub)):
            selector.add_values(stream_of(i), mags)


# ------------------------------------------------------------------------------------------------------------
# Chunks: the math runs on row slices of a unit small enough to stay in cache

# float32 elements per model in one chunk. Every method is elementwise given its statistics, so merging a unit
# chunk by chunk gives exactly the bytes of merging it whole; but ~10-60 full passes over a 64 MB tile (plus fresh
# pages for every temporary) run several times slower than the same passes over 1 MB chunks that stay in cache.
CHUNK_ELEMS = 1 << 18
# Per-tensor thresholds of a tensor held in one unit: torch.kthvalue (a sort-like selection, ~25 ns per value)
# for small tensors, the two-pass radix select (a few ns per value, same answer) for larger ones.
KTHVALUE_MAX = 1 << 14


def unit_row_stats(method: Method, params, base, experts) -> torch.Tensor:
    """method.row_stats of a unit, chunk by chunk (rows are independent, so the result is the same)."""
    return torch.cat([method.row_stats(b, es, params) for _, b, es in chunks(None, base, experts)])


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def chunks(ctx: UnitContext, base, experts, chunk_elems: int | None = None):
    """Yield (ctx of the chunk, base rows, expert rows) as float32, row slices of about chunk_elems elements.

    Tiles may be float32 or still in their stored dtype (each chunk is converted on its own). Tiles on an
    accelerator are one chunk (its kernels want large tensors)."""
    ref = experts[0]
    if ref.dim() == 0 or ref.device.type != "cpu":
        yield ctx, (_f32(base) if base is not None else None), [_f32(e) for e in experts]
        return
    rows = ref.shape[0]
    row_numel = ref[0].numel() if rows else 1
    step = max(1, (chunk_elems or CHUNK_ELEMS) // max(1, row_numel))
    if step >= rows:
        yield ctx, (_f32(base) if base is not None else None), [_f32(e) for e in experts]
        return
    for r in range(0, rows, step):
        sub = dataclasses.replace(ctx, element_offset=ctx.element_offset + r * row_numel) if ctx is not None else None
        yield (sub, (_f32(base[r:r + step]) if base is not None else None), [_f32(e[r:r + step]) for e in experts])


def fused_select_merge(method: Method, params, weights, ctx: UnitContext, base, experts, out, have_sel: bool) -> bool:
    """Per-tensor thresholds of a single-unit tensor and its merge in one fused pass (kernels.select_and_merge_ties);
    False when the unit needs no inline selection, the method asks for several ranks or has no kernel, or the
    kernel's sample bracket missed: inline_statistics and the merge then run separately (same bytes)."""
    sel = method.selection(params)
    ties_kernel = method.kernel is not None and method.kernel.merge == "ties"
    if not ties_kernel or sel is None or have_sel or method.row_stats is not None:
        return False
    n = experts[0].numel()
    ranks = sel.ranks(n)
    if n <= KTHVALUE_MAX or len(ranks) != 1 or None in ranks.values():
        return False
    ((_, k),) = ranks.items()
    return kernels.select_and_merge_ties(method.name, params, weights, ctx, base, experts, out, [k] * len(experts)) is not None


def inline_statistics(method: Method, params, ctx: UnitContext, base, experts, have_sel: bool) -> UnitContext:
    """Per-tensor statistics of a tensor that is a single unit, from its rows already in memory."""
    updates = {}
    sel = method.selection(params)
    if sel is not None and not have_sel:
        ranks = sel.ranks(experts[0].numel())
        if experts[0].numel() <= KTHVALUE_MAX:
            mags = method.magnitudes(_f32(base) if base is not None else None, [_f32(e) for e in experts], params, ctx)
            updates["thresholds"] = [{tag: kth_smallest(m, k) for tag, k in ranks.items() if k is not None} for m in mags]
        else:
            # The streaming radix select over chunks: exactly kthvalue's answer, without a sort or whole-tile copies.
            selector = StreamingSelector([KthQuery(i, k, tag) for i in range(len(experts)) for tag, k in ranks.items() if k is not None])
            while not selector.done:
                feed_counts(selector, method, params, ctx, base, experts, lambda i: i)
                selector.finish_pass()
            thresholds = [dict() for _ in experts]
            for q in selector.queries:
                thresholds[q.stream][q.tag] = q.value
            updates["thresholds"] = thresholds
    if method.row_stats is not None and ctx.sums is None:
        # row_stats are per row (tiling-independent order), so stacking chunks' rows gives the same totals
        updates["sums"] = column_totals(torch.cat([method.row_stats(b, es, params) for _, b, es in chunks(ctx, base, experts)]))
    if not updates:
        return ctx
    return dataclasses.replace(ctx, **updates)


def merge_unit(config: MergeConfig, method: Method, params, plan: MergePlan, stats: MergeStats, global_sel: bool,
               unit: Unit, base, experts, check=None) -> torch.Tensor:
    """Merge one unit's rows and cast to the output dtype. Integer tensors pass through.

    Float tiles may be float32 or in their stored dtype; the math runs chunk by chunk (see `chunks`). `check()`
    (the non-finite policy, for tiles read unchecked) runs unless a fused kernel merged the unit: a kernel that
    succeeds has seen only finite inputs (it falls back on any NaN or inf)."""
    info = plan_tensor(plan, unit.name)
    out_dtype = torch_dtype(plan.out_dtypes[unit.name])
    if not info.is_float:  # a copy: the input tile's read buffer is reused while this one is being written
        return (base if base is not None else experts[0]).to(out_dtype, copy=True)
    scope = scope_of(unit.name, global_sel)
    ctx = tile_context(config, info, unit, stats, scope, len(experts))
    ref = experts[0]
    out = torch.empty(ref.shape, dtype=out_dtype, device=ref.device)
    have_sel = scope in stats.thresholds
    if fused_select_merge(method, params, config.weights, ctx, base, experts, out, have_sel=have_sel):
        return out
    if check is not None and ((method.selection(params) is not None and not have_sel)
                              or (method.row_stats is not None and ctx.sums is None)):
        check()  # before statistics of this unit's own values, which NaN or inf would make meaningless
        check = None
    ctx = inline_statistics(method, params, ctx, base, experts, have_sel=have_sel)
    if (method.kernel is not None and method.kernel.merge is not None
            and kernels.merge_tile(method.name, params, config.weights, ctx, base, experts, out)):
        return out  # the fused CPU kernel: the same bits as the chunked torch path below
    if check is not None:
        check()
    row_numel = ref[0].numel() if ref.dim() and ref.shape[0] else 1
    for sub, b, es in chunks(ctx, base, experts):
        merged = method.merge(b, es, config.weights, params, sub)
        if ref.dim() == 0 or merged.shape == ref.shape:
            out.copy_(merged)
        else:
            r = (sub.element_offset - ctx.element_offset) // row_numel
            out[r:r + merged.shape[0]].copy_(merged)
    return out


# ------------------------------------------------------------------------------------------------------------
# Passes over units (single process)


def merge_stream(config, method, params, plan: MergePlan, stats: MergeStats, global_sel: bool, reader: UnitReader,
                 units: list[Unit], warnings: list[str], write, then: Unit | None = None,
                 held: dict[str, Bracket] | None = None):
    """Merge units in order, yielding each after its merge: reads run one unit ahead (`reader`; after the last
    unit it reads `then`), writes one unit behind (`write(unit, tile)` on another thread, in unit order:
    writer.write_behind), the math in between. When the generator finishes, every write has returned; a write's
    error is raised at the next unit. The units of a tensor in `held` are merged by a HeldTensor and written
    after its last one."""

    def tiles():
        # Unchecked reads: merge_unit applies the non-finite policy only where a kernel saw NaN or inf (or no
        # kernel ran), which spares a scan of every input byte.
        current = None
        for unit, base, experts in reader.stream(units, warnings, then, check=False):
            if plan.starts_split_tensor(unit):
                # A split tensor: whole tiles (or, held, the whole tensor's rows), where the merge's memory peaks.
                # First return the heap that smaller tiles left free (up to ~200 MB in the 1 GB benchmark).
                release_free_heap()
            if held and unit.name in held:
                if current is None or current.name != unit.name:
                    current = HeldTensor(config, method, params, plan, stats, reader.inputs, unit.name,
                                         held[unit.name], warnings, reader.digests)
                finished = current.add(unit, base, experts)
                if finished:
                    current = None  # its rows live on only in the writes queued below
                yield from finished
                continue
            check = deferred_check(reader.inputs, config, unit, base, experts, warnings)
            yield unit, merge_unit(config, method, params, plan, stats, global_sel, unit, base, experts, check)

    yield from write_behind(tiles(), checked_writes(config, write, warnings))


class HeldTensor:
    """Per-tensor TIES of a tensor split into several units, in the merge pass alone (no selection pass first).

    Each unit is merged against the tensor's sampled brackets (statistics.held_brackets) into the tensor's
    output rows, held here, and the few elements whose trim depends on where in its bracket a threshold lies are
    listed (kernels.bracketed_ties_tile); after the last unit their magnitudes give the exact thresholds, they
    are merged again, and the rows go to the writer. The same bytes as selecting first, one read of the rows
    fewer. A missed bracket, a NaN or inf, or more listed elements than the sample said: the selection pass of
    this tensor runs after all (`_fallback`), so it costs a read, never exactness."""

    def __init__(self, config, method, params, plan: MergePlan, stats: MergeStats, inputs: MergeInputs, name: str,
                 bracket: Bracket, warnings: list[str], digests: InputDigests | None = None):
        self.config, self.method, self.params, self.plan, self.stats = config, method, params, plan, stats
        self.inputs, self.digests = inputs, digests
        self.name, self.bracket, self.warnings = name, bracket, warnings
        self.info = plan_tensor(plan, name)
        self.out = torch.empty(self.info.shape, dtype=torch_dtype(plan.out_dtypes[name]))
        self.units: list[Unit] = []
        self.parts: list | None = []

    def add(self, unit: Unit, base, experts):
        """Merge one unit (in row order); after the last one, return [(unit, its merged rows)] for every unit."""
        self.units.append(unit)
        if self.parts is not None:
            ctx = tile_context(self.config, self.info, unit, self.stats, self.name, len(experts))
            b = self.bracket
            part = kernels.bracketed_ties_tile(self.method.name, self.params, ctx, base, experts,
                                               self.out[unit.row_start:unit.row_end], b.lo, b.hi, b.share)
            self.parts = None if part is None else self.parts + [part]
        if unit.row_end < self.info.rows:
            return []
        b, thresholds = self.bracket, None
        if self.parts is not None:
            thresholds = kernels.finish_bracketed_ties(self.params, self.name, b.lo, b.hi, b.ks, self.parts, self.out)
        self.parts = None
        if thresholds is None:
            self._fallback()
        rows, self.out = [(u, self.out[u.row_start:u.row_end]) for u in self.units], None
        return rows

    def _fallback(self) -> None:
        """The selection pass of this tensor, then its merge unit by unit, with a reader of its own."""
        log.info("tensor %s: sampled threshold brackets missed (or non-finite values); selecting first", self.name)
        inputs = self.inputs
        reader = UnitReader(inputs, self.config.on_nonfinite, self.config.read, digests=self.digests)
        try:
            found = compute_statistics(self.config, self.method, self.params, self.plan, inputs, reader, False, [],
                                       only={self.name})
            self.stats.thresholds.update(found.thresholds)
            for unit, base, experts in reader.stream(self.units, check=False):
                check = deferred_check(inputs, self.config, unit, base, experts, self.warnings)
                tile = merge_unit(self.config, self.method, self.params, self.plan, self.stats, False, unit, base,
                                  experts, check)
                self.out[unit.row_start:unit.row_end].copy_(tile)
        finally:
            reader.close()


def deferred_check(inputs: MergeInputs, config, unit: Unit, base, experts, warnings: list[str] | None):
    """The non-finite policy for one unit read with check=False, for the caller to run when it needs it."""
    return lambda: check_finite(inputs, unit, ([base] if base is not None else []) + experts,
                                config.on_nonfinite, warnings)


def compute_statistics(config, method, params, plan: MergePlan, inputs: MergeInputs, reader: UnitReader, progress: bool,
                       warnings: list[str], skip=frozenset(), only: set[str] | None = None) -> MergeStats:
    """The statistics passes; per-tensor statistics of the tensors in `skip` are left out (merged by HeldTensor),
    and with `only` given, just those tensors' (a HeldTensor's fallback, or a resumed run's)."""
    work = restrict(statistics_work(method.name, params, plan, len(inputs.experts)), skip, only)
    stats = MergeStats()
    if work.selector is not None:
        units = work.selection_units
        what = "whole model" if work.global_selection else f"{len(units)} tiles of split tensors"
        sample_windows(config, method, params, plan, inputs, work)
        pass_no = 0
        while not work.selector.done:
            pass_no += 1
            todo = pending_units(work.selector, units, work.global_selection)
            bar = progress_bar(sum(unit_read_bytes(inputs, u) for u in todo), f"thresholds pass {pass_no} ({what})", progress)
            left = units_per_scope(todo, work.global_selection)
            for unit, base, experts in reader.stream(todo, warnings, check=False):
                feed_selection(work.selector, config, method, params, plan, work.global_selection, unit, base, experts,
                               deferred_check(inputs, config, unit, base, experts, warnings))
                finish_complete_streams(work.selector, left, [unit], work.global_selection, len(inputs.experts))
                bar.update(unit_read_bytes(inputs, unit))
            bar.close()
            work.selector.finish_pass()
        stats.thresholds = thresholds_from(work.selector.queries, len(inputs.experts))
    if work.sum_units:
        parts = {unit.id: unit_row_stats(method, params, base, experts)
                 for unit, base, experts in reader.stream(work.sum_units, warnings)}
        stats.sums = sums_from(plan, parts)
    return stats


# ------------------------------------------------------------------------------------------------------------
# The whole merge


def describe_plan(config: MergeConfig, inputs: MergeInputs, plan: MergePlan) -> str:
    work = statistics_work(config.method, config.method_params, plan, len(inputs.experts))
    passes = "1-3 threshold passes over the whole model (1 when the sampled brackets hold) + " if work.global_selection else ""
    extra = ""
    if work.selection_units and not work.global_selection:
        extra += (f" (+1-3 threshold passes over the {len(work.selection_units)} tiles of split tensors, except those"
                  f" whose thresholds the merge pass finds: rows + listed elements <= {human_bytes(held_budget(config, inputs))})")
    if work.sum_units:
        extra += f" (+1 stats pass over {len(work.sum_units)} tiles of split tensors)"
    lines = [
        f"method            {config.method} {config.method_params.model_dump(by_alias=True)}",
        f"models            {'base + ' if inputs.base is not None else ''}{len(inputs.experts)} experts",
        f"tensors           {len(plan.tensors)} ({sum(1 for t in plan.tensors if t.is_float)} merged, the rest copied)",
        f"units             {len(plan.units)} (tile {human_bytes(config.tile_bytes)} float32 per model)",
        f"passes            {passes}1 merge pass{extra}",
        f"bytes to read     {human_bytes(plan.read_bytes(inputs))} per pass",
        f"bytes to write    {human_bytes(plan.write_bytes)} in {len(plan.layout.shard_names)} shard(s) of <= {human_bytes(config.out_shard_size)}",
        f"output dtype      {config.out_dtype or 'as the base, per tensor'}",
        f"est. peak memory  {human_bytes(plan.estimated_peak_bytes())} per process (independent of model size; lower with tile_mb)",
    ]
    return "\n".join(lines)


def run_merge(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *, overwrite: bool = False,
              progress: bool = True, dry_run: bool = False, resume: bool = True) -> dict:
    """Merge on this process. Returns the manifest (or, with dry_run, {"description": the plan})."""
    config, out, inputs, plan = prepare(config, out, overwrite)
    try:
        key = run_key(config, inputs, plan)
        needed, free = output_room(plan, inputs, out, key)
        if dry_run:
            space = f"{human_bytes(needed)} to write, {human_bytes(free)} free on {mount_point(out)}"
            description = describe_plan(config, inputs, plan) + f"\ndisk space        {space}"
        if needed > free:
            raise space_error(out, needed, free)
        if dry_run:
            return {"dry_run": True, "description": description}
        try:
            return _merge(config, out, inputs, plan, key, overwrite=overwrite, progress=progress, resume=resume)
        except InputsChanged as e:
            if not resume:
                raise
            # the partial output was made from other bytes (and is gone): nothing of it can be used
            log.warning("%s: the inputs changed since the interrupted run (%s): its partial output cannot be used; "
                        "starting over", out, e)
            return _merge(config, out, inputs, plan, key, overwrite=overwrite, progress=progress, resume=False)
    finally:
        inputs.close()


def _merge(config: MergeConfig, out: Path, inputs: MergeInputs, plan: MergePlan, key: str, *, overwrite: bool,
           progress: bool, resume: bool) -> dict:
    """run_merge once: resume a partial output of this run (its recorded input digests proven, else InputsChanged
    with the partial output removed), or start a new one."""
    method, params = get_method(config.method), config.method_params
    warnings: list[str] = []
    t0 = time.time()
    partial = PartialOutput(out, plan.layout, key, direct=config.write == "direct")
    digests = InputDigests(inputs)
    reader = UnitReader(inputs, config.on_nonfinite, config.read, digests=digests)
    try:
        done = partial.open(resume=resume)
        saved = partial.load_stats(MergeStats.from_json)
        if done or saved:
            units_by_id = {u.id: u for u in plan.units}
            digests.merge_recorded(done, units_by_id)
            if saved is not None:
                digests.merge_recorded(saved[1], units_by_id)
            prove_journaled(inputs, reader, [units_by_id[u] for u in sorted(done)], out, len(plan.units), progress)
        todo = [u for u in plan.units if u.id not in done]
        # split tensors whose per-tensor thresholds the merge pass finds itself (HeldTensor), from a sample
        held = held_brackets(config, method, params, plan, inputs, {u.id for u in todo})
        stats = saved[0] if saved is not None else None
        if stats is None:
            stats = compute_statistics(config, method, params, plan, inputs, reader, progress, warnings, skip=set(held))
            partial.save_stats(stats.to_json(), digests.recorded)
        else:  # resumed: a split tensor held last time but not now (some of it written) is selected first
            work = statistics_work(method.name, params, plan, len(inputs.experts))
            todo_ids = {u.id for u in todo}
            missing = {u.name for u in work.selection_units if not work.global_selection and u.id in todo_ids
                       and u.name not in stats.thresholds and u.name not in held}
            if missing:
                found = compute_statistics(config, method, params, plan, inputs, reader, progress, warnings, only=missing)
                stats.thresholds.update(found.thresholds)
                partial.save_stats(stats.to_json(), digests.recorded)
        t_stats = time.time() - t0
        global_sel = statistics_work(method.name, params, plan, len(inputs.experts)).global_selection
        bar = progress_bar(sum(unit_read_bytes(inputs, u) for u in todo), f"merge {config.method}", progress)
        pending, last_sync, tensors_done = [], [time.time()], 0

        def write(unit: Unit, tile: torch.Tensor) -> None:
            # On the writer thread, in unit order: pwrite + hash, and journal only what has been written.
            partial.write_rows(unit.name, unit.row_start, tile)
            pending.append(unit.id)
            if time.time() - last_sync[0] > JOURNAL_EVERY_S:
                partial.mark_done(digests.of(pending))
                pending.clear()
                last_sync[0] = time.time()

        for unit in merge_stream(config, method, params, plan, stats, global_sel, reader, todo, warnings, write,
                                 held=held):
            tensors_done += unit.row_end == plan_tensor(plan, unit.name).rows
            bar.update(unit_read_bytes(inputs, unit))
            bar.set_postfix_str(f"tensors {tensors_done}/{len(plan.tensors)}", refresh=False)
        bar.close()
        if digests.unproven():  # every unit was read: a recorded digest no read confirmed would be a bug
            raise InputsChanged(f"{len(digests.unproven())} recorded input digests were not checked")
        timing = {"statistics_s": round(t_stats, 3), "total_s": round(time.time() - t0, 3),
                  "units_total": len(plan.units), "units_resumed": len(done)}
        manifest = build_manifest(config, inputs, plan, stats.global_thresholds(), timing, warnings)
        return partial.commit(inputs.metadata_source, manifest, config_updates=config_updates(config), overwrite=overwrite)
    except MergeInputError as e:
        # bad data: a rerun would fail the same way, nothing worth keeping; unless the fault is elsewhere
        partial.close() if e.keep_partial else partial.abort()
        raise
    except OSError as e:
        partial.close()
        if is_no_space(e):
            needed, free = output_room(plan, inputs, out, key)
            raise space_error(out, needed, free, during=f"writing {partial.dir}") from None
        raise
    except BaseException:
        partial.close()  # crash or interrupt: keep the partial output so a rerun resumes
        raise
    finally:
        reader.close()


def prove_journaled(inputs: MergeInputs, reader: UnitReader, units: list[Unit], out: Path, total: int,
                    progress: bool) -> None:
    """Read and hash the input rows of a resumed run's journaled units: the reader's digests raise InputsChanged
    unless they are the bytes those units were merged from (merge.input_digests)."""
    if not units:
        return
    nbytes = sum(unit_read_bytes(inputs, u) for u in units)
    log.info("resuming %s: %d of %d units already written; proving their inputs unchanged (reading %s)", out,
             len(units), total, human_bytes(nbytes))
    bar = progress_bar(nbytes, "prove inputs unchanged", progress)
    for unit, _, _ in reader.stream(units, check=False):
        bar.update(unit_read_bytes(inputs, unit))
    bar.close()
