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
longest queue). A batch whose actor dies is simply handed to another actor: units are idempotent (same bytes to
the same place), so a lost actor, a lost node or a killed driver (rerun: the journal skips finished units) never
changes the output. Inputs and the output directory must be on storage every node sees (NFS, Lustre, a PVC).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from mergescale.config import MergeConfig, load_config

# Nothing here imports torch: the driver creates its actors first, and they load torch, numba and the compiled
# kernels (seconds) while the driver validates the inputs from their headers. The driver loads torch itself only
# for a method with a statistics pass (`_statistics`), whose thresholds or sums it computes from the actors'.

log = logging.getLogger(__name__)
BATCH_BYTES = 256 * 10**6  # input bytes per call: small enough for a live progress bar and cheap retries
ACTOR_START_TIMEOUT_S = 120.0
# Testing aid for fault-injection tests: seconds each actor sleeps per unit, so a test can kill mid-merge.
UNIT_DELAY_ENV = "MERGESCALE_UNIT_DELAY_S"


class MergeActor:
    """The Ray actor. Starting one loads torch, numba and the method's compiled kernels; `setup` then gives it the
    validated config and the output, and it works as a MergeWorker (cluster/worker.py). Defined here, in a module
    without torch, so that the driver can create it before the driver has loaded torch itself."""

    def __init__(self, method: str, n_experts: int, use_gpu: bool):
        from mergescale.cluster import worker

        worker.start_process(method, n_experts, warm_kernels=not use_gpu)
        self._worker_cls, self.worker = worker.MergeWorker, None

    def setup(self, config_json: dict, out: str, layout_fingerprint: str, key: str, use_gpu: bool,
              stats_json: dict | None = None) -> dict:
        self.worker = self._worker_cls(config_json, out, layout_fingerprint, key, use_gpu)
        if stats_json is not None:  # a replacement actor joining after the statistics pass
            self.worker.set_stats(stats_json)
        return self.worker.info()

    def selection(self, unit_ids, windows, next_unit=None):
        return self.worker.selection(unit_ids, windows, next_unit)

    def row_stats(self, unit_ids, next_unit=None):
        return self.worker.row_stats(unit_ids, next_unit)

    def set_stats(self, stats_json: dict) -> None:
        self.worker.set_stats(stats_json)

    def merge(self, unit_ids, next_unit=None) -> dict:
        return self.worker.merge(unit_ids, next_unit)

    def flush(self) -> list[int]:
        return self.worker.flush()


@dataclass
class _Slot:
    """An actor, its queue of batches, and what it is doing: `busy` (a call in flight) or `starting` (a
    replacement actor's first call, which resolves once it is placed and has opened the inputs)."""

    index: int
    actor: object
    queue: deque = field(default_factory=deque)
    busy: object = None
    batch: list[int] | None = None
    starting: object = None
    bytes: int = 0
    seconds: float = 0.0
    units: int = 0
    node: str | None = None
    device: str | None = None
    unsynced: list[int] = field(default_factory=list)  # merged and written, not yet reported durable


