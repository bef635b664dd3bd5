"""Resident replicas for a study: Ray actors that each hold a base's model (eval.resident) across cells; a
cell's merge is pushed into the model in place (merge.push), then scored there (study.cells.push_model), so no
merged byte touches a disk. The merge runs inside the replica, or (the study's merge.workers) on that many Ray
merge actors that send each unit's rows to the replica as they finish (cluster.merge.RayPushRunner).

A replica that dies, or whose push fails its checksum, is replaced by a fresh one (a fresh load of the base) and the
cell runs again there (`ResidentCall.retry`): a checksum mismatch means the replica's model cannot be trusted. An
actor runs one call at a time: cells of one base run side by side on up to `per_base` replicas of it.
"""

from __future__ import annotations

import logging
import time

import ray

from mergescale.merge.push import PushMismatch

log = logging.getLogger(__name__)


class ResidentRoomError(RuntimeError):
    """The cluster cannot hold a base's first replica beside a merge's actors."""


class ResidentReplica:
    """A resident model of one base (loaded once) that merges cells into itself and scores them (a Ray actor)."""

    def __init__(self, base_dir: str, settings: dict):
        from mergescale.eval.merge_eval import load_resident
        from mergescale.study.cells import worker_setup

        start = time.time()
        worker_setup(settings)
        self.resident = load_resident(base_dir, settings["backend"], dtype=settings["dtype"],
                                      max_length=settings["max_length"])
        self.load_span: tuple[float, float] | None = (start, time.time())

    def push_model(self, config: dict, tasks: list[str], out: str, settings: dict, workers: int | None = None) -> dict:
        """The cell merged into this replica's model and scored: merged here, or with `workers` by that many Ray
        merge actors that send their rows here (cluster.merge.RayPushRunner)."""
        from mergescale.study.cells import push_model

        runner = None
        if workers is not None:
            from mergescale.cluster.merge import RayPushRunner

            runner = RayPushRunner(workers)
        result = push_model(config, tasks, out, settings, self.resident, runner=runner)
        if self.load_span is not None:  # the first result of this replica says when it loaded its base (timings)
            result["replica_load"], self.load_span = self.load_span, None
        return result


class ResidentPool:
    """The study's resident replicas: up to `per_base` per base directory, each started when a cell of its base finds
    every replica of that base busy, and kept until `close`. A cell goes to its base's replica with the fewest calls
    in flight."""

    def __init__(self, settings: dict, num_cpus: float, num_gpus: float, per_base: int = 1,
                 replica: type | None = None, merge_resources: tuple[float, float] = (0.0, 0.0)):
        self.settings, self.num_cpus, self.num_gpus, self.per_base = settings, num_cpus, num_gpus, per_base
        # (CPUs, GPUs) of one cell's merge actors, placed beside the replicas: replicas that leave no room for them
        # would wait for each other's merges forever
        self.merge_resources = merge_resources
        # a replica lost is replaced by the pool (a fresh load), never restarted by Ray under a running cell
        self.replica = ray.remote(max_restarts=0)(replica or ResidentReplica)
        self.actors: dict[str, list] = {}
        self.calls: dict = {}  # actor -> its calls' ObjectRefs not known to be finished
        self.started = 0  # replicas started, each a load of its base: the model loads a push study does

    def call(self, base_dir: str) -> ResidentCall:
        """A cell's calls on a replica of `base_dir` (a Step's submit and retry)."""
        return ResidentCall(self, base_dir)

    def submit(self, base_dir: str, *args) -> tuple:
        """push_model(*args) on the least busy replica of `base_dir` (a new one while it has fewer than per_base and
        each is busy): (the actor, the ObjectRef)."""
        mine = self.actors.setdefault(base_dir, [])
        for a in mine:
            refs = self.calls[a]
            self.calls[a] = ray.wait(refs, num_returns=len(refs), timeout=0)[1] if refs else []
        idle = [a for a in mine if not self.calls[a]]
        alive = sum(len(a) for a in self.actors.values())
        if not mine:
            self.require_room(alive + 1)
        if not idle and len(mine) < self.per_base and self._room(alive + 1):
            actor = self.replica.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(base_dir,
                                                                                               self.settings)
            mine.append(actor)
            self.calls[actor] = []
            self.started += 1
        actor = min(mine, key=lambda a: len(self.calls[a]))
        ref = actor.push_model.remote(*args)
        self.calls[actor].append(ref)
        return actor, ref

    def require_room(self, replicas: int) -> None:
        """ResidentRoomError naming the fields unless the cluster holds `replicas` replicas (one per base at least)
        and one cell's merge actors beside them: otherwise the replicas would wait for room that never comes."""
        if not self._room(replicas):
            cpus, gpus = self.merge_resources
            raise ResidentRoomError(
                f"{replicas} resident replica(s) (one per base) of eval.num_cpus {self.num_cpus}, eval.num_gpus "
                f"{self.num_gpus} each and one cell's merge actors beside them (merge.workers x merge.num_cpus = "
                f"{cpus:g} CPUs, x merge.num_gpus = {gpus:g} GPUs) do not fit this cluster "
                f"(CPU {ray.cluster_resources().get('CPU', 0):g}, GPU {ray.cluster_resources().get('GPU', 0):g}): "
                "lower those, or add nodes")

    def _room(self, replicas: int) -> bool:
        """Whether the cluster holds `replicas` replicas and one merge's actors beside them."""
        have = ray.cluster_resources()
        cpus, gpus = self.merge_resources
        return (have.get("CPU", 0) + 1e-9 >= replicas * self.num_cpus + cpus
                and have.get("GPU", 0) + 1e-9 >= replicas * self.num_gpus + gpus)

    def replace(self, base_dir: str, actor, error: BaseException) -> bool:
        """After a failed call on `actor`: True (and the actor removed, unless another failed call did that already;
        the next cell starts a fresh one) when the replica is what failed, its process lost or its push's checksum
        wrong; False for an error of the cell itself (bad input, non-finite scores), which another would repeat."""
        lost = isinstance(error, (ray.exceptions.RayActorError, PushMismatch))
        if lost and actor in self.actors.get(base_dir, []):
            log.warning("resident replica of %s %s; its cells run again on a fresh one", base_dir,
                        "failed its checksum" if isinstance(error, PushMismatch) else "was lost")
            self.actors[base_dir].remove(actor)
            del self.calls[actor]
            ray.kill(actor)
        return lost

    def close(self) -> None:
        for actors in self.actors.values():
            for actor in actors:
                ray.kill(actor)
        self.actors.clear()
        self.calls.clear()


class ResidentCall:
    """One cell's push on a replica of its base: `submit` runs it there, `retry` (after a failure) removes that
    replica when it is what failed. Cells queued on one replica fail together when it dies; only the first of them
    removes it."""

    def __init__(self, pool: ResidentPool, base_dir: str):
        self.pool, self.base_dir, self.on = pool, base_dir, None

    def submit(self, config: dict, tasks: list[str], out: str, settings: dict, workers: int | None = None):
        self.on, ref = self.pool.submit(self.base_dir, config, tasks, out, settings, workers)
        return ref

    def retry(self, error: BaseException) -> bool:
        return self.pool.replace(self.base_dir, self.on, error)
