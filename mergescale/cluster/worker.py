"""The merge actor's work: statistics and merge passes over the units the driver hands it (see cluster/merge.py).

Imported only in actor processes (by MergeActor, as it starts). torch loads here only when the actor needs it:
on a GPU, for a method without fused kernels (slerp, breadcrumbs, model_stock), or for a unit the kernels do not
merge. An actor merging with average, task_arithmetic, dare_linear, ties or dare_ties on the CPU runs
merge/kernel_path.py, thresholds included, and never imports torch: ~half of its start, ~180 MB of its memory.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from mergescale.cluster.pool import UNIT_DELAY_ENV
from mergescale.config import MergeConfig
from mergescale.merge import kernel_path, kernels
from mergescale.checkpoint.read import safetensors_dtype
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import MergeInputError, Unit, open_inputs, plan_merge, unit_read_bytes
from mergescale.merge.methods import METHODS
from mergescale.merge.reader import UnitReader, check_merged
from mergescale.checkpoint.write import PartialOutput

_CPUS = 1  # this actor's CPU share, set by start_process


def start_process(method: str, n_experts: int, use_gpu: bool, kernels_merge: bool, selection: bool,
                  stored: str | None = None, out_dtype: str | None = None) -> None:
    """Once per actor process, before any work: use the actor's CPU share (not every core of the node) in the fused
    kernels (and torch), and load what the merge needs (numba's kernels for tiles stored as `stored` (a safetensors
    code; None: unknown, bf16 assumed) written as `out_dtype` (None: the same), compiled on a fresh node; the
    threshold-finding ones if `selection`; torch unless `kernels_merge`: kernel_path.possible for the config) while
    the driver is busy validating."""
    global _CPUS
    _CPUS = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    kernels.set_threads(_CPUS)
    if use_gpu or not kernels_merge:
        _torch()
    stored = stored or "BF16"
    out = safetensors_dtype(out_dtype) if out_dtype else stored
    if not use_gpu and stored in kernels.RAW_CODES and out in kernels.RAW_CODES:
        kernels.warm_up(n_experts, stored, out, methods=[method], selection=selection)


def _torch():
    """torch, imported on first use with this actor's CPU share as its thread count."""
    first = "torch" not in sys.modules
    import torch

    if first:
        torch.set_num_threads(_CPUS)
    return torch


