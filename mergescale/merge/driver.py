"""A merge from its config to its committed output, written once for whoever reads and merges the units: this
process (merge.local.LocalRunner) or Ray actors (cluster.merge.RayRunner).

    prepare        config, inputs opened and validated from their headers, the plan; nothing written yet
    room           the output's file system has room for what is left to write (a dry run stops here)
    open           the partial output: new, or a resumed one (its journaled units, their input digests)
    prove          the journaled units' inputs are the bytes they were merged from (runner.prove)
    statistics     thresholds and sums the method needs (runner.statistics), unless a resumed run saved them
    merge pass     every unit merged, written, made durable and journaled (runner.merge)
    commit         manifest, index, metadata files; atomic rename into place
`merge_into` runs the same steps into a push sink (a resident model's parameters) in place of the output directory.
An error in the inputs removes the partial output; a crash or an interrupt keeps it for a rerun to resume; inputs
that changed since the partial output was made discard it and the merge starts over.

A runner provides the steps that read or merge rows; what differs between runners is said on the Runner class.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

from mergescale.checkpoint.output_dir import is_no_space, mount_point, space_error
from mergescale.checkpoint.write import PartialOutput
from mergescale.config import MergeConfig
from mergescale.errors import InputsChanged, MergeInputError
from mergescale.merge.input_digests import InputDigests
from mergescale.merge.inputs import MergeInputs, MergePlan, Unit, human_bytes, output_room, prepare, prepare_inputs
from mergescale.merge.manifest import build_manifest, config_updates, run_key
from mergescale.merge.methods import get_method
from mergescale.merge.pipeline import MergeJob
from mergescale.merge.statistics import GLOBAL, Bracket, MergeStats, held_budget, restrict, statistics_work

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Who reads and merges a merge's units. The driver calls, in order: begin (before validation), start (once
    validated), then per attempt attach, prove, held_tensors, statistics, merge, timing, detach; restart before a
    second attempt; report after the commit; close at the end, whatever happened.

    What differs between runners, all of it here:
    - writes_direct: the local runner writes each shard front to back with O_DIRECT (config.write); Ray actors
      write their rows in any order, buffered, and the driver journals what they report durable.
    - held_tensors: only the local runner merges split tensors whose per-tensor thresholds the merge pass finds
      itself (pipeline.HeldTensor: one read of them fewer); that needs all of a tensor's units in one process,
      in order, which a Ray actor's batches are not. The Ray runner selects their thresholds first (same bytes).
    - the Ray runner adds the actors' start to the timing and a "distributed" section to the manifest.
    """

    writes_direct: bool

    def begin(self, config) -> MergeConfig: ...
    def start(self, config: MergeConfig, out: Path, inputs: MergeInputs, plan: MergePlan, key: str) -> None: ...
    def attach(self, job: MergeJob, digests: InputDigests) -> None: ...
    def prove(self, units: list[Unit], out: Path, progress: bool) -> None: ...
    def held_tensors(self, todo: set[int]) -> dict[str, Bracket]: ...
    def statistics(self, work, warnings: list[str], progress: bool) -> MergeStats: ...
    def merge(self, units: list[Unit], stats_json: dict, held: dict[str, Bracket], partial: PartialOutput,
              warnings: list[str], progress: bool) -> None: ...
    def timing(self, statistics_s: float, total_s: float, units_total: int, units_resumed: int) -> dict: ...
    def manifest_extra(self) -> dict | None: ...
    def report(self, progress: bool) -> None: ...
    def detach(self) -> None: ...
    def restart(self) -> None: ...
    def close(self) -> None: ...


def run_merge(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *, runner: Runner | None = None,
              overwrite: bool = False, progress: bool = True, dry_run: bool = False, resume: bool = True) -> dict:
    """Merge `config` into `out` with `runner` (default: this process). Returns the manifest (or, with dry_run,
    {"dry_run": True, "description": the plan})."""
    if runner is None:
        from mergescale.merge.local import LocalRunner

        runner = LocalRunner()
    inputs = None
    try:
        config = runner.begin(config)
        config, out, inputs, plan = prepare(config, out, overwrite)  # all validation before anything is written
        key = run_key(config, inputs, plan)
        needed, free = output_room(plan, inputs, out, key)
        if dry_run:
            space = f"{human_bytes(needed)} to write, {human_bytes(free)} free on {mount_point(out)}"
            description = describe_plan(config, inputs, plan) + f"\ndisk space        {space}"
        if needed > free:
            raise space_error(out, needed, free)
        if dry_run:
            return {"dry_run": True, "description": description}
        runner.start(config, out, inputs, plan, key)
        try:
            return _merge(runner, config, out, inputs, plan, key, overwrite, progress, resume,
                          _partial_output(runner, config, out, plan, key))
        except InputsChanged as e:
            if not resume:
                raise
            # the partial output was made from other bytes (and is gone): nothing of it can be used
            log.warning("%s: the inputs changed since the interrupted run (%s): its partial output cannot be used; "
                        "starting over", out, e)
            runner.restart()
            return _merge(runner, config, out, inputs, plan, key, overwrite, progress, False,
                          _partial_output(runner, config, out, plan, key))
    finally:
        if inputs is not None:
            inputs.close()
        runner.close()


