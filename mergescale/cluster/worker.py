"""What one merge actor does over the units the driver hands it: the unit pipeline (mergescale.merge.pipeline) on
its reads, its writes into the shared shard files, their fdatasync in the background.

Imported only in actor processes (by pool.MergeActor, as it starts). torch loads here only when the pipeline
needs it: on a GPU, for a method without fused kernels (slerp, breadcrumbs, model_stock), or for a unit the
kernels decline. An actor merging with average, task_arithmetic, dare_linear, ties or dare_ties on the CPU never
imports it: about half of its start, and a good part of its memory (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from mergescale.checkpoint.read import safetensors_dtype
from mergescale.checkpoint.write import PartialOutput, tile_bytes
from mergescale.config import MergeConfig
from mergescale.errors import MergeInputError
from mergescale.merge import kernels
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import open_inputs, plan_merge, unit_read_bytes
from mergescale.merge.pipeline import MergeJob, count_unit, merge_stream, sample_windows, unit_row_sums
from mergescale.merge.reader import UnitReader
from mergescale.merge.selection import StreamingSelector
from mergescale.merge.statistics import MergeStats, scope_of, statistics_work

# Testing aid for fault-injection tests: seconds each actor sleeps per unit, so a test can kill mid-merge.
UNIT_DELAY_ENV = "MERGESCALE_UNIT_DELAY_S"
_CPUS = 1  # this actor's CPU share, set by start_process


def start_process(method: str, n_experts: int, use_gpu: bool, kernels_merge: bool, selection: bool,
                  stored: str | None = None, out_dtype: str | None = None) -> None:
    """Once per actor process, before any work: use the actor's CPU share (not every core of the node) in the fused
    kernels (and torch), and load what the merge needs (numba's kernels for tiles stored as `stored` (a safetensors
    code; None: unknown, bf16 assumed) written as `out_dtype` (None: the same), compiled on a fresh node; the
    threshold-finding ones if `selection`; torch unless `kernels_merge`: the kernels do all of the method's math)
    while the driver is busy validating."""
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
    """What one merge actor does: opens the inputs, holds nothing but the rows of the unit it is working on."""

    def __init__(self, config_json: dict, out: str, layout_fingerprint: str, key: str, use_gpu: bool):
        config = MergeConfig.model_validate(config_json)
        inputs = open_inputs(config)
        plan = plan_merge(config, inputs)
        if plan.layout.fingerprint() != layout_fingerprint:
            raise MergeInputError(f"actor on {socket.gethostname()} sees different input files than the driver")
        device = "cuda" if use_gpu and _torch().cuda.is_available() else "cpu"
        self.job = MergeJob(config, inputs, plan, device=device)
        self.units = {u.id: u for u in plan.units}
        # shard files opened on first write; none when the rows go back to the driver (merge_rows: a push)
        self.partial = PartialOutput(Path(out), plan.layout, key) if out is not None else None
        self.node = ray.get_runtime_context().get_node_id()
        self.delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
        # the digests of the units this actor reads: the driver journals them and proves a resumed run's
        # (merge/input_digests.py)
        self.digests = InputDigests(inputs)
        self.reader = UnitReader(inputs, config.on_nonfinite, config.read, digests=self.digests)
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="mergescale-sync")
        self._syncing = None  # (future of the last batch's fdatasync, its unit ids)

    def info(self) -> dict:
        return {"node": self.node, "device": self.job.device, "pid": os.getpid(), "host": socket.gethostname()}

    def _stream(self, unit_ids: list[int], next_unit: int | None, warnings: list[str] | None = None,
                check: bool = True):
        """(unit, rows) of the batch; reads run one unit ahead, into the next batch."""
        return self.reader.stream([self.units[u] for u in unit_ids], warnings, self.units.get(next_unit), check)

    def digests_of(self, unit_ids: list[int]) -> dict[int, bytes]:
        """The input digests of these units that this actor has computed."""
        return {u: self.digests.recorded[u] for u in unit_ids if u in self.digests.recorded}

    def verify(self, unit_ids: list[int], next_unit: int | None = None) -> dict[int, bytes]:
        """Read and hash these units' input rows (a resumed merge proving its journal); their digests."""
        for _ in self._stream(unit_ids, next_unit, check=False):
            pass
        return self.digests_of(unit_ids)

    def selection(self, unit_ids: list[int], windows: dict, next_unit: int | None = None) -> dict:
        """This batch's selection counts for the coordinator's windows of the current pass, and the units' input
        digests: {"counts": ..., "digests": ...}."""
        job, sel = self.job, StreamingSelector([])
        sel.use_windows(windows)
        for unit, raws in self._stream(unit_ids, next_unit, check=False):
            scope = scope_of(unit.name, job.global_selection)
            count_unit(job, sel, unit, raws, lambda i: (scope, i), job.deferred_check(unit, raws, None))
        return {"counts": sel.sparse_counts(), "digests": self.digests_of(unit_ids)}

    def sample_windows(self) -> dict:
        """{(stream, tag): window}: where each threshold query of the statistics pass should start counting, from a
        sample of evenly spaced rows (pipeline.sample_windows, as the single-process merge places them)."""
        job = self.job
        work = statistics_work(job.config.method, job.params, job.plan, job.n_experts)
        if work.selector is None:
            return {}
        sample_windows(job, work)
        return {(q.stream, q.tag): q.window for q in work.selector.queries}

    def row_stats(self, unit_ids: list[int], next_unit: int | None = None) -> dict:
        """{"sums": {unit id: its rows' sums}, "digests": the units' input digests}."""
        sums = {unit.id: unit_row_sums(self.job, unit, raws).cpu() for unit, raws in self._stream(unit_ids, next_unit)}
        return {"sums": sums, "digests": self.digests_of(unit_ids)}

    def set_stats(self, stats_json: dict) -> None:
        job = self.job
        if not job.method.needs_statistics(job.params):
            return  # nothing to set (the driver sends empty statistics), and no torch to load for it
        job.stats = MergeStats.from_json(stats_json)
        if job.device != "cpu":
            job.stats.sums = {k: v.to(job.device) for k, v in job.stats.sums.items()}

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

        def write(unit, tile):
            return self.partial.write_rows(unit.name, unit.row_start, tile)

        for unit in merge_stream(self.job, self.reader, units, warnings, write, then=self.units.get(next_unit)):
            nbytes += unit_read_bytes(self.job.inputs, unit)
            if self.delay:
                time.sleep(self.delay)
        durable = self.flush()
        self._syncing = (self._syncer.submit(self.partial.sync), unit_ids)
        return {"units": unit_ids, "durable": durable, "bytes": nbytes, "seconds": time.time() - t0,
                "node": self.node, "device": self.job.device, "torch": "torch" in sys.modules, "warnings": warnings,
                "digests": self.digests_of(unit_ids)}

    def merge_rows(self, unit_ids: list[int], next_unit: int | None = None, hashed: list[int] = ()) -> dict:
        """Merge the units and return their rows instead of writing them (a push: the driver loads them into a
        resident model), each with the sha256 of its bytes taken here, so that the target's check covers the
        transfer too: {"rows": [(unit id, flat uint8 rows, sha256 digest)], and what `merge` returns but
        "durable"}. A batch's rows are this actor's only output memory, until the driver has them."""
        t0, nbytes, warnings, rows = time.time(), 0, [], []
        self.digests.fresh.update(hashed)
        units = [self.units[uid] for uid in unit_ids]

        def keep(unit, tile):
            data = tile_bytes(tile)  # a fresh array per unit (merge_unit never returns a reused buffer)
            rows.append((unit.id, data, hashlib.sha256(data).digest()))

        for unit in merge_stream(self.job, self.reader, units, warnings, keep, then=self.units.get(next_unit)):
            nbytes += unit_read_bytes(self.job.inputs, unit)
            if self.delay:
                time.sleep(self.delay)
        return {"units": unit_ids, "rows": rows, "bytes": nbytes, "seconds": time.time() - t0, "node": self.node,
                "device": self.job.device, "torch": "torch" in sys.modules, "warnings": warnings,
                "digests": self.digests_of(unit_ids)}

    def flush(self) -> list[int]:
        """Wait for the last batch's fdatasync (raising its error); returns that batch's units."""
        if self._syncing is None:
            return []
        (pending, unit_ids), self._syncing = self._syncing, None
        pending.result()
        return unit_ids