class MergeWorker:
    """What one merge actor does: opens the inputs lazily, holds nothing but the tiles of the unit it is working on."""

    def __init__(self, config_json: dict, out: str, layout_fingerprint: str, key: str, use_gpu: bool):
        self.config = MergeConfig.model_validate(config_json)
        self.params = self.config.method_params
        self.inputs = open_inputs(self.config)
        self.plan = plan_merge(self.config, self.inputs)
        if self.plan.layout.fingerprint() != layout_fingerprint:
            raise MergeInputError(f"actor on {socket.gethostname()} sees different input files than the driver")
        self.units = {u.id: u for u in self.plan.units}
        self.partial = PartialOutput(Path(out), self.plan.layout, key)  # shard files opened on first write
        self.device = "cuda" if use_gpu and _torch().cuda.is_available() else "cpu"
        # On the CPU, the methods with fused kernels run them alone (kernel_path), without torch.
        self.kernel_only = self.device == "cpu" and kernel_path.usable(self.config, self.inputs)
        self.node = ray.get_runtime_context().get_node_id()
        self.delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
        self.stats = None  # a statistics.MergeStats: the driver's, or none (set_stats)
        self.global_sel = False
        if METHODS[self.config.method].needs_statistics(self.params):
            from mergescale.merge.statistics import statistics_work

            self.global_sel = statistics_work(self.config.method, self.params, self.plan, len(self.inputs.experts)).global_selection
        # the digests of the units this actor reads: the driver journals them and proves a resumed run's
        # (merge/input_digests.py)
        self.digests = InputDigests(self.inputs)
        self.reader = UnitReader(self.inputs, self.config.on_nonfinite, self.config.read, raw=self.kernel_only,
                                 digests=self.digests)
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="mergescale-sync")
        self._syncing = None  # (future of the last batch's fdatasync, its unit ids)

    @property
    def method(self):
        """The methods.MergeMethod (the torch definition of the math): loading it loads torch."""
        from mergescale.merge.methods import get_method

        return get_method(self.config.method)

    def _stats(self):
        if self.stats is None:
            from mergescale.merge.statistics import MergeStats

            self.stats = MergeStats()
        return self.stats

    def info(self) -> dict:
        return {"node": self.node, "device": self.device, "pid": os.getpid(), "host": socket.gethostname()}

    def _stream(self, unit_ids: list[int], next_unit: int | None, warnings: list[str] | None = None,
                check: bool = True):
        """(unit, base, experts) of the batch, on this actor's device; reads run one unit ahead, into the next batch."""
        units = [self.units[u] for u in unit_ids]
        for unit, base, experts in self.reader.stream(units, warnings, self.units.get(next_unit), check):
            if self.device != "cpu":
                base = base.to(self.device) if base is not None else None
                experts = [e.to(self.device) for e in experts]
            yield unit, base, experts

    def digests_of(self, unit_ids: list[int]) -> dict[int, bytes]:
        """The input digests of these units that this actor has computed."""
        return {u: self.digests.recorded[u] for u in unit_ids if u in self.digests.recorded}

    def verify(self, unit_ids: list[int], next_unit: int | None = None) -> dict[int, bytes]:
        """Read and hash these units' input rows (a resumed merge proving its journal); their digests."""
        for _ in self.reader.stream([self.units[u] for u in unit_ids], None, self.units.get(next_unit), check=False):
            pass
        return self.digests_of(unit_ids)

    def selection(self, unit_ids: list[int], windows: dict, next_unit: int | None = None) -> dict:
        """This batch's selection counts for the coordinator's windows of the current pass, and the units' input
        digests: {"counts": ..., "digests": ...}."""
        return {"counts": self._selection(unit_ids, windows, next_unit), "digests": self.digests_of(unit_ids)}

    def _selection(self, unit_ids: list[int], windows: dict, next_unit: int | None) -> dict:
        from mergescale.merge.selection import StreamingSelector

        sel = StreamingSelector([])
        sel.use_windows(windows)
        if self.kernel_only:
            return self._kernel_selection(sel, unit_ids, next_unit)
        from mergescale.merge.executor import deferred_check, feed_selection

        on_cpu = self.device == "cpu"  # the fused kernels check for non-finite values as they count
        for unit, base, experts in self._stream(unit_ids, next_unit, check=not on_cpu):
            feed_selection(sel, self.config, self.method, self.params, self.plan, self.global_sel, unit, base, experts,
                           deferred_check(self.inputs, self.config, unit, base, experts, None) if on_cpu else None)
        return sel.sparse_counts()

    def _kernel_selection(self, sel, unit_ids: list[int], next_unit: int | None) -> dict:
        """`selection` on mapped bytes with the kernels; a unit they do not count is read again and counted with
        torch (the executor's way, non-finite policy included)."""
        from mergescale.merge.statistics import scope_of

        units = [self.units[u] for u in unit_ids]
        for unit, base, experts in self.reader.stream(units, None, self.units.get(next_unit), check=False):
            scope = scope_of(unit.name, self.global_sel)
            if not kernel_path.feed_selection(sel, self.config, self.plan, self.inputs, scope, unit, base, experts):
                self._select_with_torch(sel, unit)
        return sel.sparse_counts()

    def _select_with_torch(self, sel, unit: Unit) -> None:
        _torch()
        from mergescale.merge.executor import deferred_check, feed_selection
        from mergescale.merge.reader import read_unit

        base, experts = read_unit(self.inputs, unit, "ignore", convert=False, mapped=True)
        feed_selection(sel, self.config, self.method, self.params, self.plan, self.global_sel, unit, base, experts,
                       deferred_check(self.inputs, self.config, unit, base, experts, None))

    def sample_windows(self) -> dict:
        """{(stream, tag): window}: where each threshold query of the statistics pass should start counting, from a
        sample of evenly spaced rows (statistics.sample_windows, as the single-process executor places them)."""
        from mergescale.merge.statistics import sample_windows, statistics_work

        work = statistics_work(self.config.method, self.params, self.plan, len(self.inputs.experts))
        if work.selector is None:
            return {}
        sample_windows(self.config, None if self.kernel_only else self.method, self.params, self.plan, self.inputs,
                       work, raw=self.kernel_only)
        return {(q.stream, q.tag): q.window for q in work.selector.queries}

    def row_stats(self, unit_ids: list[int], next_unit: int | None = None) -> dict:
        """{"sums": {unit id: its rows' sums}, "digests": the units' input digests}."""
        from mergescale.merge.executor import unit_row_stats

        sums = {unit.id: unit_row_stats(self.method, self.params, base, experts).cpu()
                for unit, base, experts in self._stream(unit_ids, next_unit)}
        return {"sums": sums, "digests": self.digests_of(unit_ids)}

    def set_stats(self, stats_json: dict) -> None:
        if not METHODS[self.config.method].needs_statistics(self.params):
            return  # nothing to set (the driver sends empty statistics), and no torch to load for it
        from mergescale.merge.statistics import MergeStats

        self.stats = MergeStats.from_json(stats_json)
        if self.device != "cpu":
            self.stats.sums = {k: v.to(self.device) for k, v in self.stats.sums.items()}

    def merge(self, unit_ids: list[int], next_unit: int | None = None, hashed: list[int] = ()) -> dict:
        """Merge and write the units; return them, their input digests, and the units of the previous call, now
        durable (the driver journals only those). Each batch's fdatasync runs in the background while the next
        batch merges; `flush` waits for the last one.

        `next_unit`: the first unit of the batch the driver plans to send next; it is read while this batch's last
        unit merges, so the actor does not wait for a read at the start of every batch. `hashed`: units whose
        digests the driver has from this run already (its statistics pass), not hashed again."""
        t0, nbytes, warnings = time.time(), 0, []
        self.digests.fresh.update(hashed)
        self.partial.attach()  # first merge call: the driver created the shard files after placing actors
        units = [self.units[uid] for uid in unit_ids]
        then = self.units.get(next_unit)

        def write(unit, tile):
            return self.partial.write_rows(unit.name, unit.row_start, tile)

        if self.kernel_only:
            merged = kernel_path.merge_stream(self.config, self.plan, self.inputs, self.reader, units, warnings, write,
                                              lambda unit: self._merge_with_torch(unit, warnings), then=then,
                                              thresholds_of=self._thresholds_of)
        elif self.device == "cpu":
            from mergescale.merge.executor import merge_stream

            merged = merge_stream(self.config, self.method, self.params, self.plan, self._stats(), self.global_sel,
                                  self.reader, units, warnings, write, then=then)
        else:
            merged = self._merge_on_device(units, warnings, next_unit)
        for unit in merged:
            nbytes += unit_read_bytes(self.inputs, unit)
            if self.delay:
                time.sleep(self.delay)
        durable = self.flush()
        self._syncing = (self._syncer.submit(self.partial.sync), unit_ids)
        return {"units": unit_ids, "durable": durable, "bytes": nbytes, "seconds": time.time() - t0,
                "node": self.node, "device": self.device, "torch": "torch" in sys.modules, "warnings": warnings,
                "digests": self.digests_of(unit_ids)}

    def _thresholds_of(self, unit: Unit) -> list | None:
        """The statistics pass's thresholds for the unit (whole-model, or its split tensor's), if any."""
        if self.stats is None or not self.stats.thresholds:
            return None
        from mergescale.merge.statistics import scope_of

        return self.stats.thresholds.get(scope_of(unit.name, self.global_sel))

    def _merge_with_torch(self, unit: Unit, warnings: list[str]):
        """A unit the fused kernels did not merge (kernel_path's fallback): read it again with the non-finite
        policy and merge it as the executor does."""
        _torch()
        from mergescale.merge.executor import merge_unit
        from mergescale.merge.reader import read_unit

        base, experts = read_unit(self.inputs, unit, self.config.on_nonfinite, warnings, convert=False, mapped=True)
        return merge_unit(self.config, self.method, self.params, self.plan, self._stats(), self.global_sel, unit,
                          base, experts)

    def flush(self) -> list[int]:
        """Wait for the last batch's fdatasync (raising its error); returns that batch's units."""
        if self._syncing is None:
            return []
        (pending, unit_ids), self._syncing = self._syncing, None
        pending.result()
        return unit_ids

    def _merge_on_device(self, units: list[Unit], warnings: list[str], next_unit: int | None):
        from mergescale.merge.executor import merge_unit

        for unit, base, experts in self._stream([u.id for u in units], next_unit, warnings):
            tile = merge_unit(self.config, self.method, self.params, self.plan, self._stats(), self.global_sel, unit,
                              base, experts).cpu()
            check_merged(self.config, unit, tile, warnings)
            self.partial.write_rows(unit.name, unit.row_start, tile)
            yield unit
