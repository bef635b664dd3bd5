"""The merge on K Ray actors: the driver of mergescale.merge.driver with a runner whose units are read, merged and
written by actors (cluster/pool.py places and replaces them, cluster/worker.py is what each runs), so the output is
byte-identical to the single-process merge for any number of actors.

    driver: place and start the actors (they load the kernels, and torch if needed, meanwhile)
    driver: validate + plan (headers only, no torch)  ->  create the partial output  ->  hand the actors the plan
    actors: statistics passes on their units -> counts / row sums  ->  driver adds them, sends the statistics
    actors: merge pass, pwrite rows into the shared shard files, fdatasync in the background  ->  the next call
            reports them durable  ->  driver journals them
    driver: commit (index, manifest, atomic rename)

Work is handed out in small batches from per-actor queues balanced by bytes (an idle actor steals from the
longest queue). A batch whose actor dies is handed to another actor: units are idempotent (same bytes to the same
place), so a lost actor, a lost node or a killed driver (rerun: the journal skips finished units) never changes
the output. Inputs and the output directory must be on storage every node sees (NFS, Lustre, a PVC).

Nothing here imports torch: the driver creates its actors first, and they load numba, the compiled kernels and,
if needed, torch while the driver validates the inputs from their headers. Thresholds need none of it here
either: an actor samples their first windows, the actors count, the driver adds their counts (numpy). The driver
loads torch only to add up whole-tensor row sums (slerp, model_stock split into several units).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from mergescale.cluster.pool import ActorPool, balanced_batches
from mergescale.cluster.session import ensure_ray
from mergescale.config import MergeConfig, load_config, with_cluster

log = logging.getLogger(__name__)


def run_distributed_merge(config: MergeConfig | dict | str | Path, out: str | Path | None = None, *,
                          workers: int | None = None, address: str | None = None, overwrite: bool = False,
                          progress: bool = True, resume: bool = True) -> dict:
    """Merge on `workers` Ray actors (default: config.cluster.workers). Blocks; returns the manifest."""
    from mergescale.merge.driver import run_merge

    return run_merge(config, out, runner=RayRunner(workers, address), overwrite=overwrite, progress=progress,
                     resume=resume)


class RayRunner:
    """mergescale.merge.driver.Runner on Ray actors (what differs from the local runner: driver.Runner)."""

    writes_direct = False

    def __init__(self, workers: int | None = None, address: str | None = None):
        self.workers, self.address = workers, address
        self.pool: ActorPool | None = None

    def begin(self, config) -> MergeConfig:
        config = with_cluster(load_config(config), workers=self.workers)
        ensure_ray(self.address or config.cluster.address, log_to_driver=True)
        self.t0 = time.time()
        self.pool = ActorPool(config, config.cluster.workers)  # the actors start while the driver validates
        return config

    def start(self, config: MergeConfig, out: Path, inputs, plan, key: str) -> None:
        self.config, self.out, self.inputs, self.plan, self.key = config, out, inputs, plan, key
        self.pool.start(config, out, plan.layout.fingerprint(), key)  # output files only once every actor is placed
        self.t_start = time.time() - self.t0
        from mergescale.merge.inputs import unit_read_bytes

        self.unit_bytes = {u.id: unit_read_bytes(inputs, u) for u in plan.units}
        self.units_by_id = {u.id: u for u in plan.units}

    def restart(self) -> None:
        old, self.pool = self.pool, None
        old.shutdown(wait=True)  # none of its actors may write into the new partial output
        self.pool = ActorPool(self.config, self.config.cluster.workers)
        self.pool.start(self.config, self.out, self.plan.layout.fingerprint(), self.key)

    def attach(self, job, digests) -> None:
        self.digests, self.partial = digests, None
        k = len(self.pool.slots)
        self.max_failures = 2 * k + self.config.cluster.max_actor_restarts * k

    def _queues(self, units):
        return balanced_batches(units, self.unit_bytes, len(self.pool.slots))

    def _add_digests(self, found: dict) -> None:
        """The actors' digests of what they read; InputsChanged where one differs from a recorded one."""
        for u, d in found.items():
            self.digests.add(self.units_by_id[u], d)

    def _bytes(self, unit_ids) -> int:
        return sum(self.unit_bytes[u] for u in unit_ids)

    def prove(self, units: list, out: Path, progress: bool) -> None:
        from mergescale.merge.inputs import human_bytes, progress_bar

        if units:
            k = len(self.pool.slots)
            nbytes = self._bytes(u.id for u in units)
            log.info("resuming %s: %d of %d units already written; proving their inputs unchanged (reading %s on %d "
                     "workers)", out, len(units), len(self.plan.units), human_bytes(nbytes), k)
            bar = progress_bar(nbytes, f"prove inputs unchanged on {k} workers", progress)
            self.pool.run("verify", self._queues(units), lambda b, upcoming: (b, upcoming),
                          lambda slot, batch, found: (self._add_digests(found), bar.update(self._bytes(batch))),
                          self.max_failures)
            bar.close()
        self.journaled = units  # their rows are durable: the output's sha256s take them in when `merge` starts

    def held_tensors(self, todo: set[int]) -> dict:
        return {}

    def statistics(self, work, warnings: list[str], progress: bool):
        """The statistics passes on the actors (statistics.gather): an actor samples the first windows, every actor
        counts its batches, the driver adds their counts; whole-tensor sums in one pass."""
        from mergescale.merge.inputs import progress_bar
        from mergescale.merge.statistics import gather

        k = len(self.pool.slots)
        if work.selector is not None:
            windows = self.pool.sample_windows()  # a few MB read by one actor: each query starts near its answer
            for q in work.selector.queries:
                q.window = windows.get((q.stream, q.tag), q.window)

        def count_pass(pass_no, units, selector, done):
            bar = progress_bar(self._bytes(u.id for u in units), f"thresholds pass {pass_no} on {k} workers", progress)

            def add_counts(slot, batch, res):
                self._add_digests(res["digests"])
                selector.merge_from(res["counts"])  # and finish each stream as soon as all its units are counted
                done([self.units_by_id[u] for u in batch])
                bar.update(self._bytes(batch))

            windows = selector.windows()
            self.pool.run("selection", self._queues(units), lambda b, upcoming: (b, windows, upcoming), add_counts,
                          self.max_failures)
            bar.close()

        def row_sums(units) -> dict:
            parts: dict = {}  # unit id -> its rows' sums
            self.pool.run("row_stats", self._queues(units), lambda b, upcoming: (b, upcoming),
                          lambda slot, batch, res: (self._add_digests(res["digests"]), parts.update(res["sums"])),
                          self.max_failures)
            return parts

        return gather(work, self.plan, len(self.inputs.experts), count_pass, row_sums)

    def merge(self, units: list, stats_json: dict, held: dict, partial, warnings: list[str], progress: bool) -> None:
        from mergescale.merge.inputs import progress_bar

        pool, k = self.pool, len(self.pool.slots)

        def durable(unit_ids):  # the output's sha256s advance in the background as rows become final
            for u in unit_ids:
                unit = self.units_by_id[u]
                partial.rows_durable(unit.name, unit.row_start, unit.row_end)

        durable(sorted(u.id for u in self.journaled))
        pool.set_stats(stats_json)
        bar = progress_bar(self._bytes(u.id for u in units), f"merge {self.config.method} on {k} workers", progress)
        self.unit_nodes: dict[int, str] = {}
        counted: set[int] = set()  # units already on the progress bar (a dead actor's unconfirmed ones are redone)

        def on_durable(unit_ids):
            partial.journal(self.digests.of(unit_ids))  # the actor has fdatasync'ed these rows
            durable(unit_ids)

        def on_merged(slot, batch, res):
            self._add_digests(res["digests"])
            warnings.extend(w for w in res["warnings"] if w not in warnings)  # redone units warn again
            on_durable(res["durable"])
            slot.unsynced = res["units"]
            slot.bytes += res["bytes"]
            slot.seconds += res["seconds"]
            slot.units += len(res["units"])
            slot.node, slot.device, slot.torch = res["node"], res["device"], res["torch"]
            for u in res["units"]:
                self.unit_nodes[u] = res["node"]
            fresh = [u for u in res["units"] if u not in counted]
            counted.update(fresh)
            bar.update(self._bytes(fresh))
            bar.set_postfix_str(f"units {len(partial.done)}/{len(self.plan.units)}", refresh=False)

        def merge_args(batch, upcoming):  # units hashed in this run's statistics pass are not hashed again
            return batch, upcoming, [u for u in batch if u in self.digests.fresh]

        pool.run("merge", self._queues(units), merge_args, on_merged, self.max_failures)
        while True:
            on_durable(pool.flush())
            if not any(s.queue for s in pool.slots):
                break
            pool.run("merge", [s.queue for s in pool.slots], merge_args, on_merged, self.max_failures)
        bar.close()

    def timing(self, statistics_s: float, total_s: float, units_total: int, units_resumed: int) -> dict:
        return {"actor_start_s": round(self.t_start, 3), "statistics_s": round(statistics_s, 3),
                "total_s": round(total_s + self.t_start, 3), "units_total": units_total, "units_resumed": units_resumed,
                "actor_replacements": self.pool.replacements}

    def _per_actor(self) -> list[dict]:
        return [{"actor": s.index, "node": s.node, "device": s.device, "loaded_torch": s.torch, "units": s.units,
                 "bytes_read": s.bytes, "busy_s": round(s.seconds, 3),
                 "MB_per_s": round(s.bytes / 1e6 / s.seconds, 1) if s.seconds else None} for s in self.pool.slots]

    def manifest_extra(self) -> dict:
        return {"distributed": {"workers": len(self.pool.slots), "placement": self.config.cluster.placement,
                                "actors": self._per_actor(),
                                "unit_nodes": {str(u): n for u, n in sorted(self.unit_nodes.items())}}}

    def report(self, progress: bool) -> None:
        if progress:
            print_actor_summary(self._per_actor())

    def detach(self) -> None:
        pass

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class RayPushRunner(RayRunner):
    """The Ray runner of a push (driver.merge_into): the actors merge their batches and return the rows, with each
    unit's sha256 taken where it was merged, and this process (the resident replica that holds the model) loads them
    into the push sink as they come, in any order (merge.push). Nothing is durable: no journal, no fdatasync; a
    batch whose actor dies is merged again by another, and its rows reach the sink once, from the call that
    returned them."""

    def merge(self, units: list, stats_json: dict, held: dict, sink, warnings: list[str], progress: bool) -> None:
        from mergescale.merge.inputs import progress_bar

        pool, k = self.pool, len(self.pool.slots)
        pool.set_stats(stats_json)
        bar = progress_bar(self._bytes(u.id for u in units), f"merge {self.config.method} on {k} workers (push)",
                           progress)
        self.unit_nodes: dict[int, str] = {}

        def on_merged(slot, batch, res):
            self._add_digests(res["digests"])
            warnings.extend(w for w in res["warnings"] if w not in warnings)
            for uid, rows, digest in res["rows"]:
                unit = self.units_by_id[uid]
                sink.write_rows(unit.name, unit.row_start, rows, digest)
                self.unit_nodes[uid] = res["node"]
            slot.bytes += res["bytes"]
            slot.seconds += res["seconds"]
            slot.units += len(res["units"])
            slot.node, slot.device, slot.torch = res["node"], res["device"], res["torch"]
            bar.update(self._bytes(res["units"]))

        def merge_args(batch, upcoming):  # units hashed in this run's statistics pass are not hashed again
            return batch, upcoming, [u for u in batch if u in self.digests.fresh]

        pool.run("merge_rows", self._queues(units), merge_args, on_merged, self.max_failures)
        bar.close()


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
    return _merge_task.remote(config.model_dump(mode="json", by_alias=True), str(Path(out).absolute()), workers,
                              overwrite)