def merge_into(config: MergeConfig | dict | str | Path, sink, *, runner: Runner | None = None,
               progress: bool = True) -> dict:
    """Merge `config` into `sink` (merge.push.PushOutput: a resident model's parameters) instead of an output
    directory, on this process or with `runner` (cluster.merge.RayPushRunner: Ray actors send the rows here): the
    same validation, statistics and merge pass as run_merge; no resume (nothing is durable), no disk space needed.
    Returns the manifest, with the pushed tensors' digests under "pushed"."""
    if runner is None:
        from mergescale.merge.local import LocalRunner

        runner = LocalRunner()
    inputs = None
    try:
        config = runner.begin(config)
        config, inputs, plan = prepare_inputs(config)
        sink.start(config, plan)  # the target checks the plan's tensors against what it holds: nothing pushed yet
        key = run_key(config, inputs, plan)
        runner.start(config, None, inputs, plan, key)
        return _merge(runner, config, None, inputs, plan, key, False, progress, False, sink)
    finally:
        if inputs is not None:
            inputs.close()
        runner.close()


def _partial_output(runner: Runner, config: MergeConfig, out: Path, plan: MergePlan, key: str) -> PartialOutput:
    return PartialOutput(out, plan.layout, key, direct=runner.writes_direct and config.write == "direct")


def _merge(runner: Runner, config: MergeConfig, out: Path | None, inputs: MergeInputs, plan: MergePlan, key: str,
           overwrite: bool, progress: bool, resume: bool, partial) -> dict:
    """One attempt: resume a partial output of this run (its recorded input digests proven, else InputsChanged with
    the partial output removed), or start a new one. `partial`: a PartialOutput, or a push sink with its methods."""
    t0 = time.time()
    method, params = get_method(config.method), config.method_params
    job = MergeJob(config, inputs, plan)
    digests = InputDigests(inputs)
    warnings: list[str] = []
    runner.attach(job, digests)
    try:
        done = partial.open(resume=resume)
        saved = partial.load_stats(lambda stats_json: stats_json)
        units_by_id = {u.id: u for u in plan.units}
        digests.merge_recorded(done, units_by_id)
        if saved is not None:
            digests.merge_recorded(saved[1], units_by_id)
        runner.prove([units_by_id[u] for u in sorted(done)], out, progress)  # before any of them is trusted
        todo = [u for u in plan.units if u.id not in done]
        todo_ids = {u.id for u in todo}
        held = runner.held_tensors(todo_ids)
        stats_json = {"thresholds": {}, "sums": {}}
        if method.needs_statistics(params):
            work = statistics_work(config.method, params, plan, len(inputs.experts))
            stats_json = saved[0] if saved is not None else None
            if stats_json is None:
                stats_json = runner.statistics(restrict(work, skip=set(held)), warnings, progress).to_json()
                partial.save_stats(stats_json, digests.recorded)
            else:  # resumed: a split tensor held last time but not now (some of it written) is selected first
                missing = {u.name for u in work.selection_units if not work.global_selection and u.id in todo_ids
                           and u.name not in stats_json["thresholds"] and u.name not in held}
                if missing:
                    found = runner.statistics(restrict(work, only=missing), warnings, progress)
                    stats_json["thresholds"].update(found.thresholds)
                    partial.save_stats(stats_json, digests.recorded)
        t_stats = time.time() - t0
        runner.merge(todo, stats_json, held, partial, warnings, progress)
        if digests.unproven():  # every unit was read: a recorded digest no read confirmed would be a bug
            raise InputsChanged(f"{len(digests.unproven())} recorded input digests were not checked")
        timing = runner.timing(t_stats, time.time() - t0, len(plan.units), len(done))
        thresholds = stats_json["thresholds"]
        global_thresholds = {GLOBAL: thresholds[GLOBAL]} if GLOBAL in thresholds else None
        manifest = build_manifest(config, inputs, plan, global_thresholds, timing, warnings, runner.manifest_extra())
        manifest = partial.commit(inputs.metadata_source, manifest, config_updates=config_updates(config),
                                  overwrite=overwrite)
        runner.report(progress)
        return manifest
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
        runner.detach()


def describe_plan(config: MergeConfig, inputs: MergeInputs, plan: MergePlan) -> str:
    work = statistics_work(config.method, config.method_params, plan, len(inputs.experts))
    passes = "1-3 threshold passes over the whole model (1 when the sampled brackets hold) + " \
        if work.global_selection else ""
    extra = ""
    if work.selection_units and not work.global_selection:
        extra += (f" (+1-3 threshold passes over the {len(work.selection_units)} tiles of split tensors, except those"
                  f" whose thresholds the merge pass finds: rows + listed elements <= "
                  f"{human_bytes(held_budget(config, inputs))})")
    if work.sum_units:
        extra += f" (+1 stats pass over {len(work.sum_units)} tiles of split tensors)"
    lines = [
        f"method            {config.method} {config.method_params.model_dump(by_alias=True)}",
        f"models            {'base + ' if inputs.base is not None else ''}{len(inputs.experts)} experts",
        f"tensors           {len(plan.tensors)} ({sum(1 for t in plan.tensors if t.is_float)} merged, the rest copied)",
        f"units             {len(plan.units)} (tile {human_bytes(config.tile_bytes)} float32 per model)",
        f"passes            {passes}1 merge pass{extra}",
        f"bytes to read     {human_bytes(plan.read_bytes(inputs))} per pass",
        f"bytes to write    {human_bytes(plan.write_bytes)} in {len(plan.layout.shard_names)} shard(s) of <= "
        f"{human_bytes(config.out_shard_size)}",
        f"output dtype      {config.out_dtype or 'as the base, per tensor'}",
        f"est. peak memory  {human_bytes(plan.estimated_peak_bytes())} per process (independent of model size; lower "
        "with tile_mb)",
    ]
    return "\n".join(lines)