def balanced_batches(units: list, unit_bytes: dict[int, int], k: int) -> list[deque]:
    """Split units into k queues of batches with nearly equal bytes (largest first onto the lightest queue),
    keeping each queue in file order so actors read sequentially."""
    loads, assigned = [0] * k, [[] for _ in range(k)]
    for u in sorted(units, key=lambda u: -unit_bytes[u.id]):
        i = min(range(k), key=lambda j: loads[j])
        assigned[i].append(u)
        loads[i] += unit_bytes[u.id]
    queues = []
    for mine in assigned:
        mine.sort(key=lambda u: u.id)
        # At least ~8 batches per actor even for small models: progress, journaling and retries stay fine-grained.
        max_units = max(1, -(-len(mine) // 8))
        q, batch, size = deque(), [], 0
        for u in mine:
            if batch and (size + unit_bytes[u.id] > BATCH_BYTES or len(batch) >= max_units):
                q.append(batch)
                batch, size = [], 0
            batch.append(u.id)
            size += unit_bytes[u.id]
        if batch:
            q.append(batch)
        queues.append(q)
    return queues


_ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
               ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)


def _cause(e: Exception) -> Exception:
    """The error an actor's method raised (a MergeInputError naming a file, an OSError from fdatasync), not
    Ray's RayTaskError wrapper around it."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class ActorPool:
    """K merge actors in a placement group; dead actors are replaced, idle actors steal queued batches.

    Made in two steps so that the actors start (seconds of imports each) while the driver validates: creating the
    pool requests the placement group and the actors and returns at once; `start` waits for them and hands them
    the validated config and the output."""

    def __init__(self, config: MergeConfig, workers: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.spec = config.cluster
        self.workers, self.use_gpu = workers, spec.num_gpus > 0
        self.init_args = (config.method, len(config.experts), self.use_gpu)
        self.args = None  # setup's arguments, once the driver has validated the inputs
        self.bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
        have = ray.cluster_resources()
        if any(have.get(r, 0) < n * workers for r, n in self.bundle.items()):
            log.warning("the cluster has %s now; %d workers of %s need more: waiting up to %.0f s for "
                        "resources (autoscaling)", have, workers, self.bundle, spec.placement_timeout_s)
        self.pg = placement_group([self.bundle] * workers, strategy=spec.placement)
        self.remote_cls = ray.remote(MergeActor)
        self.resources = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
        self.name_prefix = f"mergescale-merge-{uuid.uuid4().hex[:10]}"  # named so operators (and tests) can find them
        self.slots = [
            _Slot(i, self.remote_cls.options(
                **self.resources,
                name=f"{self.name_prefix}-{i}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*self.init_args))
            for i in range(workers)
        ]
        self.replacements = 0
        self.stats_ref = None  # once set, every replacement actor gets the statistics before any merge work

    def start(self, config: MergeConfig, out: Path, layout_fingerprint: str, key: str) -> None:
        from mergescale.merge.inputs import MergeInputError

        ready, _ = ray.wait([self.pg.ready()], timeout=self.spec.placement_timeout_s)
        if not ready:
            raise MergeInputError(
                f"cannot place {self.workers} merge workers of {self.bundle} ({self.spec.placement}) on this cluster "
                f"(resources: {ray.cluster_resources()}); lower cluster.workers, num_cpus or num_gpus"
            )
        self.args = (config.model_dump(mode="json", by_alias=True), str(out), layout_fingerprint, key, self.use_gpu)
        try:
            infos = ray.get([s.actor.setup.remote(*self.args) for s in self.slots], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.RayTaskError as e:  # e.g. an actor's node sees other input files: that error, as is
            raise _cause(e) from None
        for s, info in zip(self.slots, infos):
            s.node = info["node"]

    def _replace(self, slot: _Slot) -> None:
        """A fresh actor for a dead one, scheduled anywhere (its bundle may have died with its node)."""
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.replacements += 1
        slot.actor = self.remote_cls.options(**self.resources, name=f"{self.name_prefix}-{slot.index}-r{self.replacements}").remote(*self.init_args)
        slot.starting = slot.actor.setup.remote(*self.args, self.stats_ref)
        slot.node = None

    def set_stats(self, stats_json: dict) -> None:
        self.stats_ref = ray.put(stats_json)
        ray.get([s.actor.set_stats.remote(self.stats_ref) for s in self.slots])

    def run(self, method: str, queues: list[deque], make_args, on_result, max_failures: int) -> None:
        """Call `method(*make_args(batch, first unit of the actor's next batch or None))` on every batch, one call in
        flight per actor; on_result(slot, batch, result).

        A batch whose actor died goes back to the front of that slot's queue (idle actors may steal it) and
        the actor is replaced. Errors raised by the merge code itself (bad data) propagate."""
        for slot, q in zip(self.slots, queues):
            slot.queue = q
        failures = 0

        def dispatch(slot):
            if slot.busy is None and slot.starting is None:
                batch = slot.queue.popleft() if slot.queue else self._steal()
                if batch is not None:
                    upcoming = slot.queue[0][0] if slot.queue else None  # a read-ahead hint for the actor
                    slot.batch, slot.busy = batch, getattr(slot.actor, method).remote(*make_args(batch, upcoming))

        while True:
            for slot in self.slots:
                dispatch(slot)
            waiting = {s.busy: s for s in self.slots if s.busy is not None}
            if not waiting and not any(s.queue for s in self.slots):
                return
            waiting.update({s.starting: s for s in self.slots if s.starting is not None})
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=ACTOR_START_TIMEOUT_S)
            if not done:
                raise RuntimeError(f"no merge worker made progress in {ACTOR_START_TIMEOUT_S:.0f} s")
            slot = waiting[done[0]]
            is_start = slot.starting is not None
            batch = slot.batch
            if is_start:
                slot.starting = None
            else:
                slot.busy, slot.batch = None, None
            try:
                result = ray.get(done[0])
            except _ACTOR_DIED as e:
                failures += 1
                if failures > max_failures:
                    raise RuntimeError(f"merge workers failed {failures} times; last: {e}") from e
                log.warning("merge worker %d died (%s)%s; replacing it", slot.index, type(e).__name__,
                            "" if is_start else f"; its batch of {len(batch)} units is redone")
                if not is_start:
                    slot.queue.appendleft(batch)
                self._requeue_unsynced(slot)
                self._replace(slot)
                continue
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
            dispatch(slot)  # the actor's next batch first: it works while on_result journals (an fsync) this one
            if not is_start:
                on_result(slot, batch, result)

    def _requeue_unsynced(self, slot: _Slot) -> None:
        """A dead actor's rows that were written but whose fdatasync it never confirmed may be lost (with its
        node's page cache): merge them again."""
        if slot.unsynced:
            slot.queue.appendleft(slot.unsynced)
            slot.unsynced = []

    def flush(self) -> list[int]:
        """Wait for every actor's last fdatasync; returns the units it made durable. The unconfirmed units of an
        actor that died meanwhile go back to its queue (run the merge again while any queue is not empty)."""
        pending = {s.actor.flush.remote(): s for s in self.slots if s.unsynced}
        durable = []
        for ref, slot in pending.items():
            try:
                ray.get(ref)
                durable += slot.unsynced
                slot.unsynced = []
            except _ACTOR_DIED as e:
                log.warning("merge worker %d died (%s) before its last rows were durable; they are redone",
                            slot.index, type(e).__name__)
                self._requeue_unsynced(slot)
                self._replace(slot)
            except ray.exceptions.RayTaskError as e:  # the fdatasync itself failed (EIO, ENOSPC): say so
                raise _cause(e) from None
        return durable

    def _steal(self) -> list[int] | None:
        donor = max(self.slots, key=lambda s: len(s.queue))
        return donor.queue.pop() if donor.queue else None

    def shutdown(self) -> None:
        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        ray.util.remove_placement_group(self.pg)


def _ensure_ray(address: str | None, spec) -> bool:
    """Connect to `address` (or use the Ray this process already runs); with none, start an embedded local Ray.
    Returns True when this call connected or started Ray, and so must shut it down: that disconnects from a
    cluster (faster than leaving it to interpreter exit) or stops the embedded Ray."""
    if ray.is_initialized():
        return False
    address = address or spec.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    return True


def run_distributed_merge(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *,
                          workers: int | None = None, address: str | None = None, overwrite: bool = False,
                          progress: bool = True, resume: bool = True) -> dict:
    """Merge on `workers` Ray actors (default: config.cluster.workers). Blocks; returns the manifest."""
    config = load_config(config)
    if workers is not None:
        config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"workers": workers})})
    started = _ensure_ray(address, config.cluster)
    pool = partial = inputs = None
    t0 = time.time()
    try:
        pool = ActorPool(config, config.cluster.workers)  # the actors start while the driver validates below
        from mergescale.merge.inputs import MergeInputError, prepare, progress_bar, unit_read_bytes
        from mergescale.merge.manifest import build_manifest, config_updates, run_key
        from mergescale.merge.method_params import SIGNATURES
        from mergescale.merge.writer import PartialOutput

        config, out, inputs, plan = prepare(config, out, overwrite)  # all validation before anything is written
        key = run_key(config, inputs, plan)
        pool.start(config, out, plan.layout.fingerprint(), key)  # output files only once every actor is placed
        t_start, t0 = time.time() - t0, time.time()
        partial = PartialOutput(out, plan.layout, key)
        done = partial.open(resume=resume)
        k = len(pool.slots)
        unit_bytes = {u.id: unit_read_bytes(inputs, u) for u in plan.units}
        units_by_id = {u.id: u for u in plan.units}

        def durable(unit_ids):  # the output's sha256s advance in the background as rows become final
            for u in unit_ids:
                partial.rows_durable(units_by_id[u].name, units_by_id[u].row_start, units_by_id[u].row_end)

        durable(sorted(done))
        max_failures = 2 * k + config.cluster.max_actor_restarts * k

        def queues(units):
            return balanced_batches(units, unit_bytes, k)

        # -- statistics (only methods that can need them load torch and the statistics code here) --------------
        stats_json, global_thresholds = {"thresholds": {}, "sums": {}}, None
        if SIGNATURES[config.method].statistics:
            stats = _statistics(pool, config, plan, inputs, partial, queues, unit_bytes, units_by_id, max_failures,
                                progress)
            stats_json, global_thresholds = stats.to_json(), stats.global_thresholds()
        t_stats = time.time() - t0
        pool.set_stats(stats_json)

        # -- merge pass ---------------------------------------------------------------------------------------
        todo = [u for u in plan.units if u.id not in done]
        bar = progress_bar(sum(unit_bytes[u.id] for u in todo), f"merge {config.method} on {k} workers", progress)
        unit_nodes: dict[int, str] = {}
        counted: set[int] = set()  # units already on the progress bar (a dead actor's unconfirmed ones are redone)
        warnings: list[str] = []

        def on_durable(unit_ids):
            partial.journal(unit_ids)  # the actor has fdatasync'ed these rows
            durable(unit_ids)

        def on_merged(slot, batch, res):
            warnings.extend(w for w in res["warnings"] if w not in warnings)  # redone units warn again
            on_durable(res["durable"])
            slot.unsynced = res["units"]
            slot.bytes += res["bytes"]
            slot.seconds += res["seconds"]
            slot.units += len(res["units"])
            slot.node, slot.device = res["node"], res["device"]
            for u in res["units"]:
                unit_nodes[u] = res["node"]
            fresh = [u for u in res["units"] if u not in counted]
            counted.update(fresh)
            bar.update(sum(unit_bytes[u] for u in fresh))
            bar.set_postfix_str(f"units {len(partial.done)}/{len(plan.units)}", refresh=False)

        pool.run("merge", queues(todo), lambda b, upcoming: (b, upcoming), on_merged, max_failures)
        while True:
            on_durable(pool.flush())
            if not any(s.queue for s in pool.slots):
                break
            pool.run("merge", [s.queue for s in pool.slots], lambda b, upcoming: (b, upcoming), on_merged, max_failures)
        bar.close()

        # -- commit -------------------------------------------------------------------------------------------
        total_s = time.time() - t0
        per_actor = [
            {"actor": s.index, "node": s.node, "device": s.device, "units": s.units, "bytes_read": s.bytes, "busy_s": round(s.seconds, 3),
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
    except BaseException as e:
        if partial is not None and isinstance(e, MergeInputError):
            partial.abort()  # bad data: nothing worth keeping
        elif partial is not None:
            partial.close()  # keep for resume
        raise
    finally:
        if inputs is not None:
            inputs.close()
        if pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()


def _statistics(pool: ActorPool, config: MergeConfig, plan, inputs, partial, queues, unit_bytes: dict,
                units_by_id: dict, max_failures: int, progress: bool):
    """The statistics passes on the actors (thresholds: 1-3 counting passes; whole-tensor sums: one pass), or the
    statistics a killed run already saved in the partial output. Returns the MergeStats."""
    from mergescale.merge.inputs import progress_bar
    from mergescale.merge.methods import get_method
    from mergescale.merge.statistics import (
        MergeStats, finish_complete_streams, pending_units, sample_windows, statistics_work, sums_from,
        thresholds_from, units_per_scope,
    )

    stats = partial.load_stats(MergeStats.from_json)
    if stats is not None:
        return stats
    stats, k = MergeStats(), len(pool.slots)
    method, params = get_method(config.method), config.method_params
    work = statistics_work(method, params, plan, len(inputs.experts))
    if work.selector is not None:
        sel = work.selector
        sample_windows(config, method, params, plan, inputs, work)  # a few MB read here, on the driver
        pass_no = 0
        while not sel.done:
            pass_no += 1
            todo = pending_units(sel, work.selection_units, work.global_selection)
            bar = progress_bar(sum(unit_bytes[u.id] for u in todo), f"thresholds pass {pass_no} on {k} workers",
                               progress)
            left = units_per_scope(todo, work.global_selection)

            def add_counts(slot, batch, counts, bar=bar, left=left):
                sel.merge_from(counts)  # and finish each stream as soon as all its units are counted
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
                 lambda slot, batch, res: parts.update(res), max_failures)
        stats.sums = sums_from(plan, parts)
    partial.save_stats(stats.to_json())
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
        from mergescale.merge.inputs import MergeInputError

        raise MergeInputError("no output directory: pass out= (or set 'out' in the config)")
    return _merge_task.remote(config.model_dump(mode="json", by_alias=True), str(Path(out).absolute()), workers, overwrite)
