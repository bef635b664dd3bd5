"""Distributed merge on Ray: K actors each read, merge and write their own row slices.

The flow mirrors the single-process executor (mergescale.merge.executor) and calls the same functions for the
math, so the output is byte-identical for any number of actors:

    driver: place and start the actors (they load torch and the kernels meanwhile)
    driver: validate + plan (headers only, no torch)  ->  create the partial output (shard files with headers)
    actors: statistics passes on their units -> histograms / row sums  ->  driver adds them, sends thresholds
    actors: merge pass, pwrite rows into the shared shard files, fdatasync in the background  ->  the next call
            reports them durable  ->  driver journals them
    driver: commit (index, manifest, atomic rename)

Work is handed out in small batches from per-actor queues balanced by bytes (an idle actor steals from the
longest queue; cluster/pool.py). A batch whose actor dies is simply handed to another actor: units are
idempotent (same bytes to the same place), so a lost actor, a lost node or a killed driver (rerun: the journal
skips finished units) never changes the output. Inputs and the output directory must be on storage every node
sees (NFS, Lustre, a PVC).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from mergescale.cluster.pool import ActorPool, balanced_batches
from mergescale.cluster.session import ensure_ray
from mergescale.config import MergeConfig, load_config, with_cluster

# Nothing here imports torch: the driver creates its actors first, and they load torch, numba and the compiled
# kernels (seconds) while the driver validates the inputs from their headers. Thresholds need none of it here
# either: an actor samples their first windows, the actors count, the driver adds their counts (numpy). The driver
# loads torch only to add up whole-tensor row sums (slerp, model_stock split into several units).

log = logging.getLogger(__name__)


def run_distributed_merge(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *,
                          workers: int | None = None, address: str | None = None, overwrite: bool = False,
                          progress: bool = True, resume: bool = True) -> dict:
    """Merge on `workers` Ray actors (default: config.cluster.workers). Blocks; returns the manifest."""
    config = with_cluster(load_config(config), workers=workers)
    ensure_ray(address or config.cluster.address, log_to_driver=True)
    pool = inputs = None
    t0 = time.time()
    try:
        pool = ActorPool(config, config.cluster.workers)  # the actors start while the driver validates below
        from mergescale.errors import InputsChanged
        from mergescale.merge.inputs import output_room, prepare
        from mergescale.merge.manifest import run_key
        from mergescale.checkpoint.output_dir import space_error

        config, out, inputs, plan = prepare(config, out, overwrite)  # all validation before anything is written
        key = run_key(config, inputs, plan)
        needed, free = output_room(plan, inputs, out, key)
        if needed > free:
            raise space_error(out, needed, free)
        pool.start(config, out, plan.layout.fingerprint(), key)  # output files only once every actor is placed
        t_start = time.time() - t0
        try:
            return _merge(pool, config, out, inputs, plan, key, overwrite, progress, resume, t_start)
        except InputsChanged as e:
            if not resume:
                raise
            log.warning("%s: the inputs changed since the interrupted run (%s): its partial output cannot be used; "
                        "starting over", out, e)
            pool, old = None, pool
            old.shutdown(wait=True)  # none of its actors may write into the new partial output
            pool = ActorPool(config, config.cluster.workers)
            pool.start(config, out, plan.layout.fingerprint(), key)
            return _merge(pool, config, out, inputs, plan, key, overwrite, progress, False, t_start)
    finally:
        if inputs is not None:
            inputs.close()
        if pool is not None:
            pool.shutdown()


def _merge(pool: ActorPool, config: MergeConfig, out: Path, inputs, plan, key: str, overwrite: bool, progress: bool,
           resume: bool, t_start: float) -> dict:
    """The merge on started actors, into a new or (resume) a resumed partial output, whose recorded input digests
    the actors' reads prove: InputsChanged, the partial output removed, when they do not (merge/input_digests.py)."""
    from mergescale.errors import InputsChanged, MergeInputError
    from mergescale.merge.input_digests import InputDigests
    from mergescale.merge.inputs import human_bytes, output_room, progress_bar, unit_read_bytes
    from mergescale.merge.manifest import build_manifest, config_updates
    from mergescale.merge.methods import METHODS
    from mergescale.checkpoint.output_dir import is_no_space, space_error
    from mergescale.checkpoint.write import PartialOutput

    t0 = time.time()
    partial = PartialOutput(out, plan.layout, key)
    digests = InputDigests(inputs)
    try:
        done = partial.open(resume=resume)
        k = len(pool.slots)
        unit_bytes = {u.id: unit_read_bytes(inputs, u) for u in plan.units}
        units_by_id = {u.id: u for u in plan.units}

        def add_digests(found: dict):  # the actors' digests of what they read; InputsChanged where one differs
            for u, d in found.items():
                digests.add(units_by_id[u], d)

        def durable(unit_ids):  # the output's sha256s advance in the background as rows become final
            for u in unit_ids:
                partial.rows_durable(units_by_id[u].name, units_by_id[u].row_start, units_by_id[u].row_end)

        max_failures = 2 * k + config.cluster.max_actor_restarts * k

        def queues(units):
            return balanced_batches(units, unit_bytes, k)

        saved = partial.load_stats(lambda stats_json: stats_json)
        digests.merge_recorded(done, units_by_id)
        if saved is not None:
            digests.merge_recorded(saved[1], units_by_id)
        if done:  # prove the journaled units' inputs before trusting any of them
            todo_bytes = sum(unit_bytes[u] for u in done)
            log.info("resuming %s: %d of %d units already written; proving their inputs unchanged (reading %s on %d "
                     "workers)", out, len(done), len(plan.units), human_bytes(todo_bytes), k)
            bar = progress_bar(todo_bytes, f"prove inputs unchanged on {k} workers", progress)
            pool.run("verify", queues([units_by_id[u] for u in sorted(done)]), lambda b, upcoming: (b, upcoming),
                     lambda slot, batch, found: (add_digests(found), bar.update(sum(unit_bytes[u] for u in batch))),
                     max_failures)
            bar.close()
        durable(sorted(done))

        # -- statistics (only methods that can need them load the statistics code here) ------------------------
        stats_json, global_thresholds = {"thresholds": {}, "sums": {}}, None
        if METHODS[config.method].needs_statistics(config.method_params):
            from mergescale.merge.statistics import GLOBAL

            stats_json = saved[0] if saved is not None else None
            if stats_json is None:
                stats = _statistics(pool, config, plan, inputs, queues, unit_bytes, units_by_id, max_failures, progress,
                                    add_digests)
                stats_json = stats.to_json()
                partial.save_stats(stats_json, digests.recorded)
            thresholds = stats_json["thresholds"]
            global_thresholds = {GLOBAL: thresholds[GLOBAL]} if GLOBAL in thresholds else None
        t_stats = time.time() - t0
        pool.set_stats(stats_json)

        # -- merge pass ---------------------------------------------------------------------------------------
        todo = [u for u in plan.units if u.id not in done]
        bar = progress_bar(sum(unit_bytes[u.id] for u in todo), f"merge {config.method} on {k} workers", progress)
        unit_nodes: dict[int, str] = {}
        counted: set[int] = set()  # units already on the progress bar (a dead actor's unconfirmed ones are redone)
        warnings: list[str] = []

        def on_durable(unit_ids):
            partial.journal(digests.of(unit_ids))  # the actor has fdatasync'ed these rows
            durable(unit_ids)

        def on_merged(slot, batch, res):
            add_digests(res["digests"])
            warnings.extend(w for w in res["warnings"] if w not in warnings)  # redone units warn again
            on_durable(res["durable"])
            slot.unsynced = res["units"]
            slot.bytes += res["bytes"]
            slot.seconds += res["seconds"]
            slot.units += len(res["units"])
            slot.node, slot.device, slot.torch = res["node"], res["device"], res["torch"]
            for u in res["units"]:
                unit_nodes[u] = res["node"]
            fresh = [u for u in res["units"] if u not in counted]
            counted.update(fresh)
            bar.update(sum(unit_bytes[u] for u in fresh))
            bar.set_postfix_str(f"units {len(partial.done)}/{len(plan.units)}", refresh=False)

        def merge_args(batch, upcoming):  # units hashed in this run's statistics pass are not hashed again
            return batch, upcoming, [u for u in batch if u in digests.fresh]

        pool.run("merge", queues(todo), merge_args, on_merged, max_failures)
        while True:
            on_durable(pool.flush())
            if not any(s.queue for s in pool.slots):
                break
            pool.run("merge", [s.queue for s in pool.slots], merge_args, on_merged, max_failures)
        bar.close()
        if digests.unproven():  # every unit was read: a recorded digest no read confirmed would be a bug
            raise InputsChanged(f"{len(digests.unproven())} recorded input digests were not checked")

        # -- commit -------------------------------------------------------------------------------------------
        total_s = time.time() - t0
        per_actor = [
            {"actor": s.index, "node": s.node, "device": s.device, "loaded_torch": s.torch, "units": s.units, "bytes_read": s.bytes, "busy_s": round(s.seconds, 3),
             "MB_per_s": round(s.bytes / 1e6 / s.seconds, 1) if s.seconds else None}
            for s in pool.slots
        ]
        timing = {"actor_start_s": round(t_start, 3), "statistics_s": round(t_stats, 3), "total_s": round(total_s + t_start, 3), "units_total": len(plan.units),
                  "units_resumed": len(done), "actor_replacements": pool.replacements}
        extra = {"distributed": {"workers": k, "placement": config.cluster.placement, "actors": per_actor,
                                 "unit_nodes": {str(u): n for u, n in sorted(unit_nodes.items())}}}
        manifest = build_manifest(config, inputs, plan, global_thresholds, timing, warnings, extra)
        manifest = partial.commit(inputs.metadata_source, manifest, config_updates=config_updates(config), overwrite=overwrite)
        if progress:
            print_actor_summary(per_actor)
        return manifest
    except MergeInputError as e:
        partial.close() if e.keep_partial else partial.abort()  # bad data: nothing worth keeping
        raise
    except OSError as e:
        partial.close()  # keep for resume
        if is_no_space(e):
            needed, free = output_room(plan, inputs, out, key)
            raise space_error(out, needed, free, during=f"writing {partial.dir}") from None
        raise
    except BaseException:
        partial.close()  # keep for resume
        raise


