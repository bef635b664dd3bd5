"""The merge on this process (the driver's default runner): one reader one unit ahead, the math, one writer one unit
behind, each shard written front to back (O_DIRECT with config.write: direct) and hashed as it is written.

Peak memory is a few tiles per model (MergePlan.estimated_peak_bytes), independent of model size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mergescale.checkpoint.write import PartialOutput
from mergescale.config import load_config
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import Unit, human_bytes, progress_bar, unit_read_bytes
from mergescale.merge.pipeline import MergeJob, held_brackets, local_statistics, merge_stream
from mergescale.merge.reader import UnitReader
from mergescale.merge.statistics import Bracket, MergeStats, plan_tensor

log = logging.getLogger(__name__)
JOURNAL_EVERY_S = 10.0  # how often finished units are made durable (fdatasync + journal line)


class LocalRunner:
    """driver.Runner on this process."""

    writes_direct = True

    def begin(self, config):
        return load_config(config)

    def start(self, config, out, inputs, plan, key) -> None:
        pass

    def attach(self, job: MergeJob, digests: InputDigests) -> None:
        self.job = job
        self.reader = UnitReader(job.inputs, job.config.on_nonfinite, job.config.read, digests=digests)

    def prove(self, units: list[Unit], out: Path, progress: bool) -> None:
        """Read and hash the input rows of a resumed run's journaled units: the reader's digests raise InputsChanged
        unless they are the bytes those units were merged from (merge.input_digests)."""
        if not units:
            return
        inputs = self.job.inputs
        nbytes = sum(unit_read_bytes(inputs, u) for u in units)
        log.info("resuming %s: %d of %d units already written; proving their inputs unchanged (reading %s)", out,
                 len(units), len(self.job.plan.units), human_bytes(nbytes))
        bar = progress_bar(nbytes, "prove inputs unchanged", progress)
        for unit, _ in self.reader.stream(units, check=False):
            bar.update(unit_read_bytes(inputs, unit))
        bar.close()

    def held_tensors(self, todo: set[int]) -> dict[str, Bracket]:
        return held_brackets(self.job, todo)

    def statistics(self, work, warnings: list[str], progress: bool) -> MergeStats:
        what = " (whole model)" if work.global_selection else f" ({len(work.selection_units)} tiles of split tensors)"
        return local_statistics(self.job, self.reader, work, warnings, progress, what)

    def merge(self, units: list[Unit], stats_json: dict, held: dict[str, Bracket], partial: PartialOutput,
              warnings: list[str], progress: bool) -> None:
        job = self.job
        job.stats = MergeStats.from_json(stats_json)
        digests = self.reader.digests
        bar = progress_bar(sum(unit_read_bytes(job.inputs, u) for u in units), f"merge {job.config.method}", progress)
        pending, last_sync, tensors_done = [], [time.time()], 0

        def write(unit: Unit, tile) -> None:
            # On the writer thread, in unit order: pwrite + hash, and journal only what has been written.
            partial.write_rows(unit.name, unit.row_start, tile)
            pending.append(unit.id)
            if time.time() - last_sync[0] > JOURNAL_EVERY_S:
                partial.mark_done(digests.of(pending))
                pending.clear()
                last_sync[0] = time.time()

        for unit in merge_stream(job, self.reader, units, warnings, write, held=held):
            tensors_done += unit.row_end == plan_tensor(job.plan, unit.name).rows
            bar.update(unit_read_bytes(job.inputs, unit))
            bar.set_postfix_str(f"tensors {tensors_done}/{len(job.plan.tensors)}", refresh=False)
        bar.close()

    def timing(self, statistics_s: float, total_s: float, units_total: int, units_resumed: int) -> dict:
        return {"statistics_s": round(statistics_s, 3), "total_s": round(total_s, 3), "units_total": units_total,
                "units_resumed": units_resumed}

    def manifest_extra(self) -> None:
        return None

    def report(self, progress: bool) -> None:
        pass

    def detach(self) -> None:
        self.reader.close()

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass
