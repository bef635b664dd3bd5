"""The merge actor's work: statistics and merge passes over the units the driver hands it (see cluster/merge.py).

Imported only in actor processes (by MergeActor, as it starts): torch, numba and the merge code load here.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from mergescale.cluster.pool import UNIT_DELAY_ENV
from mergescale.config import MergeConfig
from mergescale.merge import kernels
from mergescale.merge.executor import deferred_check, feed_selection, merge_stream, merge_unit, unit_row_stats
from mergescale.merge.inputs import MergeInputError, Unit, open_inputs, plan_merge, unit_read_bytes
from mergescale.merge.methods import get_method
from mergescale.merge.reader import UnitReader
from mergescale.merge.selection import StreamingSelector
from mergescale.merge.statistics import MergeStats, statistics_work
from mergescale.merge.writer import PartialOutput


def start_process(method: str, n_experts: int, warm_kernels: bool) -> None:
    """Once per actor process, before any work: use the actor's CPU share (not every core of the node) in torch
    and the fused kernels, and load the method's compiled kernels (numba's cache) while the driver is busy."""
    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(cpus)
    kernels.set_threads(cpus)
    if warm_kernels:
        kernels.warm_up(n_experts, methods=[method])


class MergeWorker:
    """What one merge actor does: opens the inputs lazily, holds nothing but the tiles of the unit it is working on."""

    def __init__(self, config_json: dict, out: str, layout_fingerprint: str, key: str, use_gpu: bool):
        self.config = MergeConfig.model_validate(config_json)
        self.method, self.params = get_method(self.config.method), self.config.method_params
        self.inputs = open_inputs(self.config)
        self.plan = plan_merge(self.config, self.inputs)
        if self.plan.layout.fingerprint() != layout_fingerprint:
            raise MergeInputError(f"actor on {socket.gethostname()} sees different input files than the driver")
        self.units = {u.id: u for u in self.plan.units}
        self.partial = PartialOutput(Path(out), self.plan.layout, key)  # shard files opened on first write
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.node = ray.get_runtime_context().get_node_id()
        self.delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
        self.stats = MergeStats()
        self.global_sel = statistics_work(self.method, self.params, self.plan, len(self.inputs.experts)).global_selection
        self.reader = UnitReader(self.inputs, self.config.on_nonfinite, self.config.read)  # reads one unit ahead
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="mergescale-sync")
        self._syncing = None  # (future of the last batch's fdatasync, its unit ids)

    def info(self) -> dict:
        return {"node": self.node, "device": str(self.device), "pid": os.getpid(), "host": socket.gethostname()}

    def _stream(self, unit_ids: list[int], next_unit: int | None, warnings: list[str] | None = None,
                check: bool = True):
        """(unit, base, experts) of the batch, on this actor's device; reads run one unit ahead, into the next batch."""
        units = [self.units[u] for u in unit_ids]
        for unit, base, experts in self.reader.stream(units, warnings, self.units.get(next_unit), check):
            if self.device.type != "cpu":
                base = base.to(self.device) if base is not None else None
                experts = [e.to(self.device) for e in experts]
            yield unit, base, experts

    def selection(self, unit_ids: list[int], windows: dict, next_unit: int | None = None) -> dict:
        """This batch's selection counts for the coordinator's windows of the current pass."""
        sel = StreamingSelector([])
        sel.use_windows(windows)
        on_cpu = self.device.type == "cpu"  # the fused kernels check for non-finite values as they count
        for unit, base, experts in self._stream(unit_ids, next_unit, check=not on_cpu):
            feed_selection(sel, self.config, self.method, self.params, self.plan, self.global_sel, unit, base, experts,
                           deferred_check(self.inputs, self.config, unit, base, experts, None) if on_cpu else None)
        return sel.sparse_counts()

    def row_stats(self, unit_ids: list[int], next_unit: int | None = None) -> dict[int, torch.Tensor]:
        return {unit.id: unit_row_stats(self.method, self.params, base, experts).cpu()
                for unit, base, experts in self._stream(unit_ids, next_unit)}

    def set_stats(self, stats_json: dict) -> None:
        self.stats = MergeStats.from_json(stats_json)
        if self.device.type != "cpu":
            self.stats.sums = {k: v.to(self.device) for k, v in self.stats.sums.items()}

    def merge(self, unit_ids: list[int], next_unit: int | None = None) -> dict:
        """Merge and write the units; return them, and the units of the previous call, now durable (the driver
        journals only those). Each batch's fdatasync runs in the background while the next batch merges; `flush`
        waits for the last one.

        `next_unit`: the first unit of the batch the driver plans to send next; it is read while this batch's last
        unit merges, so the actor does not wait for a read at the start of every batch."""
        t0, nbytes, warnings = time.time(), 0, []
        self.partial.attach()  # first merge call: the driver created the shard files after placing actors
        units = [self.units[uid] for uid in unit_ids]
        if self.device.type == "cpu":
            merged = merge_stream(self.config, self.method, self.params, self.plan, self.stats, self.global_sel,
                                  self.reader, units, warnings,
                                  lambda unit, tile: self.partial.write_rows(unit.name, unit.row_start, tile),
                                  then=self.units.get(next_unit))
        else:
            merged = self._merge_on_device(units, warnings, next_unit)
        for unit in merged:
            nbytes += unit_read_bytes(self.inputs, unit)
            if self.delay:
                time.sleep(self.delay)
        durable = self.flush()
        self._syncing = (self._syncer.submit(self.partial.sync), unit_ids)
        return {"units": unit_ids, "durable": durable, "bytes": nbytes, "seconds": time.time() - t0,
                "node": self.node, "device": str(self.device), "warnings": warnings}

    def flush(self) -> list[int]:
        """Wait for the last batch's fdatasync (raising its error); returns that batch's units."""
        if self._syncing is None:
            return []
        (pending, unit_ids), self._syncing = self._syncing, None
        pending.result()
        return unit_ids

    def _merge_on_device(self, units: list[Unit], warnings: list[str], next_unit: int | None):
        for unit, base, experts in self._stream([u.id for u in units], next_unit, warnings):
            tile = merge_unit(self.config, self.method, self.params, self.plan, self.stats, self.global_sel, unit, base, experts)
            self.partial.write_rows(unit.name, unit.row_start, tile.cpu())
            yield unit