def _statistics(pool: ActorPool, config: MergeConfig, plan, inputs, queues, unit_bytes: dict, units_by_id: dict,
                max_failures: int, progress: bool, add_digests):
    """The statistics passes on the actors (thresholds: 1-3 counting passes; whole-tensor sums: one pass). Returns
    the MergeStats; `add_digests` gets the input digests of the units the actors read."""
    from mergescale.merge.inputs import progress_bar
    from mergescale.merge.statistics import (
        MergeStats, finish_complete_streams, pending_units, statistics_work, sums_from, thresholds_from,
        units_per_scope,
    )

    stats, k = MergeStats(), len(pool.slots)
    work = statistics_work(config.method, config.method_params, plan, len(inputs.experts))
    if work.selector is not None:
        sel = work.selector
        windows = pool.sample_windows()  # a few MB read by one actor: each query starts near its answer
        for q in sel.queries:
            q.window = windows.get((q.stream, q.tag), q.window)
        pass_no = 0
        while not sel.done:
            pass_no += 1
            todo = pending_units(sel, work.selection_units, work.global_selection)
            bar = progress_bar(sum(unit_bytes[u.id] for u in todo), f"thresholds pass {pass_no} on {k} workers",
                               progress)
            left = units_per_scope(todo, work.global_selection)

            def add_counts(slot, batch, res, bar=bar, left=left):
                add_digests(res["digests"])
                sel.merge_from(res["counts"])  # and finish each stream as soon as all its units are counted
                finish_complete_streams(sel, left, [units_by_id[u] for u in batch], work.global_selection,
                                        len(inputs.experts))
                bar.update(sum(unit_bytes[u] for u in batch))

            windows = sel.windows()
            pool.run("selection", queues(todo), lambda b, upcoming, ws=windows: (b, ws, upcoming), add_counts,
                     max_failures)
            bar.close()
            sel.finish_pass()
        stats.thresholds = thresholds_from(sel.queries, len(inputs.experts))
    if work.sum_units:
        parts: dict = {}  # unit id -> its rows' sums
        pool.run("row_stats", queues(work.sum_units), lambda b, upcoming: (b, upcoming),
                 lambda slot, batch, res: (add_digests(res["digests"]), parts.update(res["sums"])), max_failures)
        stats.sums = sums_from(plan, parts)
    return stats


def print_actor_summary(per_actor: list[dict]) -> None:
    from mergescale.merge.inputs import human_bytes

    print(f"{'actor':>5}  {'node':<14}{'units':>7}{'read':>12}{'busy s':>9}{'MB/s':>9}")
    for a in per_actor:
        print(f"{a['actor']:>5}  {str(a['node'])[:12]:<14}{a['units']:>7}{human_bytes(a['bytes_read']):>12}"
              f"{a['busy_s']:>9.1f}{(a['MB_per_s'] or 0):>9.1f}")


@ray.remote(num_cpus=0)
def _merge_task(config_json: dict, out: str, workers: int | None, overwrite: bool) -> dict:
    return run_distributed_merge(config_json, out, workers=workers, overwrite=overwrite, progress=False)


def merge_async(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *, workers: int | None = None,
                overwrite: bool = False):
    """Non-blocking form for use inside a Ray program: returns an ObjectRef of the manifest.

    The coordinator runs as a zero-CPU Ray task that starts the merge actors; `ray.get(ref)` waits for it.
    Ray must already be initialized by the caller.
    """
    if not ray.is_initialized():
        raise RuntimeError("merge_async needs a running Ray (call ray.init first); use run_distributed_merge otherwise")
    config = load_config(config)
    out = out or config.out
    if out is None:
        from mergescale.errors import MergeInputError

        raise MergeInputError("no output directory: pass out= (or set 'out' in the config)")
    return _merge_task.remote(config.model_dump(mode="json", by_alias=True), str(Path(out).absolute()), workers, overwrite)
